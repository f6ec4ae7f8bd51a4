"""Calculate FID, FD_DINOv2 and precision/recall (NVlabs/edm fid.py + NVlabs/edm2 calculate_metrics.py).

The math lives in training/metrics.py and training/detectors.py; this script parses options.
"""

from __future__ import annotations

import click

import dnnlib

# Imported on first use: --help and option errors come back without loading torch.
torch = dnnlib.util.LazyModule('torch')
dist = dnnlib.util.LazyModule('torch_utils.distributed')
misc = dnnlib.util.LazyModule('torch_utils.misc')
detectors_lib = dnnlib.util.LazyModule('training.detectors')
metrics_lib = dnnlib.util.LazyModule('training.metrics')
INCEPTION_ENV, DINOV2_ENV, VGG16_ENV = 'EDM_FID_DETECTOR', 'EDM_DINOV2_WEIGHTS', 'EDM_VGG16_DETECTOR'  # training/detectors.py reads these
# training/metrics.py's choices and PRConfig defaults, for --help (tests/test_help.py checks they agree).
PR_DETECTORS, PR_DTYPES = ('inception', 'vgg16'), ('float32', 'float16')
PR_DEFAULTS = dict(nhood_size=3, dtype='float32', row_batch_size=10000, col_batch_size=10000)

#----------------------------------------------------------------------------

