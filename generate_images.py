"""Generate random images using the given model: NVlabs/edm2 generate_images.py, with its options and
defaults (seeds 16-19, EDM2's float32 Heun sampler with 32 steps), over the code of generate.py.

`from generate_images import generate_images` gives EDM2's programmatic API (training/edm2_generate.py).
"""

import click
import tqdm

import dnnlib
from torch_utils import distributed as dist
from training import presets_generate
from training.edm2_generate import edm_sampler, generate_images  # noqa: F401  (EDM2's importable API)
from training.sampling import StackedRandomGenerator  # noqa: F401  (EDM2 scripts import it from here)

EDM2_PRESETS = [name for name in presets_generate.PRESETS if name.startswith('edm2-')]
config_presets = {name: presets_generate.PRESETS[name] for name in EDM2_PRESETS}  # EDM2's name for the table.
parse_int_list = dnnlib.util.parse_int_list


def parse_seeds(ctx, param, value):
    """click callback: '16-19' -> [16, 17, 18, 19]."""
    try:
        return dnnlib.util.parse_int_list(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


@click.command(context_settings=dict(max_content_width=120))
@click.option('--preset',                   help='Configuration preset',                         metavar='STR',       type=click.Choice(EDM2_PRESETS), default=None)
@click.option('--net',                      help='Main network pickle filename',                 metavar='PATH|URL',  type=str, default=None)
@click.option('--gnet',                     help='Guiding network pickle filename',              metavar='PATH|URL',  type=str, default=None)
@click.option('--outdir',                   help='Where to save the output images',              metavar='DIR',       type=str, required=True)
@click.option('--subdirs',                  help='Create subdirectory for every 1000 seeds',                     is_flag=True)
@click.option('--seeds',                    help='List of random seeds (e.g. 1,2,5-10)',         metavar='LIST',      type=str, default='16-19', show_default=True, callback=parse_seeds)
@click.option('--class', 'class_idx',       help='Class label  [default: random]',               metavar='INT',       type=click.IntRange(min=0), default=None)
@click.option('--batch', 'batch_size',      help='Maximum batch size',                           metavar='INT',       type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--steps', 'num_steps',       help='Number of sampling steps  [default: 32]',      metavar='INT',       type=click.IntRange(min=2), default=None)
@click.option('--sigma_min',                help='Lowest noise level  [default: 0.002]',         metavar='FLOAT',     type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--sigma_max',                help='Highest noise level  [default: 80]',           metavar='FLOAT',     type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--rho',                      help='Time step exponent  [default: 7]',             metavar='FLOAT',     type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--guidance',                 help='Guidance strength  [default: 1; no guidance]', metavar='FLOAT',     type=float, default=None)
@click.option('--S_churn', 'S_churn',       help='Stochasticity strength  [default: 0]',         metavar='FLOAT',     type=click.FloatRange(min=0), default=None)
@click.option('--S_min', 'S_min',           help='Stoch. min noise level  [default: 0]',         metavar='FLOAT',     type=click.FloatRange(min=0), default=None)
@click.option('--S_max', 'S_max',           help='Stoch. max noise level  [default: inf]',       metavar='FLOAT',     type=click.FloatRange(min=0), default=None)
@click.option('--S_noise', 'S_noise',       help='Stoch. noise inflation  [default: 1]',         metavar='FLOAT',     type=float, default=None)
@click.option('--device',                   help='auto | cuda | cuda:N | cpu | mps',             metavar='STR',       type=str, default='auto', show_default=True)
@click.option('--trust-pickle', 'trust_pickle', help='Load pickles that run their embedded code',                is_flag=True, default=None)
@dnnlib.util.cli_errors
def cmdline(preset, **opts):
    """Generate random images using the given model.

    Examples:

    \b
    # Generate a couple of images and save them as out/*.png
    python generate_images.py --preset=edm2-img512-s-guid-dino --outdir=out

    \b
    # Generate 50000 images using 8 GPUs and save them as out/*/*.png
    torchrun --standalone --nproc_per_node=8 generate_images.py \\
        --preset=edm2-img64-s-fid --outdir=out --subdirs --seeds=0-49999
    """
    # Sampler options left at None take the defaults of EDM2's sampler (training.sampling.edm2_sampler).
    net, gnet = opts.pop('net'), opts.pop('gnet')
    if preset is None and net is None:
        raise click.UsageError('Please specify either --preset or --net')
    cfg = presets_generate.build_config(preset, sampler='edm2', net=net, gnet=gnet, **opts)
    dist.init(cfg.device if cfg.device not in (None, 'auto') else None)
    # As EDM2 does: every PNG is (re)written; generate.py instead resumes, skipping those present.
    batches = generate_images(cfg.net, gnet=cfg.gnet, outdir=cfg.outdir, subdirs=cfg.subdirs, seeds=cfg.seeds,
                              class_idx=cfg.class_idx, max_batch_size=cfg.batch_size, device=cfg.device,
                              trust=cfg.trust_pickle, **cfg.sampler_kwargs())
    for _batch in tqdm.tqdm(batches, unit='batch', disable=(dist.get_rank() != 0)):
        pass
    dist.print0('Done.')


main = cmdline

if __name__ == '__main__':
    cmdline()
