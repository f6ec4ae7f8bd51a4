"""Train diffusion models with the EDM recipe ("Elucidating the Design Space of Diffusion-Based
Generative Models"), the EDM2 recipe ("Analyzing and Improving the Training Dynamics of
Diffusion Models") or the DDPM recipe of tqch/ddpm-torch (Ho et al. 2020; ddpm-* presets).
Options left out keep the values of --preset (training/presets.py)."""

import dataclasses
import json
import os
import re
import warnings

import click

import dnnlib
from training import presets

# training/ddpm.py's choices (it imports torch), for --help; tests/test_help.py checks that they agree.
BETA_SCHEDULES = ('quad', 'linear', 'warmup10', 'warmup50', 'jsd')
MODEL_MEAN_TYPES = ('mean', 'x_0', 'eps')
MODEL_VAR_TYPES = ('learned', 'fixed-small', 'fixed-large')
LOSS_TYPES = ('kl', 'mse')

warnings.filterwarnings('ignore', 'Grad strides do not match bucket view strides')

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


def _check_desc(ctx, param, value):
    """--desc names a folder: non-empty, no path separators."""
    if value is not None and (not value or '/' in value or os.sep in value):
        raise click.BadParameter(f'{value!r} must be a non-empty name without path separators')
    return value


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
              seed=o.pop('seed'), device=o.pop('device'), compile=o.pop('compile'), fast=o.pop('fast'), channels_last=o.pop('channels_last'),
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


