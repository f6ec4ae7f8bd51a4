"""Train diffusion models with the EDM recipe ("Elucidating the Design Space of Diffusion-Based
Generative Models") or the EDM2 recipe ("Analyzing and Improving the Training Dynamics of
Diffusion Models"). Options left out keep the values of --preset (training/presets.py)."""

import json
import os
import re
import warnings

import click
import torch

import dnnlib
from torch_utils import distributed as dist
from training import launch, presets
from training.training_loop import training_loop

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


def overrides_from_options(opts: dict) -> dict:
    """Map click options (EDM and EDM2 spellings) onto TrainConfig fields; None = keep preset."""
    o = dict(opts)
    ov = dict(data=o.pop('data'), cond=o.pop('cond'), arch=o.pop('arch'), precond=o.pop('precond'),
              stf=o.pop('stf'), rbatch=o.pop('rbatch'), batch_size=o.pop('batch'), batch_gpu=o.pop('batch_gpu'),
              total_nimg=o.pop('duration'), lr=o.pop('lr'), lr_decay_batches=o.pop('decay'),
              ema_halflife_Mimg=o.pop('ema'), edm2_config=o.pop('edm2_config'), dropout=o.pop('dropout'), augment=o.pop('augment'), xflip=o.pop('xflip'),
              model_channels=o.pop('cbase'), channel_mult=_int_list(o.pop('cres')), P_mean=o.pop('P_mean'),
              P_std=o.pop('P_std'), fp16=o.pop('fp16'), bf16=o.pop('bf16'), loss_scaling=o.pop('ls'),
              seed=o.pop('seed'), device=o.pop('device'), compile=o.pop('compile'), channels_last=o.pop('channels_last'),
              deterministic=o.pop('deterministic'), cudnn_benchmark=o.pop('bench'), workers=o.pop('workers'), cache=o.pop('cache'),
              transfer=o.pop('transfer'), resume=o.pop('resume'), trust_pickle=o.pop('trust_pickle'), status_nimg=o.pop('status'),
              snapshot_nimg=o.pop('snapshot'), checkpoint_nimg=o.pop('checkpoint'))
    tick, snap, dump = o.pop('tick'), o.pop('snap'), o.pop('dump')
    if tick is not None:
        ov['status_nimg'] = tick * 1000
    if snap is not None or dump is not None:
        # EDM counts snapshots and dumps in ticks.
        base = ov['status_nimg'] if ov['status_nimg'] is not None else presets.PRESETS[opts['preset']].status_nimg
        ov['snapshot_nimg'] = snap * base if snap is not None and base else ov['snapshot_nimg']
        ov['checkpoint_nimg'] = dump * base if dump is not None and base else ov['checkpoint_nimg']
    ema_stds = o.pop('ema_stds')
    if ema_stds is not None:
        ov['ema_stds'] = tuple(float(x) for x in ema_stds.split(','))
    assert set(o) <= {'preset'}, f'unmapped options {sorted(o)}'
    return {k: v for k, v in ov.items() if v is not None}


def run_description(cfg: presets.TrainConfig, world_size: int, desc: str) -> str:
    """EDM's run name: <dataset>-<cond|uncond>-<arch>-<precond>-gpus<N>-batch<B>-<dtype>-<desc>."""
    dataset = os.path.splitext(os.path.basename(os.path.normpath(cfg.data)))[0]
    dtype = 'fp16' if cfg.fp16 else 'bf16' if cfg.bf16 else 'fp32'
    return (f'{dataset}-{"cond" if cfg.cond else "uncond"}-{cfg.arch}-{cfg.precond}-gpus{world_size}'
            f'-batch{cfg.batch_size}-{dtype}-{desc}')


def numbered_run_dir(outdir: str, name: str) -> str:
    """<outdir>/<NNNNN>-<name> with the next free run number, as EDM names its run directories."""
    taken = [int(m.group()) for entry in (os.listdir(outdir) if os.path.isdir(outdir) else [])
             if os.path.isdir(os.path.join(outdir, entry)) and (m := re.match(r'\d+', entry))]
    return os.path.join(outdir, f'{max(taken, default=-1) + 1:05d}-{name}')


