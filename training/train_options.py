"""train.py's options as TrainConfig fields: image counts with suffixes, EDM's tick-based intervals, the
ddpm-torch spellings, and the preset defaults shown in --help. Torch-free, so that --help stays fast."""

import re

import click

import dnnlib
from training import presets

# training/ddpm.py's choices (it imports torch), for --help; tests/test_help.py checks that they agree.
BETA_SCHEDULES = ('quad', 'linear', 'warmup10', 'warmup50', 'jsd')
MODEL_MEAN_TYPES = ('mean', 'x_0', 'eps')
MODEL_VAR_TYPES = ('learned', 'fixed-small', 'fixed-large')
LOSS_TYPES = ('kl', 'mse')

_SUFFIXES = {'k': 10**3, 'M': 10**6, 'G': 10**9, 'Ki': 1 << 10, 'Mi': 1 << 20, 'Gi': 1 << 30}


def parse_nimg(text: str, plain_unit: float = 1) -> int:
    """'128Ki', '8Mi', '50k', '2.5M' -> images; a plain number is multiplied by plain_unit."""
    m = re.fullmatch(r'\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*(Ki|Mi|Gi|k|M|G)?\s*', str(text))
    if m is None:
        raise click.BadParameter(f'{text!r} is not a count; write e.g. 512, 50k, 2.5M, 128Ki or 8Mi')
    unit = _SUFFIXES[m.group(2)] if m.group(2) else plain_unit
    return int(round(float(m.group(1)) * unit))


class NimgType(click.ParamType):
    """Image counts with optional k/M/G (decimal) or Ki/Mi/Gi (binary) suffix."""
    name = 'NIMG'

    def __init__(self, plain_unit: float = 1):
        self.plain_unit = plain_unit

    def convert(self, value, param, ctx):
        return value if isinstance(value, int) else parse_nimg(value, self.plain_unit)


def duration_nimg(text: str, preset: str) -> int:
    """--duration in images: a plain number counts Mimg in EDM presets (EDM train.py) and images in EDM2
    presets (EDM2 train_edm2.py); suffixed counts (200M, 2048Mi) mean the same everywhere."""
    return parse_nimg(text, plain_unit=1e6 if presets.PRESETS[preset].recipe == 'edm' else 1)


def nimg_in_words(nimg: int) -> str:
    """'2,147,483,648 images (2.1 billion)': the total a user should recognise before a long run starts."""
    for scale, word in [(1e12, 'trillion'), (1e9, 'billion'), (1e6, 'million'), (1e3, 'thousand')]:
        if nimg >= scale:
            return f'{nimg:,} images ({nimg / scale:.3g} {word})'
    return f'{nimg:,} images'


def _int_list(value):
    try:
        return tuple(dnnlib.util.parse_int_list(value)) if value is not None else None
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def ddpm_overrides(o: dict) -> dict:
    """Pop the ddpm-torch spellings (--timesteps, ..., --beta1/--beta2, --num-accum) as TrainConfig fields."""
    ov = {field: o.pop(field) for field in ('timesteps', 'beta_schedule', 'beta_start', 'beta_end', 'model_mean_type',
                                            'model_var_type', 'loss_type', 'ema_decay', 'grad_norm', 'epochs', 'chkpt_intv',
                                            'block_size', 'eval', 'eval_total_size', 'eval_batch_size', 'eval_ref',
                                            'use_ddim', 'skip_schedule', 'subseq_size')}
    ov.update(lr_warmup_steps=o.pop('warmup'), first_step=o.pop('first_step') or None)
    beta1, beta2, num_accum = o.pop('beta1'), o.pop('beta2'), o.pop('num_accum')
    preset = presets.PRESETS[o['preset']]
    if beta1 is not None or beta2 is not None:
        ov['adam_betas'] = (beta1 if beta1 is not None else preset.adam_betas[0],
                            beta2 if beta2 is not None else preset.adam_betas[1])
    if num_accum is not None:
        batch = o['batch'] if o['batch'] is not None else preset.batch_size
        if batch % num_accum != 0:
            raise click.BadParameter(f'--batch={batch} is not divisible by --num-accum={num_accum}', param_hint='--num-accum')
        ov['batch_gpu'] = batch // num_accum
    return ov