@click.command(context_settings=dict(show_default=True))
# Main options.
@click.option('--preset',        help='Configuration preset', metavar='NAME', type=click.Choice(list(presets.PRESETS)), default=presets.DEFAULT_PRESET)
@click.option('--outdir',        help='EDM: where numbered run folders go; EDM2: the run folder', metavar='DIR', type=str)
@click.option('--name',          help='STF: the run folder is --outdir/NAME', metavar='NAME', type=str, callback=_check_desc)
@click.option('--desc',          help='String to include in the run folder name', metavar='STR', type=str, callback=_check_desc)
@click.option('--nosubdir',      help='EDM: --outdir itself is the run folder', is_flag=True)
@click.option('--data',          help='Dataset folder or zip', metavar='ZIP|DIR', type=str)
@click.option('--cond',          help='Train class-conditional model', metavar='BOOL', type=bool)
@click.option('--arch',          help='Network architecture', type=click.Choice(list(presets.ARCHS)))
@click.option('--precond',       help='Preconditioning & loss', type=click.Choice(list(presets.PRECONDS)))
@click.option('--stf',           help='Stable Target Field loss (--stf alone = 1)', metavar='BOOL', type=bool, is_flag=False, flag_value=True)
@click.option('--no-stf', 'no_stf', help='Same as --stf=0', is_flag=True)
@click.option('--rbatch',        help='STF reference batch per GPU (none = 4096)', metavar='INT', type=click.IntRange(min=1))
# Hyperparameters.
@click.option('--duration',      help='Training duration: a plain number is Mimg for EDM presets, images for EDM2 presets; or 200M, 2048Mi', metavar='NIMG', type=str)
@click.option('--batch', '--batch-size', 'batch', help='Total batch size', metavar='NIMG', type=NimgType())
@click.option('--batch-gpu',     help='Limit batch size per GPU (gradient accumulation)', metavar='NIMG', type=NimgType())
@click.option('--cbase', '--channels', 'cbase', help='Channel multiplier', metavar='INT', type=click.IntRange(min=1))
@click.option('--cres',          help='Channels per resolution', metavar='LIST', type=str)
@click.option('--lr',            help='Learning rate (EDM2: alpha_ref)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--decay',         help='EDM2 learning rate decay t_ref', metavar='BATCHES', type=click.FloatRange(min=0))
@click.option('--ema',           help='EDM EMA half-life', metavar='MIMG', type=click.FloatRange(min=0))
@click.option('--ema-stds',      help='EDM2 power-function EMA stds', metavar='LIST', type=str)
@click.option('--edm2-config',   help='EDM2 Table 1 network config (arch edm2)', type=click.Choice(list('BCDEFG')))
@click.option('--dropout',       help='Dropout probability', metavar='FLOAT', type=click.FloatRange(min=0, max=1))
@click.option('--augment',       help='Augment probability', metavar='FLOAT', type=click.FloatRange(min=0, max=1))
@click.option('--xflip',         help='Enable dataset x-flips', metavar='BOOL', type=bool)
@click.option('--P_mean', 'P_mean', help='Noise level mean', metavar='FLOAT', type=float)
@click.option('--P_std', 'P_std', help='Noise level standard deviation', metavar='FLOAT', type=click.FloatRange(min=0))
# Performance.
@click.option('--fp16',          help='Reference mixed precision', metavar='BOOL', type=bool)
@click.option('--bf16',          help='bf16 autocast', metavar='BOOL', type=bool)
@click.option('--ls',            help='Loss scaling', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--channels-last', help='Channels-last weights (conv nets)', metavar='BOOL', type=bool)
@click.option('--compile/--no-compile', help='torch.compile the network\'s repeated blocks', default=None)
@click.option('--fast',          help='Fastest measured set: bf16 + --compile where the device runs them (docs/performance.md)', is_flag=True, default=None)
@click.option('--deterministic/--no-deterministic', help='Deterministic algorithms', default=None)
@click.option('--bench',         help='cuDNN benchmarking (off with --deterministic)', metavar='BOOL', type=bool)
@click.option('--workers',       help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=0))
@click.option('--cache',         help='Cache dataset in CPU memory', metavar='BOOL', type=bool)
@click.option('--device',        help='auto|cuda|cpu|mps', metavar='STR', type=str)
# I/O.
@click.option('--status',        help='Status interval', metavar='NIMG', type=NimgType())
@click.option('--snapshot',      help='Snapshot interval', metavar='NIMG', type=NimgType())
@click.option('--checkpoint',    help='Training-state interval', metavar='NIMG', type=NimgType())
@click.option('--tick',          help='EDM: status interval', metavar='KIMG', type=click.IntRange(min=1))
@click.option('--snap',          help='EDM: snapshot interval', metavar='TICKS', type=click.IntRange(min=1))
@click.option('--dump',          help='EDM: training-state interval', metavar='TICKS', type=click.IntRange(min=1))
@click.option('--seed',          help='Random seed', metavar='INT', type=click.IntRange(min=0))
@click.option('--transfer',      help='Initialise from network pickle (DDPM: checkpoint .pt)', metavar='PKL|PT|URL', type=str)
@click.option('--resume',        help='Resume from training-state-*.pt', metavar='PT', type=str)
@click.option('--trust-pickle',  help='Let training states and --transfer pickles run code stored in them', is_flag=True, default=None)
@click.option('--allow-option-change', help='Resume even if run-altering options differ from the run folder\'s', is_flag=True)
@click.option('-n', '--dry-run', help='Print the resolved config and exit (EDM train.py)', is_flag=True)
@click.option('--first-step',    help='Train until the first optimizer step is done, then stop without saving (ddpm-torch --dry-run)', is_flag=True, default=None)
# DDPM recipe (ddpm-* presets; names of tqch/ddpm-torch train.py).
@click.option('--timesteps',     help='DDPM: diffusion steps T', metavar='INT', type=click.IntRange(min=1))
@click.option('--beta-schedule', help='DDPM: beta schedule', type=click.Choice(list(BETA_SCHEDULES)))
@click.option('--beta-start',    help='DDPM: first beta', metavar='FLOAT', type=click.FloatRange(min=0, max=1, min_open=True))
@click.option('--beta-end',      help='DDPM: last beta', metavar='FLOAT', type=click.FloatRange(min=0, max=1, min_open=True))
@click.option('--model-mean-type', help='DDPM: what the network predicts', type=click.Choice(list(MODEL_MEAN_TYPES)))
@click.option('--model-var-type', help='DDPM: model variance (learned = Nichol & Dhariwal hybrid)', type=click.Choice(list(MODEL_VAR_TYPES)))
@click.option('--loss-type',     help='DDPM: loss', type=click.Choice(list(LOSS_TYPES)))
@click.option('--ema-decay',     help='DDPM: EMA decay', metavar='FLOAT', type=click.FloatRange(min=0, max=1, max_open=True))
@click.option('--grad-norm',     help='DDPM: clip the gradient norm (0 = off)', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--warmup',        help='DDPM: learning-rate warm-up', metavar='STEPS', type=click.IntRange(min=0))
@click.option('--epochs',        help='DDPM: training duration in epochs', metavar='INT', type=click.IntRange(min=1))
@click.option('--chkpt-intv',    help='DDPM: snapshot and training-state interval (instead of --snapshot/--checkpoint)', metavar='EPOCHS', type=click.FloatRange(min=0, min_open=True))
@click.option('--block-size',    help='DDPM: pixel-unshuffle block around the UNet (1 = none)', metavar='INT', type=click.IntRange(min=1))
@click.option('--eval',          help='DDPM: FID of the EMA at every snapshot, logged as Metrics/fid', is_flag=True, default=None)
@click.option('--eval-total-size', help='DDPM --eval: images per evaluation', metavar='INT', type=click.IntRange(min=2))
@click.option('--eval-batch-size', help='DDPM --eval: sampling batch (all GPUs)', metavar='INT', type=click.IntRange(min=1))
@click.option('--eval-ref',      help='DDPM --eval: reference statistics (fid.py ref); none = from --data, cached in the run folder', metavar='NPZ|PKL|URL', type=str)
@click.option('--use-ddim',      help='DDPM --eval: DDIM (eta 0) instead of ancestral sampling', is_flag=True, default=None)
@click.option('--skip-schedule', help='DDPM --eval, DDIM: timestep subsequence', type=click.Choice(['linear', 'quadratic']))
@click.option('--subseq-size',   help='DDPM --eval, DDIM: number of timesteps', metavar='INT', type=click.IntRange(min=1))
@click.option('--num-accum',     help='Gradient accumulation rounds (= --batch-gpu of batch / N)', metavar='INT', type=click.IntRange(min=1))
@click.option('--beta1',         help='Adam beta1', metavar='FLOAT', type=click.FloatRange(min=0, max=1, max_open=True))
@click.option('--beta2',         help='Adam beta2', metavar='FLOAT', type=click.FloatRange(min=0, max=1, max_open=True))
@dnnlib.util.cli_errors
def main(outdir, name, desc, nosubdir, no_stf, dry_run, **opts):
    """Train a diffusion model (EDM, EDM2 or DDPM recipe).

    \b
    Run folders:
      EDM recipe (edm-* presets): a new numbered folder in --outdir per run, as EDM's train.py,
        <NNNNN>-<dataset>-<cond>-<arch>-<precond>-gpus<N>-batch<B>-<dtype>[-<desc>]; rerunning an
        interrupted command continues the newest unfinished such folder with the same options.
        --nosubdir (or an --outdir that holds training states): --outdir itself is the run folder.
      EDM2 and DDPM recipes (edm2-*, ddpm-* presets): --outdir is the run folder; rerun the same
        command to resume.
      --name=NAME (STF fork): the run folder is --outdir/NAME; rerun to resume.

    Defaults shown are those of the default --preset; another preset brings its own (see them with -n).

    Examples:

    \b
    # EDM: class-conditional CIFAR-10 DDPM++ on 8 GPUs -> training-runs/00000-cifar10-32x32-cond-ddpmpp-edm-...
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp

    \b
    # STF fork: Stable Target Field loss, run folder training-runs/exp_name
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs --name=exp_name \\
        --data=datasets/cifar10-32x32.zip --cond=0 --arch=ncsnpp --stf=1 --rbatch=1024

    \b
    # EDM2: XS model on ImageNet-512 latents; rerun the same command to resume
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs/xs \\
        --data=datasets/img512-sd.zip --preset=edm2-img512-xs --batch-gpu=32

    \b
    # DDPM (Ho et al.) on CIFAR-10, ddpm-torch options; --first-step = its --dry-run
    torchrun --standalone --nproc_per_node=4 train.py --preset=ddpm-cifar10-32x32 \\
        --data=datasets/cifar10-32x32.zip --outdir=training-runs/ddpm --beta-schedule=linear

    \b
    # Seconds on a CPU
    python train.py --preset=tiny-edm --data=datasets/cifar8 --outdir=runs/tiny --nosubdir
    """
    if no_stf:
        opts['stf'] = False
    cfg = presets.build_config(opts['preset'], **overrides_from_options(opts))
    if click.get_current_context().get_parameter_source('preset') == click.core.ParameterSource.DEFAULT:
        cfg = dataclasses.replace(cfg, preset=f'{cfg.preset} (default)')  # an EDM-style command line chose no preset
    if not dry_run and outdir is None:
        raise click.BadParameter('is required (the run directory)', param_hint='--outdir')
    if not dry_run and cfg.data is None:
        raise click.BadParameter('is required (a dataset folder or .zip made by dataset_tool.py)', param_hint='--data')
    if not dry_run and not os.path.exists(cfg.data):
        raise FileNotFoundError(f'--data={cfg.data}: dataset not found; make one with dataset_tool.py')
    # Imported here, not at the top: --help and option errors come back without loading torch.
    from torch_utils import distributed as dist
    from torch_utils import misc
    from training.run_dir import choose_run_dir
    from training.training_loop import open_dataset, training_loop
    if not dry_run:
        open_dataset(cfg)  # resolution and labels are checked before the config is printed
    device = misc.choose_device(cfg.device)
    dist.init(device)
    presets.check_batch(cfg, dist.get_world_size())
    run_dir = choose_run_dir(outdir, cfg, desc=desc, nosubdir=nosubdir, name=name) if outdir is not None else None
    dist.print0(f'Run folder:   {run_dir if run_dir is not None else "(none: pass --outdir)"}')
    dist.print0(f'Training for: {nimg_in_words(cfg.total_nimg)}')
    dist.print0('Training config:')
    dist.print0(json.dumps(presets.to_json(cfg), indent=2))
    if dry_run:
        dist.print0('Dry run; exiting.')
        return
    device = dist.device_for_rank(device)
    dist.install_signal_handlers()
    result = training_loop(cfg, run_dir=run_dir, device=device)
    dist.print0(f'Run directory: {run_dir} ({result.cur_nimg / 1e3:.1f} kimg)')


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


show_preset_defaults(main)

if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
