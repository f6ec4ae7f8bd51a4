"""Calculate evaluation metrics (FID and FD_DINOv2): NVlabs/edm2 calculate_metrics.py, with its
subcommands, options and defaults, over the code of fid.py (training/metrics.py does the work).

Each result is printed as `<metric> = <value>`, as the reference prints it. EDM2's Python API
(`calculate_stats_for_iterable`, `calculate_metrics_from_stats`, `load_stats`, `save_stats`) is
importable from here as in EDM2 (training/edm2_metrics.py).
"""

import click

import dnnlib
from fid import parse_metric_list, report, setup_device
from torch_utils import distributed as dist
from training import detectors as detectors_lib
from training import metrics as metrics_lib
from training.edm2_metrics import calculate_metrics_from_stats, calculate_stats_for_iterable, load_stats, save_stats  # noqa: F401

METRICS_HELP = 'List of metrics to compute  [default: fid,fd_dinov2; calc/gen: those in --ref]'


def common_options(fn):
    """--metrics and the offline detector / device options of every subcommand."""
    options = [
        click.option('--metrics', help=METRICS_HELP, metavar='LIST', type=str, callback=parse_metric_list, default=None),
        click.option('--detector', help=f'Inception-v3 detector file  [default: ${detectors_lib.INCEPTION_ENV}, caches]', metavar='PATH|URL', type=str, default=None),
        click.option('--dinov2', help=f'DINOv2 ViT-L/14 weights  [default: ${detectors_lib.DINOV2_ENV}, torch hub cache]', metavar='PATH|URL', type=str, default=None),
        click.option('--device', help='Compute device', metavar='auto|cuda|cpu|mps', type=str, default='auto', show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group()
def cmdline():
    """Calculate evaluation metrics (FID and FD_DINOv2).

    Examples:

    \b
    # Generate 50000 images using 8 GPUs and save them as out/*/*.png
    torchrun --standalone --nproc_per_node=8 generate_images.py \\
        --preset=edm2-img512-xxl-guid-fid --outdir=out --subdirs --seeds=0-49999

    \b
    # Calculate metrics for a random subset of 50000 images in out/
    python calculate_metrics.py calc --images=out \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl

    \b
    # Calculate metrics directly for a given model without saving any images
    torchrun --standalone --nproc_per_node=8 calculate_metrics.py gen \\
        --net=https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-s-2147483-0.130.pkl \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl \\
        --seed=123456789

    \b
    # Compute dataset reference statistics
    python calculate_metrics.py ref --data=datasets/my-dataset.zip \\
        --dest=fid-refs/my-dataset.pkl
    """


@cmdline.command()
@click.option('--images', help='Path to the images', metavar='PATH|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path', help='Dataset reference statistics', metavar='PKL|NPZ|URL', type=str, required=True)
@click.option('--num', help='Number of images to use', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Random seed for selecting the images', metavar='INT', type=int, default=0, show_default=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers', help='Subprocesses to use for data loading', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@common_options
@dnnlib.util.cli_errors
def calc(images, ref_path, num, seed, batch, workers, metrics, detector, dinov2, device):
    """Calculate metrics for a given set of images."""
    device = setup_device(device)
    results = metrics_lib.calc(images, ref_path, metrics=metrics, num=num, seed=seed, batch_size=batch,
                               num_workers=workers, device=device, detector=detector, dinov2=dinov2)
    report(results, {}, None)
    dist.barrier()


@cmdline.command()
@click.option('--net', help='Network pickle filename', metavar='PATH|URL', type=str, required=True)
@click.option('--ref', 'ref_path', help='Dataset reference statistics', metavar='PKL|NPZ|URL', type=str, required=True)
@click.option('--num', help='Number of images to generate', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Random seed for the first image', metavar='INT', type=int, default=0, show_default=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--trust-pickle', 'trust', help='Load pickles that run their embedded code', is_flag=True)
@common_options
@dnnlib.util.cli_errors
def gen(net, ref_path, num, seed, batch, trust, metrics, detector, dinov2, device):
    """Calculate metrics for a given model using default sampler settings."""
    device = setup_device(device)
    results = metrics_lib.gen(net, ref_path, metrics=metrics, num=num, seed=seed, batch_size=batch, device=device,
                              trust=trust, detector=detector, dinov2=dinov2, sampler='edm2')  # EDM2's, for every pickle
    report(results, {}, None)
    dist.barrier()


@cmdline.command()
@click.option('--data', help='Path to the dataset', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', help='Destination file', metavar='PKL|NPZ', type=str, required=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers', help='Subprocesses to use for data loading', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@common_options
@dnnlib.util.cli_errors
def ref(data, dest, batch, workers, metrics, detector, dinov2, device):
    """Calculate dataset reference statistics for 'calc' and 'gen'."""
    device = setup_device(device)
    stats = metrics_lib.ref(data, dest, metrics=metrics, batch_size=batch, num_workers=workers, device=device,
                            detector=detector, dinov2=dinov2)
    dist.print0(f'Saved statistics of {stats["num_images"]} images to {dest}')


main = cmdline

if __name__ == '__main__':
    cmdline()
