"""Parameter and FLOP counts of a network, per forward pass (2 FLOPs per multiply-add).

Usage: python -m training.flops NET_OR_PRESET [--batch N]
  NET_OR_PRESET is a network pickle (path or URL; the 'ema' entry of a training snapshot is used)
  or a preset name such as ddpmpp-cifar10 or edm2-img512-s.

Counting uses torch.utils.flop_counter.FlopCounterMode, which counts matmuls, convolutions and
attention (elementwise ops and normalizations are not counted, as in the EDM2 paper's Table 2).
Presets are built on the meta device, so even the largest is counted in seconds.
"""

import collections

import click
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import dnnlib
from training import networks, networks_edm2

#----------------------------------------------------------------------------
# EDM network presets (EDM train.py --arch/--precond/--cres/--augment/--dropout as in the EDM README).

_DDPMPP = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
    channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2])
_NCSNPP = dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
    channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2])
_ADM = dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4])
_CIFAR = dict(img_resolution=32, img_channels=3, augment_dim=9)
_64PX = dict(img_resolution=64, img_channels=3, augment_dim=9, channel_mult=[1, 2, 2, 2])

EDM_PRESETS = {
    'ddpmpp-cifar10':           dict(_DDPMPP, **_CIFAR, label_dim=10, dropout=0.13),
    'ddpmpp-cifar10-uncond':    dict(_DDPMPP, **_CIFAR, label_dim=0, dropout=0.13),
    'ncsnpp-cifar10':           dict(_NCSNPP, **_CIFAR, label_dim=10, dropout=0.13),
    'ncsnpp-cifar10-uncond':    dict(_NCSNPP, **_CIFAR, label_dim=0, dropout=0.13),
    'ddpmpp-ffhq64':            dict(_DDPMPP, **_64PX, label_dim=0, dropout=0.05),
    'ddpmpp-afhqv2-64':         dict(_DDPMPP, **_64PX, label_dim=0, dropout=0.25),
    'ncsnpp-ffhq64':            dict(_NCSNPP, **_64PX, label_dim=0, dropout=0.05),
    'ncsnpp-afhqv2-64':         dict(_NCSNPP, **_64PX, label_dim=0, dropout=0.25),
    'adm-imagenet64':           dict(_ADM, img_resolution=64, img_channels=3, label_dim=1000, dropout=0.10, use_fp16=True),
}


def preset_names() -> list[str]:
    """Every preset accepted by build_preset()."""
    return sorted(EDM_PRESETS) + sorted(networks_edm2.PRESETS)


def build_preset(name: str, device: torch.device | str = 'meta') -> torch.nn.Module:
    """Construct a preset network (EDMPrecond for EDM presets, EDM2 Precond for edm2-*) on `device`."""
    with torch.device(device):
        if name in EDM_PRESETS:
            return networks.EDMPrecond(**EDM_PRESETS[name])
        if name.lower().startswith('edm2-'):
            return networks_edm2.build_preset(name)
    raise ValueError(f'unknown preset {name!r}; choose one of {preset_names()}')

#----------------------------------------------------------------------------

def example_inputs(net: torch.nn.Module, batch: int = 1) -> tuple:
    """Zero image, unit sigma and zero labels matching a precond wrapper or backbone of this project."""
    tensor = next(iter(net.parameters()), None)
    device = tensor.device if tensor is not None else torch.device('cpu')
    channels = getattr(net, 'img_channels', getattr(net, 'in_channels', None))
    resolution = getattr(net, 'img_resolution', None)
    if channels is None or resolution is None:
        raise ValueError(f'{type(net).__name__} is not a network of this project (no img_resolution / channel count)')
    label_dim = getattr(net, 'label_dim', None)
    if label_dim is None:  # EDM backbones record their label size only in map_label
        label_dim = net.map_label.in_features if getattr(net, 'map_label', None) is not None else 0
    x = torch.zeros([batch, channels, resolution, resolution], device=device)
    sigma = torch.ones([batch], device=device)
    labels = torch.zeros([batch, label_dim], device=device) if label_dim else None
    return x, sigma, labels


def count_flops(net: torch.nn.Module, batch: int = 1) -> tuple[int, int]:
    """(parameter count, FLOPs of one eval-mode forward pass at `batch`), 2 FLOPs per multiply-add."""
    params = sum(p.numel() for p in net.parameters())
    was_training = net.training
    net.eval()
    try:
        # The reference kernels are counted on every device (fused SDPA kernels are not registered everywhere), and
        # its depthwise resampling convolutions count as the reference code counts them.
        with networks.reference_kernels(), FlopCounterMode(display=False) as counter, torch.no_grad():
            net(*example_inputs(net, batch))
    finally:
        net.train(was_training)
    return params, counter.get_total_flops()


