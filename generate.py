"""Generate images with a trained diffusion model: the union of NVlabs/edm generate.py,
NVlabs/edm2 generate_images.py (presets, guidance / autoguidance, ablation and classic samplers)
and tqch/ddpm-torch generate.py (DDPM .pt checkpoints: ancestral or DDIM sampling)."""

import dataclasses
import json

import click

import dnnlib
from training import presets_generate

# Imported on first use: --help and option errors come back without loading torch.
dist = dnnlib.util.LazyModule('torch_utils.distributed')
sampling = dnnlib.util.LazyModule('training.sampling')


def parse_seeds(ctx, param, value):
    """click callback: '0-63,100' -> [0, ..., 63, 100]."""
    if value is None:
        return None
    try:
        return dnnlib.util.parse_int_list(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


@click.command(context_settings=dict(max_content_width=120))
@click.option('--preset',                   help='Configuration preset (EDM2 / autoguidance / EDM)', metavar='STR', type=click.Choice(list(presets_generate.PRESETS)))
@click.option('--network', '--net', 'net',  help='Main network pickle or training state  [default: every training-state-*.pt in --outdir]', metavar='PKL|PT|URL', type=str)
@click.option('--gnet',                     help='Guiding network pickle (for --guidance)', metavar='PKL|URL',   type=str)
@click.option('--guidance',                 help='Guidance weight  [default: 1 = no guidance]', metavar='FLOAT', type=float)
@click.option('--outdir',                   help='Where to save the images', metavar='DIR',                      type=str)
@click.option('--subdirs',                  help='Create a subfolder for every 1000 seeds',                      is_flag=True, default=None)
@click.option('--grid',                     help='Also save all images tiled into one PNG', metavar='PNG',        type=str)
@click.option('--seeds',                    help='Random seeds, e.g. 1,2,5-10  [default: 0-63]', metavar='LIST', type=str, callback=parse_seeds)
@click.option('--class', 'class_idx',       help='Class label  [default: random]', metavar='INT',                type=int)
@click.option('--batch', 'batch_size',      help='Maximum batch size  [default: 32]', metavar='INT',             type=int)
@click.option('--sampler',                  help='Sampler  [default: edm, or ablation with --solver/--disc/--schedule/--scaling]', type=click.Choice(list(presets_generate.SAMPLER_NAMES)))
@click.option('--steps', 'num_steps',       help='Number of sampling steps  [default: sampler\'s]', metavar='INT', type=click.IntRange(min=2))
@click.option('--sigma_min',                help='Lowest noise level  [default: sampler\'s]', metavar='FLOAT',   type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_max',                help='Highest noise level  [default: sampler\'s]', metavar='FLOAT',  type=click.FloatRange(min=0, min_open=True))
@click.option('--rho',                      help='Time step exponent  [default: 7]', metavar='FLOAT',            type=click.FloatRange(min=0, min_open=True))
@click.option('--S_churn', 'S_churn',       help='Stochasticity strength  [default: 0]', metavar='FLOAT',        type=click.FloatRange(min=0))
@click.option('--S_min', 'S_min',           help='Stoch. min noise level  [default: 0]', metavar='FLOAT',        type=click.FloatRange(min=0))
@click.option('--S_max', 'S_max',           help='Stoch. max noise level  [default: inf]', metavar='FLOAT',      type=click.FloatRange(min=0))
@click.option('--S_noise', 'S_noise',       help='Stoch. noise inflation  [default: 1]', metavar='FLOAT',        type=float)
@click.option('--solver',                   help='Ablate ODE solver', type=click.Choice(['euler', 'heun']))
@click.option('--disc', 'discretization',   help='Ablate time step discretization {t_i}', type=click.Choice(['vp', 've', 'iddpm', 'edm']))
@click.option('--schedule',                 help='Ablate noise schedule sigma(t)', type=click.Choice(['vp', 've', 'linear']))
@click.option('--scaling',                  help='Ablate signal scaling s(t)', type=click.Choice(['vp', 'none']))
@click.option('--eta',                      help='DDIM / DPM-Solver++ stochasticity', metavar='FLOAT',           type=click.FloatRange(min=0))
@click.option('--use-ddim', 'use_ddim',     help='DDPM .pt: DDIM sampling (= --sampler=ddim)',                    is_flag=True, default=None)
@click.option('--skip-schedule',            help='DDPM .pt, DDIM: timestep subsequence  [default: linear]',       type=click.Choice(['linear', 'quadratic']))
@click.option('--subseq-size',              help='DDPM .pt, DDIM: number of timesteps  [default: 50]', metavar='INT', type=int)
@click.option('--use-ema', 'use_ema',       help='DDPM .pt: EMA weights (ema.shadow) instead of model',          is_flag=True, default=None)
@click.option('--dataset',                  help='DDPM .pt without config: reference config of the published checkpoint', type=click.Choice(['cifar10', 'celeba', 'celebahq']))
@click.option('--device',                   help='auto | cuda | cuda:N | cpu | mps  [default: auto]',            type=str)
@click.option('--precision',                help='Precision of the networks and the VAE decoder (bf16 = autocast)  [default: fp32]',         type=click.Choice(['fp32', 'bf16']))
@click.option('--channels-last', 'channels_last', help='Channels-last weights and inputs (slower for DDPM++ on an H200: docs/performance.md)', is_flag=True, default=None)
@click.option('--compile',                  help='torch.compile the networks', is_flag=True, default=None)
@click.option('--fast',                     help='Fastest measured set: bf16 + --compile where the device runs them (docs/performance.md)', is_flag=True, default=None)
@click.option('--batched-guidance', 'batched_guidance', help='net and gnet in one batched call (same architecture) or overlapped on CUDA streams', is_flag=True, default=None)
@click.option('--ckpt',                     help='Without --network: first training state (kimg)  [default: 0]', metavar='KIMG', type=int)
@click.option('--end_ckpt', 'end_ckpt',     help='Without --network: last training state (kimg)  [default: newest]', metavar='KIMG', type=int)
@click.option('--trust-pickle', 'trust_pickle', help='Load pickles that run their embedded code',              is_flag=True, default=None)
@click.option('--dry-run', 'dry_run',       help='Print the resolved config and exit',                          is_flag=True)
@dnnlib.util.cli_errors
def main(preset, dry_run, use_ddim, **opts):
    """Generate random images using the given model.

    Examples:

    \b
    # 64 images from EDM's class-conditional CIFAR-10 model, saved as out/*.png
    python generate.py --outdir=out --seeds=0-63 --batch=64 \\
        --network=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl

    \b
    # EDM2 with autoguidance, as one grid image
    python generate.py --preset=edm2-img512-s-autog-fid --seeds=0-15 --grid=grid.png

    \b
    # DDPM checkpoint of tqch/ddpm-torch: DDIM, 100 quadratic steps, EMA weights
    python generate.py --net=chkpts/ddpm_cifar10.pt --dataset=cifar10 --use-ema --use-ddim \\
        --skip-schedule=quadratic --subseq-size=100 --outdir=out --seeds=0-63

    \b
    # STF fork: 50000 images from every training-state-*.pt of a run, in training-runs/exp_name/ckpt_<kimg>
    torchrun --standalone --nproc_per_node=8 generate.py --outdir=training-runs/exp_name --seeds=0-49999

    \b
    # 50000 images on 8 GPUs, for FID
    torchrun --standalone --nproc_per_node=8 generate.py --preset=edm2-img64-s-fid \\
        --outdir=out --subdirs --seeds=0-49999
    """
    if use_ddim:
        if opts['sampler'] not in (None, 'ddim'):
            raise click.BadParameter(f'--use-ddim means --sampler=ddim, but --sampler={opts["sampler"]} was given',
                                     param_hint='--use-ddim')
        opts['sampler'] = 'ddim'
    cfg = presets_generate.build_config(preset, **opts)
    if dry_run:
        fields = dataclasses.asdict(cfg)
        fields['seeds'] = f'{len(cfg.seeds)} seeds ({cfg.seeds[0]}..{cfg.seeds[-1]})'
        click.echo(json.dumps(fields, indent=2))
        return
    dist.init(cfg.device if cfg.device not in (None, 'auto') else None)
    sampling.generate_from_config(cfg)


if __name__ == '__main__':
    main()
