"""Minimal example reproducing the main results of "Elucidating the Design Space of Diffusion-Based
Generative Models" (NVlabs/edm example.py): an 8x8 grid from the best published model per dataset.

    python example.py    # writes cifar10-32x32.png, ffhq-64x64.png, afhqv2-64x64.png, imagenet-64x64.png

The work is done by training/example_grid.py.
"""

import os

import click

import dnnlib
from training import example_grid


@click.command()
@click.option('--model-root', help='Folder or URL holding the published pickles', metavar='DIR|URL', type=str, default=example_grid.MODEL_ROOT, show_default=True)
@click.option('--outdir',     help='Where to write the grids', metavar='DIR', type=str, default='.', show_default=True)
@click.option('--models',     help='Which grids to make', metavar='LIST', type=str, default=','.join(example_grid.EXAMPLES), show_default=True)
@click.option('--device',     help='auto | cuda | cuda:N | cpu | mps', metavar='STR', type=str, default='auto', show_default=True)
@click.option('--trust-pickle', 'trust', help='Load pickles that run their embedded code', is_flag=True)
@dnnlib.util.cli_errors
def main(model_root, outdir, models, device, trust):
    """Generate an 8x8 image grid with the best EDM model for each dataset.

    \b
    Downloads are cached under $DNNLIB_CACHE_DIR (default ~/.cache/dnnlib); offline,
    place the pickles there or in a folder given as --model-root.
    """
    names = [name.strip() for name in models.split(',') if name.strip()]
    unknown = [name for name in names if name not in example_grid.EXAMPLES]
    if unknown or not names:
        raise click.BadParameter(f'{models!r}: choose from {", ".join(example_grid.EXAMPLES)}', param_hint='--models')
    os.makedirs(outdir, exist_ok=True)
    for name in names:
        example = example_grid.EXAMPLES[name]
        example_grid.generate_image_grid(f'{model_root.rstrip("/")}/{example.network}', os.path.join(outdir, example.dest),
                                         device=device, trust=trust, **example.sampler)


if __name__ == '__main__':
    main()
