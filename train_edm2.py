"""Train diffusion models according to the EDM2 recipe from the paper "Analyzing and Improving the
Training Dynamics of Diffusion Models": NVlabs/edm2 train_edm2.py, with its options and defaults,
over the code of train.py (presets in training/presets.py, the loop in training/training_loop.py).

As in the reference, --outdir is the run directory itself, and every count is in images
(`--duration=2048Mi`; a plain number is images, not Mimg as in train.py).
"""

import json

import click

import dnnlib
from torch_utils import distributed as dist
from training import launch, presets
from training.training_loop import training_loop
from train import NimgType

EDM2_PRESETS = [name for name, cfg in presets.PRESETS.items() if cfg.recipe == 'edm2']

# train_edm2.py option -> TrainConfig field.
FIELDS = dict(data='data', cond='cond', duration='total_nimg', batch='batch_size', channels='model_channels',
              dropout='dropout', P_mean='P_mean', P_std='P_std', lr='lr', decay='lr_decay_batches',
              batch_gpu='batch_gpu', fp16='fp16', ls='loss_scaling', bench='cudnn_benchmark', status='status_nimg',
              snapshot='snapshot_nimg', checkpoint='checkpoint_nimg', seed='seed', device='device')


def build_config(preset: str, **opts) -> presets.TrainConfig:
    """train_edm2.py options -> resolved TrainConfig; None keeps the preset, --batch-gpu=0 means no limit."""
    overrides = {FIELDS[name]: value for name, value in opts.items() if value is not None}
    if overrides.get('batch_gpu') == 0:
        overrides['batch_gpu'] = None
    return presets.build_config(preset, **overrides)


@click.command()
# Main options.
@click.option('--outdir',           help='Where to save the results', metavar='DIR',                    type=str, required=True)
@click.option('--data',             help='Path to the dataset', metavar='ZIP|DIR',                      type=str, required=True)
@click.option('--cond',             help='Train class-conditional model  [default: True for edm2-img*]', metavar='BOOL', type=bool, default=None)
@click.option('--preset',           help='Configuration preset', metavar='STR',                         type=click.Choice(EDM2_PRESETS), default='edm2-img512-s', show_default=True)
# Hyperparameters.
@click.option('--duration',         help='Training duration', metavar='NIMG',                           type=NimgType(), default=None)
@click.option('--batch',            help='Total batch size', metavar='NIMG',                            type=NimgType(), default=None)
@click.option('--channels',         help='Channel multiplier', metavar='INT',                           type=click.IntRange(min=1), default=None)
@click.option('--dropout',          help='Dropout probability', metavar='FLOAT',                        type=click.FloatRange(min=0, max=1), default=None)
@click.option('--P_mean', 'P_mean', help='Noise level mean', metavar='FLOAT',                           type=float, default=None)
@click.option('--P_std', 'P_std',   help='Noise level standard deviation', metavar='FLOAT',             type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--lr',               help='Learning rate max. (alpha_ref)', metavar='FLOAT',             type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--decay',            help='Learning rate decay (t_ref)', metavar='BATCHES',              type=click.FloatRange(min=0), default=None)
# Performance-related options.
@click.option('--batch-gpu',        help='Limit batch size per GPU  [default: 0 = no limit]', metavar='NIMG', type=NimgType(), default=None)
@click.option('--fp16',             help='Enable mixed-precision training  [default: True]', metavar='BOOL', type=bool, default=None)
@click.option('--ls',               help='Loss scaling  [default: 1]', metavar='FLOAT',                 type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--bench',            help='Enable cuDNN benchmarking  [default: True]', metavar='BOOL',  type=bool, default=None)
@click.option('--device',           help='auto | cuda | cpu | mps  [default: auto]', metavar='STR',     type=str, default=None)
# I/O-related options.
@click.option('--status',           help='Interval of status prints  [default: 128Ki]', metavar='NIMG', type=NimgType(), default=None)
@click.option('--snapshot',         help='Interval of network snapshots  [default: 8Mi]', metavar='NIMG', type=NimgType(), default=None)
@click.option('--checkpoint',       help='Interval of training checkpoints  [default: 128Mi]', metavar='NIMG', type=NimgType(), default=None)
@click.option('--seed',             help='Random seed  [default: 0]', metavar='INT',                    type=click.IntRange(min=0), default=None)
@click.option('-n', '--dry-run',    help='Print training options and exit',                             is_flag=True)
@dnnlib.util.cli_errors
def cmdline(outdir, preset, dry_run, **opts):
    """Train diffusion models according to the EDM2 recipe from the paper
    "Analyzing and Improving the Training Dynamics of Diffusion Models".

    Examples:

    \b
    # Train XS-sized model for ImageNet-512 using 8 GPUs
    torchrun --standalone --nproc_per_node=8 train_edm2.py \\
        --outdir=training-runs/00000-edm2-img512-xs \\
        --data=datasets/img512-sd.zip \\
        --preset=edm2-img512-xs \\
        --batch-gpu=32

    \b
    # To resume training, run the same command again.
    """
    cfg = build_config(preset, **opts)
    dist.print0('Training config:')
    dist.print0(json.dumps(presets.to_json(cfg), indent=2))
    dist.print0(f'Output directory:        {outdir}')
    if dry_run:
        dist.print0('Dry run; exiting.')
        return
    device = launch.init_run(cfg)
    result = training_loop(cfg, run_dir=outdir, device=device)
    dist.print0(f'Run directory: {outdir} ({result.cur_nimg / 1e3:.1f} kimg)')


main = cmdline

if __name__ == '__main__':
    cmdline()
