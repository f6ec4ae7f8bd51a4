"""Make datasets for training: convert image data to PNG folders/zips, encode them to VAE latents, decode back.

    python dataset_tool.py convert --source=downloads/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
    python dataset_tool.py --source=downloads/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip  # EDM form
    python dataset_tool.py convert --source=imagenet/train --dest=datasets/img512.zip \\
        --resolution=512x512 --transform=center-crop-dhariwal
    python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
    python dataset_tool.py decode --source=datasets/img512-sd.zip --dest=out/img512-decoded.zip
    python dataset_tool.py convert --source=downloads/celeba --dest=datasets/celeba-64x64.zip --ddpm-dataset=celeba
"""

import os
import sys

import click

import dnnlib
from training import dataset_convert
from training.dataset_ddpm import DDPM_DATASETS

#----------------------------------------------------------------------------

def _parse_resolution(_ctx, _param, value):
    if value is None:
        return None
    try:
        return dataset_convert.parse_resolution(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None

def _convert_options(fn):
    """Options shared by `convert` and the EDM form without subcommand."""
    opts = [
        click.option('--source',     help='Input folder or archive', metavar='PATH', type=str, required=True),
        click.option('--dest',       help='Output folder or .zip', metavar='PATH', type=str, required=True),
        click.option('--max-images', help='Read at most this many input images', metavar='INT', type=click.IntRange(min=0)),
        click.option('--transform',  help='Crop/resize mode: ' + ', '.join(dataset_convert.TRANSFORMS), metavar='MODE',
                     type=click.Choice(dataset_convert.TRANSFORMS)),
        click.option('--resolution', help='Output resolution, e.g. 64x64', metavar='WxH', type=str, callback=_parse_resolution),
        click.option('--workers',    help='Processes for decoding/encoding  [default: one per core]', metavar='INT', type=click.IntRange(min=1)),
        click.option('--ddpm-dataset', help='Prepare as tqch/ddpm-torch does: ' + ', '.join(DDPM_DATASETS), metavar='NAME',
                     type=click.Choice(DDPM_DATASETS)),
        click.option('--force',      help='Replace an existing --dest (a .zip, or a folder with a dataset.json)', is_flag=True),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn

def _run_convert(rgb: bool, **opts) -> None:
    if int(os.environ.get('WORLD_SIZE', '1')) != 1:
        raise click.ClickException('convert runs in one process; start it without torchrun (it uses --workers processes)')
    count = dataset_convert.convert_dataset(rgb=rgb, **opts)
    click.echo(f'Wrote {count} images to {opts["dest"]}')

class _Cli(click.Group):
    """Subcommands, plus the EDM command line without one: `dataset_tool.py --source=... --dest=...`."""

    def parse_args(self, ctx, args):
        if args and args[0].startswith('--') and args[0] != '--help':
            args = ['convert-edm'] + list(args)
        return super().parse_args(ctx, args)

@click.group(cls=_Cli)
def cmdline():
    """Dataset tool: convert image data to PNG datasets, encode them to VAE latents, decode latents to images.

    \b
    Input formats guessed from --source:
      path/                          all images below path/ (labels: dataset.json or top-level folders)
      dataset.zip                    all images in the zip (labels: its dataset.json)
      cifar-10-python.tar.gz         CIFAR-10 training set;  cifar-100-python.tar.gz: CIFAR-100
      train-images-idx3-ubyte.gz     MNIST (padded to 32x32)
      *_lmdb/                        LSUN (needs `pip install lmdb`)
    Output (--dest): a folder or an uncompressed .zip with 00000/img00000000.png ... and
    dataset.json = {"labels": [["00000/img00000000.png", 6], ...]} or {"labels": null}.
    Output images must be square with a power-of-two side; use --resolution and --transform.
    --ddpm-dataset=mnist|cifar10|celeba|celebahq prepares MNIST (bilinear to 32x32), CIFAR-10,
    CelebA (148x148 crop, bilinear to 64x64) and CelebA-HQ (ProGAN order) as tqch/ddpm-torch does.

    \b
    EDM form: without a command, `dataset_tool.py --source=... --dest=...` (EDM's command line) runs
    `convert-edm`, the same options as `convert` but grayscale images stay grayscale, as in EDM;
    `convert` stores every image as RGB, as in EDM2.
    """

@cmdline.command()
@_convert_options
@dnnlib.util.cli_errors
def convert(**opts):
    """Convert images to a PNG dataset (EDM2 semantics: every image stored as RGB)."""
    _run_convert(rgb=True, **opts)

@cmdline.command(name='convert-edm', hidden=True)
@_convert_options
@dnnlib.util.cli_errors
def convert_edm(**opts):
    """Convert images to a PNG dataset (EDM semantics: grayscale images stay grayscale)."""
    _run_convert(rgb=False, **opts)

#----------------------------------------------------------------------------

def _vae_options(fn):
    """Options shared by `encode` and `decode`."""
    opts = [
        click.option('--model', '--model-url', 'model', help='VAE: Hugging Face name or local diffusers folder', metavar='NAME|PATH',
                     type=str, default='stabilityai/sd-vae-ft-mse', show_default=True),
        click.option('--source',     help='Input folder or archive', metavar='PATH', type=str, required=True),
        click.option('--dest',       help='Output folder or .zip', metavar='PATH', type=str, required=True),
        click.option('--max-images', help='Process at most this many items', metavar='INT', type=click.IntRange(min=0)),
        click.option('--batch',      help='Items per VAE call', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True),
        click.option('--precision',  help='VAE arithmetic: tf32 = TF32 convolutions, torch\'s default, which the reference runs; fp32 without TF32; bf16/fp16 autocast (CUDA)', type=click.Choice(['tf32', 'fp32', 'bf16', 'fp16']), default='tf32', show_default=True),
        click.option('--device',     help='auto, cpu, cuda, cuda:N or mps', metavar='STR', type=str, default='auto', show_default=True),
        click.option('--workers',    help='DataLoader processes reading the input', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn

def _echo0(text: str) -> None:
    if int(os.environ.get('RANK', '0')) == 0:
        click.echo(text)

@cmdline.command()
@_vae_options
@dnnlib.util.cli_errors
def encode(**opts):
    """Encode images to SD-VAE latents (.npy mean+std per image); resumable, runs under torchrun."""
    from training import dataset_encode
    count = dataset_encode.encode_dataset(**opts)
    _echo0(f'{opts["dest"]} holds the latents of {count} images')

@cmdline.command()
@_vae_options
@click.option('--seed', help='Seed of the posterior samples', metavar='INT', type=int, default=0, show_default=True)
@dnnlib.util.cli_errors
def decode(**opts):
    """Decode .npy latents to PNG images (one posterior sample each, seeded per image)."""
    from training import dataset_encode
    count = dataset_encode.decode_dataset(**opts)
    _echo0(f'{opts["dest"]} holds {count} decoded images')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cmdline(sys.argv[1:])

#----------------------------------------------------------------------------
