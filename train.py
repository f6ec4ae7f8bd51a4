"""Train diffusion models with the EDM recipe ("Elucidating the Design Space of Diffusion-Based
Generative Models"), the EDM2 recipe ("Analyzing and Improving the Training Dynamics of
Diffusion Models") or the DDPM recipe of tqch/ddpm-torch (Ho et al. 2020; ddpm-* presets).
Options left out keep the values of --preset (training/presets.py)."""

import dataclasses
import json
import os
import warnings

import click

import dnnlib
from training import presets
from training.train_options import (BETA_SCHEDULES, LOSS_TYPES, MODEL_MEAN_TYPES, MODEL_VAR_TYPES, NimgType,
                                    nimg_in_words, overrides_from_options, parse_nimg,  # noqa: F401 (parse_nimg: public)
                                    show_preset_defaults)

warnings.filterwarnings('ignore', 'Grad strides do not match bucket view strides')

def _check_desc(ctx, param, value):
    """--desc names a folder: non-empty, no path separators."""
    if value is not None and (not value or '/' in value or os.sep in value):
        raise click.BadParameter(f'{value!r} must be a non-empty name without path separators')
    return value


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
@click.option('--channels-last', help='Channels-last weights (conv nets; slower for DDPM++ on an H200, eager and compiled: docs/performance.md)', metavar='BOOL', type=bool)
@click.option('--compile/--no-compile', help='torch.compile the network', default=None)
@click.option('--compile-async',  help='With --compile: train eagerly from the first step while a child process compiles, then switch (one process)', metavar='BOOL', type=bool)
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


show_preset_defaults(main)

if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