def choose_run_dir(outdir: str, cfg: presets.TrainConfig, desc: str | None, nosubdir: bool) -> str:
    """--outdir itself, or with --desc (and no --nosubdir) a new numbered subfolder, the same on every rank."""
    if desc is None or nosubdir:
        return outdir
    run_dir = [numbered_run_dir(outdir, run_description(cfg, dist.get_world_size(), desc))]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(run_dir, src=0)
    return run_dir[0]


@click.command(context_settings=dict(show_default=True))
# Main options.
@click.option('--preset',        help='Configuration preset', metavar='NAME', type=click.Choice(list(presets.PRESETS)), default=presets.DEFAULT_PRESET)
@click.option('--outdir',        help='Run directory; rerun the same command to resume', metavar='DIR', type=str)
@click.option('--desc',          help='EDM: make a numbered run folder in --outdir named with this', metavar='STR', type=str, callback=_check_desc)
@click.option('--nosubdir',      help='EDM: no numbered run folder, even with --desc', is_flag=True)
@click.option('--data',          help='Dataset folder or zip', metavar='ZIP|DIR', type=str)
@click.option('--cond',          help='Train class-conditional model', metavar='BOOL', type=bool)
@click.option('--arch',          help='Network architecture', type=click.Choice(list(presets.ARCHS)))
@click.option('--precond',       help='Preconditioning & loss', type=click.Choice(list(presets.PRECONDS)))
@click.option('--stf/--no-stf',  help='Stable Target Field loss', default=None)
@click.option('--rbatch',        help='STF reference batch size', metavar='INT', type=click.IntRange(min=1))
# Hyperparameters.
@click.option('--duration',      help='Training duration (plain number = Mimg, or 2048Mi, 200M)', metavar='MIMG|NIMG', type=NimgType(1e6))
@click.option('--batch',         help='Total batch size', metavar='NIMG', type=NimgType())
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
@click.option('--compile/--no-compile', help='torch.compile the network', default=None)
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
@click.option('--transfer',      help='Initialise from network pickle', metavar='PKL|URL', type=str)
@click.option('--resume',        help='Resume from training-state-*.pt', metavar='PT', type=str)
@click.option('--trust-pickle',  help='Let training states and --transfer pickles run code stored in them', is_flag=True, default=None)
@click.option('-n', '--dry-run', help='Print the resolved config and exit', is_flag=True)
@dnnlib.util.cli_errors
def main(outdir, desc, nosubdir, dry_run, **opts):
    """Train a diffusion model (EDM or EDM2 recipe).

    Examples:

    \b
    # EDM: class-conditional CIFAR-10 DDPM++ on 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs/cifar \\
        --data=datasets/cifar10-32x32.zip --preset=edm-cifar10-32x32-cond-vp

    \b
    # EDM2: XS model on ImageNet-512 latents; rerun the same command to resume
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs/xs \\
        --data=datasets/img512-sd.zip --preset=edm2-img512-xs --batch-gpu=32

    \b
    # Seconds on a CPU
    python train.py --preset=tiny-edm --data=datasets/cifar8 --outdir=runs/tiny
    """
    cfg = presets.build_config(opts['preset'], **overrides_from_options(opts))
    dist.print0('Training config:')
    dist.print0(json.dumps(presets.to_json(cfg), indent=2))
    if dry_run:
        dist.print0('Dry run; exiting.')
        return
    if outdir is None:
        raise click.BadParameter('is required (the run directory)', param_hint='--outdir')
    if cfg.data is None:
        raise click.BadParameter('is required (a dataset folder or .zip made by dataset_tool.py)', param_hint='--data')
    device = launch.init_run(cfg)
    run_dir = choose_run_dir(outdir, cfg, desc, nosubdir)
    result = training_loop(cfg, run_dir=run_dir, device=device)
    dist.print0(f'Run directory: {run_dir} ({result.cur_nimg / 1e3:.1f} kimg)')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