def overrides_from_options(opts: dict) -> dict:
    """Map click options (EDM, EDM2 and ddpm-torch spellings) onto TrainConfig fields; None = keep preset."""
    o = dict(opts)
    ddpm = ddpm_overrides(o)
    ov = dict(data=o.pop('data'), cond=o.pop('cond'), arch=o.pop('arch'), precond=o.pop('precond'),
              stf=o.pop('stf'), rbatch=o.pop('rbatch'), batch_size=o.pop('batch'), batch_gpu=o.pop('batch_gpu'),
              total_nimg=_duration(o.pop('duration'), opts['preset']), lr=o.pop('lr'), lr_decay_batches=o.pop('decay'),
              ema_halflife_Mimg=o.pop('ema'), edm2_config=o.pop('edm2_config'), dropout=o.pop('dropout'), augment=o.pop('augment'), xflip=o.pop('xflip'),
              model_channels=o.pop('cbase'), channel_mult=_int_list(o.pop('cres')), P_mean=o.pop('P_mean'),
              P_std=o.pop('P_std'), fp16=o.pop('fp16'), bf16=o.pop('bf16'), loss_scaling=o.pop('ls'),
              seed=o.pop('seed'), device=o.pop('device'), compile=o.pop('compile'), compile_async=o.pop('compile_async'), fast=o.pop('fast'), channels_last=o.pop('channels_last'),
              deterministic=o.pop('deterministic'), cudnn_benchmark=o.pop('bench'), workers=o.pop('workers'), cache=o.pop('cache'),
              transfer=o.pop('transfer'), resume=o.pop('resume'), trust_pickle=o.pop('trust_pickle'), status_nimg=o.pop('status'),
              snapshot_nimg=o.pop('snapshot'), checkpoint_nimg=o.pop('checkpoint'),
              allow_option_change=o.pop('allow_option_change') or None)
    ov.update(tick_intervals(presets.PRESETS[opts['preset']], o.pop('tick'), o.pop('snap'), o.pop('dump'), ov))
    ema_stds = o.pop('ema_stds')
    if ema_stds is not None:
        ov['ema_stds'] = tuple(float(x) for x in ema_stds.split(','))
    assert set(o) <= {'preset'}, f'unmapped options {sorted(o)}'
    if ddpm.get('batch_gpu') is not None and ov['batch_gpu'] is None:
        ov['batch_gpu'] = ddpm['batch_gpu']
    ddpm.pop('batch_gpu', None)
    return {k: v for k, v in {**ov, **ddpm}.items() if v is not None}


def tick_intervals(preset: presets.TrainConfig, tick, snap, dump, ov: dict) -> dict:
    """EDM's --tick (kimg), --snap and --dump (ticks) as image intervals; --tick alone keeps the preset's tick counts."""
    out = {}
    if tick is not None:
        out['status_nimg'] = tick * 1000
    base = out.get('status_nimg', ov.get('status_nimg') or preset.status_nimg)
    for field, ticks in (('snapshot_nimg', snap), ('checkpoint_nimg', dump)):
        if ticks is not None and base:
            out[field] = ticks * base
        elif tick is not None and ov.get(field) is None and getattr(preset, field) and preset.status_nimg:
            # EDM counts snapshots and states in ticks, so a longer tick stretches them too.
            out[field] = round(getattr(preset, field) / preset.status_nimg * base)
    return out


def _duration(text, preset):
    try:
        return duration_nimg(text, preset) if text is not None else None
    except click.BadParameter as err:
        raise click.BadParameter(err.message, param_hint='--duration') from None


# Options whose TrainConfig field has another name; the others share the option's name.
_HELP_FIELDS = dict(batch='batch_size', duration='total_nimg', decay='lr_decay_batches', ema='ema_halflife_Mimg',
                    cbase='model_channels', cres='channel_mult', ls='loss_scaling', bench='cudnn_benchmark',
                    status='status_nimg', snapshot='snapshot_nimg', checkpoint='checkpoint_nimg')


def show_preset_defaults(command: click.Command, preset: str = presets.DEFAULT_PRESET) -> None:
    """Show the default preset's value of every option in --help (the options themselves default to None)."""
    cfg = presets.build_config(preset)
    for param in command.params:
        field = _HELP_FIELDS.get(param.name, param.name)
        plain_flag = getattr(param, 'is_flag', False) and not getattr(param, 'secondary_opts', None)
        if param.name == 'preset' or plain_flag or not hasattr(cfg, field):
            continue
        value = getattr(cfg, field)
        if field == 'total_nimg' and cfg.recipe == 'edm':
            value = f'{value / 1e6:g}'  # EDM's plain --duration is in Mimg
        elif isinstance(value, (tuple, list)):
            value = ','.join(str(v) for v in value)
        param.show_default = 'none' if value is None else str(value)