def parse_metric_list(ctx, param, value):
    """click callback: 'fid,pr' -> ['fid', 'pr']; None keeps the file-dependent default."""
    if value is None:
        return None
    try:
        return metrics_lib.parse_metrics(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None

def setup_device(name: str) -> torch.device:
    """--device -> torch.device for this rank; fp32 feature extraction everywhere (TF32 off, logged)."""
    device = dist.device_for_rank(misc.choose_device(name))
    dist.init(device)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        dist.print0('TF32 disabled: features are computed in full fp32.')
    return device

def report(results: list[dict], context: dict, metrics_file: str | None) -> None:
    """Print each repeat's values (and min/mean over repeats); append JSON lines to --metrics-file."""
    if dist.get_rank() != 0:
        return
    records = []
    for repeat, result in enumerate(results):
        values = {k: v for k, v in result.items() if isinstance(v, float)}
        tag = f'[repeat {repeat}] ' if len(results) > 1 else ''
        for name, value in values.items():
            print(f'{tag}{name} = {value:g}')
            extra = {k: v for k, v in result.items() if k not in values}
            records.append(dict(context, **extra, repeat=repeat, metric=name, value=value))
    if len(results) > 1:
        for name, summary in metrics_lib.summarize(results).items():
            print(f'{name}: min = {summary["min"]:g}, mean = {summary["mean"]:g} over {len(results)} repeats')
            records.append(dict(context, metric=name, repeats=len(results), **summary))
    if metrics_file is not None:
        metrics_lib.append_jsonl(metrics_file, records)

#----------------------------------------------------------------------------

def common_options(metrics_default: str):
    """Options shared by calc, gen and ref; `metrics_default` says what --metrics falls back to."""
    return lambda fn: _add_common_options(fn, metrics_default)

def _add_common_options(fn, metrics_default: str):
    options = [
        click.option('--metrics', help=f'Metrics to compute: fid, fd_dinov2, pr  [default: {metrics_default}]', metavar='LIST', type=str, callback=parse_metric_list, default=None),
        click.option('--detector', help=f'Inception-v3 detector file (.pkl or TorchScript) [default: ${INCEPTION_ENV}, caches]', metavar='PATH|URL', type=str, default=None),
        click.option('--dinov2', help=f'DINOv2 ViT-L/14 weights (.pth) [default: ${DINOV2_ENV}, torch hub cache]', metavar='PATH|URL', type=str, default=None),
        click.option('--device', help='Compute device', metavar='auto|cuda|cpu|mps', type=str, default='auto', show_default=True),
        click.option('--pr-detector', help='Features of precision/recall: inception, or vgg16 (StyleGAN2-ADA, ddpm-torch)', metavar='NAME', type=click.Choice(PR_DETECTORS), default='inception', show_default=True),
        click.option('--vgg16', help=f'NVIDIA vgg16.pt (or a state_dict in its layout) for --pr-detector=vgg16 [default: ${VGG16_ENV}, torch hub dir, caches]', metavar='PATH|URL', type=str, default=None),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn

def repeat_options(fn):
    """Options of the commands that measure (calc, gen)."""
    options = [
        click.option('--repeats', help='Measure this many disjoint image sets; report each, min and mean', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True),
        click.option('--metrics-file', help='Append one JSON line per result to this file', metavar='JSONL', type=str, default=None),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn

def pr_options(fn):
    """Precision/recall settings of calc and gen, named as in tqch/ddpm-torch eval.py."""
    defaults = dnnlib.EasyDict(PR_DEFAULTS)
    options = [
        click.option('--nhood-size', help=f'k of the k-NN balls of precision/recall  [default: {defaults.nhood_size}]', metavar='INT', type=click.IntRange(min=1), default=None),
        click.option('--pr-dtype', help=f'P/R distance arithmetic: float32 (torch-fidelity) or float16 (ddpm-torch eval.py)  [default: {defaults.dtype}]', metavar='float32|float16', type=click.Choice(PR_DTYPES), default=None),
        click.option('--row-batch-size', help=f'Rows per block of P/R distances (memory only)  [default: {defaults.row_batch_size}]', metavar='INT', type=click.IntRange(min=1), default=None),
        click.option('--col-batch-size', help=f'Columns per block of P/R distances (memory only)  [default: {defaults.col_batch_size}]', metavar='INT', type=click.IntRange(min=1), default=None),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn

def build_pr_config(nhood_size, pr_dtype, row_batch_size, col_batch_size) -> metrics_lib.PRConfig | None:
    """PRConfig from the options given; None when none was (then P/R, if computed, uses the defaults)."""
    opts = dict(nhood_size=nhood_size, dtype=pr_dtype, row_batch_size=row_batch_size, col_batch_size=col_batch_size)
    given = {k: v for k, v in opts.items() if v is not None}
    return metrics_lib.PRConfig(**given) if given else None

def pr_context(pr: metrics_lib.PRConfig | None, pr_detector: str) -> dict:
    """What --metrics-file records about the P/R settings that were given."""
    context = {} if pr is None else dict(nhood_size=pr.nhood_size, pr_dtype=pr.dtype)
    return context if pr_detector == 'inception' else dict(context, pr_detector=pr_detector)

#----------------------------------------------------------------------------

@click.group()
def main():
    """Calculate evaluation metrics (FID, FD_DINOv2, precision/recall, linear probe).

    Examples:

    \b
    # FID of 50000 generated images against CIFAR-10 (EDM)
    torchrun --standalone --nproc_per_node=1 fid.py calc --images=fid-tmp \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    \b
    # Metrics of a model without saving images (EDM2)
    torchrun --standalone --nproc_per_node=8 fid.py gen --net=edm2-img512-s.pkl \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl --seed=123456789

    \b
    # Dataset reference statistics: .npz (EDM, FID) or .pkl (EDM2, FID + FD_DINOv2)
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz

    \b
    # Linear-probe accuracy of a denoiser's features (CIFAR EDM2 reimplementation)
    torchrun --standalone --nproc_per_node=4 fid.py probe --net=network-snapshot.pkl \\
        --data=datasets/cifar10-32x32.zip --test-data=datasets/cifar10-test.zip
    """

#----------------------------------------------------------------------------

@main.command()
@click.option('--images', help='Images to evaluate', metavar='PATH|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path', help='Reference statistics', metavar='NPZ|PKL|URL', type=str, required=True)
@click.option('--num', help='Number of images to use', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Random seed for selecting the images', metavar='INT', type=int, default=0, show_default=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers', help='Subprocesses for data loading', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@common_options('those in --ref')
@pr_options
@repeat_options
@dnnlib.util.cli_errors
def calc(images, ref_path, num, seed, batch, workers, metrics, detector, dinov2, device, pr_detector, vgg16, repeats, metrics_file, **pr_opts):
    """Calculate metrics for a folder or zip of images."""
    pr = build_pr_config(**pr_opts)
    device = setup_device(device)
    results = metrics_lib.calc(images, ref_path, metrics=metrics, num=num, seed=seed, repeats=repeats, batch_size=batch,
                               num_workers=workers, device=device, detector=detector, dinov2=dinov2, pr=pr,
                               pr_detector=pr_detector, vgg16=vgg16)
    report(results, dict(command='calc', images=images, ref=ref_path, seed=seed, **pr_context(pr, pr_detector)), metrics_file)
    dist.barrier()

#----------------------------------------------------------------------------

@main.command()
@click.option('--net', help='Network pickle', metavar='PKL|URL', type=str, required=True)
@click.option('--gnet', help='Guiding network pickle (autoguidance)  [default: none]', metavar='PKL|URL', type=str, default=None)
@click.option('--guidance', help='Guidance strength  [default: sampler default]', metavar='FLOAT', type=float, default=None)
@click.option('--steps', 'num_steps', help='Sampler steps  [default: sampler default]', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--trust-pickle', 'trust', help='Load pickles that run their embedded code', is_flag=True, default=False)
@click.option('--ref', 'ref_path', help='Reference statistics', metavar='NPZ|PKL|URL', type=str, required=True)
@click.option('--num', help='Number of images to generate', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Random seed of the first image', metavar='INT', type=int, default=0, show_default=True)
@click.option('--batch', help='Maximum batch size per process', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--precision', 'gen_precision', help='Precision of the networks and the VAE decoder while generating (bf16 = autocast)', type=click.Choice(['fp32', 'bf16']), default='fp32', show_default=True)
@click.option('--compile', 'gen_compile', help='torch.compile the networks while generating', is_flag=True)
@click.option('--fast', 'gen_fast', help='Generate with bf16 + --compile where the device runs them (docs/performance.md)', is_flag=True)
@common_options('those in --ref')
@pr_options
@repeat_options
@dnnlib.util.cli_errors
def gen(net, gnet, guidance, num_steps, trust, ref_path, num, seed, batch, gen_precision, gen_compile, gen_fast, metrics, detector,
        dinov2, device, pr_detector, vgg16, repeats, metrics_file, **pr_opts):
    """Calculate metrics for a network with default sampler settings, generating images on the fly."""
    from training import speed
    pr = build_pr_config(**pr_opts)
    device = setup_device(device)
    bf16, compile_ = speed.usable_switches(device, gen_fast, gen_fast or gen_precision == 'bf16', gen_fast or gen_compile,
                                           '--precision=bf16')
    sampler_kwargs = {k: v for k, v in dict(guidance=guidance, num_steps=num_steps).items() if v is not None}
    sampler_kwargs.update(precision='bf16' if bf16 else 'fp32', compile=compile_)
    results = metrics_lib.gen(net, ref_path, metrics=metrics, num=num, seed=seed, repeats=repeats, batch_size=batch,
                              device=device, gnet=gnet, trust=trust, detector=detector, dinov2=dinov2, pr=pr,
                              pr_detector=pr_detector, vgg16=vgg16, **sampler_kwargs)
    report(results, dict(command='gen', net=net, gnet=gnet, ref=ref_path, **sampler_kwargs, **pr_context(pr, pr_detector)), metrics_file)
    dist.barrier()

#----------------------------------------------------------------------------

@main.command()
@click.option('--data', help='Dataset', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', help='Destination statistics file', metavar='NPZ|PKL', type=str, required=True)
@click.option('--seed', help='Random seed for the precision/recall feature subset', metavar='INT', type=int, default=0, show_default=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers', help='Subprocesses for data loading', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@common_options('fid for .npz, fid,fd_dinov2 for .pkl')
@dnnlib.util.cli_errors
def ref(data, dest, seed, batch, workers, metrics, detector, dinov2, device, pr_detector, vgg16):
    """Calculate dataset reference statistics for 'calc' and 'gen'."""
    device = setup_device(device)
    stats = metrics_lib.ref(data, dest, metrics=metrics, seed=seed, batch_size=batch, num_workers=workers,
                            device=device, detector=detector, dinov2=dinov2, pr_detector=pr_detector, vgg16=vgg16)
    dist.print0(f'Saved statistics of {stats["num_images"]} images to {dest}')

#----------------------------------------------------------------------------

@main.command()
@click.option('--net', help='Network pickle, or a FutureXiang/edm2 model_<ep>.pth (with --reference-config)', metavar='PKL|PTH|URL', type=str, required=True)
@click.option('--data', help='Labelled training split', metavar='PATH|ZIP', type=str, required=True)
@click.option('--test-data', help='Labelled test split', metavar='PATH|ZIP', type=str, required=True)
@click.option('--reference-config', help='Configuration of a .pth checkpoint, e.g. cifar10-e', metavar='NAME', type=str, default=None)
@click.option('--weights', help='Weights of a .pth checkpoint', type=click.Choice(['ema', 'online', 'model']), default='ema', show_default=True)
@click.option('--t', 't', help='Noise index into the reversed 18-step schedule  [default: 4 at 32x32, 5 above]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--block', help='Decoder block whose pooled output is probed  [default: out_6]', metavar='out_K', type=str, default=None)
@click.option('--grid', help='Every t in 3,4,5 x every decoder block; report the best', is_flag=True, default=False)
@click.option('--epochs', help='Classifier epochs  [default: 15]', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--batch', 'batch_size', help='Images per process per step  [default: 128]', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--lr', help='Adam learning rate per process, times the process count  [default: 0.001]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--flip/--no-flip', help='Random x-flips of the training images  [default: flip]', default=None)
@click.option('--seed', help='Seed of noise, flips, order and classifier init  [default: 1337]', metavar='INT', type=int, default=None)
@click.option('--precision', help='Feature precision; auto = bf16 on CUDA where supported  [default: auto]', type=click.Choice(['auto', 'bf16', 'fp32']), default=None)
@click.option('--workers', help='Subprocesses for data loading  [default: 1]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--trust-pickle', 'trust', help='Load pickles that run their embedded code', is_flag=True, default=False)
@click.option('--device', help='Compute device', metavar='auto|cuda|cpu|mps', type=str, default='auto', show_default=True)
@click.option('--metrics-file', help='Append one JSON line with the result to this file', metavar='JSONL', type=str, default=None)
@dnnlib.util.cli_errors
def probe(net, data, test_data, reference_config, weights, trust, device, metrics_file, **options):
    """Linear-probe accuracy of a denoiser's features (FutureXiang/edm2 linear.py)."""
    from training import probe as probe_lib
    device = setup_device(device)
    cfg = probe_lib.build_config(**options)
    result = probe_lib.probe(net, data, test_data, cfg, device, trust=trust, reference_config=reference_config, weights=weights)
    context = dict(command='probe', net=net, data=data, test_data=test_data, **{k: v for k, v in result.items() if k != 'probe_acc'})
    report([dict(probe_acc=result['probe_acc'])], context, metrics_file)
    if 'grid' in result:
        dist.print0('\n'.join(f'  {name}: {acc:.2f}' for name, acc in result['grid'].items()))
    dist.barrier()

#----------------------------------------------------------------------------

cmdline = main # EDM2's name for the group

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