class _OpCalls(TorchDispatchMode):
    """Counts the calls of every aten op below it."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[f'aten::{func.overloadpacket.__name__}'] += 1
        return func(*args, **(kwargs or {}))


def op_breakdown(net: torch.nn.Module, batch: int = 1) -> dnnlib.EasyDict:
    """Per-op call counts and multiply-adds of one eval-mode forward, in the layout of EDM2 count_flops.py's result.

    EDM2 counts one multiply-add as one flop (its paper's Gflops); `op_flops` follows that, so it is half of
    `count_flops()`. Ops without multiply-adds (elementwise, normalisation) are pooled under 'Other'.
    """
    was_training = net.training
    net.eval()
    try:
        with networks.reference_kernels(), FlopCounterMode(display=False) as counter, _OpCalls() as calls, torch.no_grad():
            net(*example_inputs(net, batch))
    finally:
        net.train(was_training)
    res = dnnlib.EasyDict(op_count=collections.Counter(), op_flops=collections.Counter())
    macs = {f'aten::{op.__name__}': flops / 2 for op, flops in counter.get_flop_counts().get('Global', {}).items()}
    for op, count in calls.calls.items():
        label = op if macs.get(op, 0) > 0 else 'Other'
        res.op_count[label] += count
        res.op_flops[label] += macs.get(op, 0)
    res.total_params = sum(p.numel() for p in net.parameters())
    res.total_flops = sum(res.op_flops.values()) / batch
    return res


def format_edm2_report(res: dnnlib.EasyDict, mem_per_sample: float | None = None) -> str:
    """The table EDM2 count_flops.py prints: parameters, Gflops/sample, GPU memory, then one line per op."""
    mem = f'{mem_per_sample / 2**30:<8.2f}' if mem_per_sample is not None else f'{"n/a":<8s}'
    lines = ['', f'{"Parameters":<12s}{res.total_params / 1e6:<8.2f}M', f'{"Compute":<12s}{res.total_flops / 1e9:<8.2f}Gflops/sample',
             f'{"GPU memory":<12s}{mem}GB/sample', '', f'{"Op":<26s}{"Count":<7s}{"Gflops":s}']
    for op, flops in sorted(res.op_flops.items(), key=lambda item: -item[1]):
        lines.append(f'{op:<26s}{res.op_count[op]:<7d}{flops / 1e9:.2f}')
    lines += [f'{"Total":<26s}{sum(res.op_count.values()):<7d}{sum(res.op_flops.values()) / 1e9:.2f}', '']
    return '\n'.join(lines)


def peak_memory_per_sample(net: torch.nn.Module, device: torch.device) -> float | None:
    """Peak CUDA memory of one batch-1 forward pass beyond what was allocated before; None off CUDA."""
    if device.type != 'cuda':
        return None
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.max_memory_allocated(device)
    with networks.reference_kernels(), torch.no_grad():
        net.eval()(*example_inputs(net))
    return torch.cuda.max_memory_allocated(device) - before


def load_network(source: str, trust: bool = False) -> torch.nn.Module:
    """A preset built on the meta device, or the network stored in a pickle ('ema' of a snapshot)."""
    if source in EDM_PRESETS or source.lower() in networks_edm2.PRESETS:
        return build_preset(source.lower() if source.lower() in networks_edm2.PRESETS else source)
    from torch_utils import persistence
    try:
        data = persistence.load_pickle(source, trust=trust)
    except FileNotFoundError:
        raise ValueError(f'{source!r} is neither a readable pickle nor a preset; presets: {", ".join(preset_names())}') from None
    net = data.get('ema', data.get('net')) if isinstance(data, dict) else data
    if not isinstance(net, torch.nn.Module):
        raise ValueError(f'{source}: no network found (expected a module or a dict with "ema")')
    return net.to('meta')  # only shapes matter; avoids computing a real forward pass

#----------------------------------------------------------------------------

@click.command()
@click.argument('net_or_preset', metavar='NET_OR_PRESET')
@click.option('--batch', help='Batch size of the counted forward pass', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--trust-pickle', help='Allow code stored in the pickle to run (only for files you trust)', is_flag=True)
@dnnlib.util.cli_errors
def main(net_or_preset: str, batch: int, trust_pickle: bool) -> None:
    """Print the parameter count and GFLOP per forward pass of NET_OR_PRESET."""
    net = load_network(net_or_preset, trust=trust_pickle)
    params, flops = count_flops(net, batch=batch)
    click.echo(f'network:    {net_or_preset} ({type(net).__name__})')
    click.echo(f'params:     {params / 1e6:.4g} M ({params})')
    click.echo(f'GFLOP:      {flops / 1e9:.4g} per forward at batch {batch} (2 FLOPs per multiply-add)')


if __name__ == '__main__':
    main()
