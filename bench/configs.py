"""Network and batch configurations of the benchmark, in three sizes.

`full` is what the issue's GPU targets refer to: the EDM presets of training/flops.py (DDPM++
CIFAR-10 32x32, ADM ImageNet-64) and the EDM2 XS/S presets on 64x64x4 latents, at per-GPU batch
sizes close to the papers' setups. `tiny` keeps each architecture's structure (levels, attention,
labels, embeddings) at a width a 2-core CPU trains in seconds. `quick` is smaller still and
shortens the samplers, for smoke tests only: its numbers say nothing about speed.
"""

import dataclasses

import torch

from training import flops, networks, networks_edm2

SIZES = ('tiny', 'full', 'quick')

#----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NetSpec:
    """A network to benchmark: its preset name, precond class and constructor kwargs."""
    name:       str     # Display name, e.g. 'ddpmpp-cifar10'.
    edm2:       bool    # EDM2 Precond (True) or EDM EDMPrecond (False)?
    kwargs:     dict    # Constructor kwargs of the precond class.

    def build(self, device: torch.device | str) -> torch.nn.Module:
        """Construct the network directly on `device` ('meta' to only count FLOPs)."""
        with torch.device(device):
            if self.edm2:
                return networks_edm2.Precond(**self.kwargs)
            return networks.EDMPrecond(**self.kwargs)


# Reduced widths per size; fp16 off everywhere: the reference variant runs fp32, the fast one bf16 autocast.
_EDM_TINY = {
    'tiny':  dict(model_channels=32, channel_mult=[1, 2, 2], num_blocks=1),
    'quick': dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, img_resolution=16),
}
_ADM_TINY = {
    'tiny':  dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, img_resolution=32, attn_resolutions=[16]),
    'quick': dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, img_resolution=16, attn_resolutions=[8]),
}  # ADM has 64 channels per head: attention needs >= 64 channels at its resolutions
_EDM2_TINY = {  # channels_per_head shrinks with the width so that attention stays on
    'tiny':  dict(img_resolution=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], channels_per_head=16),
    'quick': dict(img_resolution=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8),
}
_EDM2_WIDTH = {'xs': {'tiny': 16, 'quick': 8}, 's': {'tiny': 24, 'quick': 16}}


def net_spec(name: str, size: str) -> NetSpec:
    """NetSpec of 'ddpmpp-cifar10', 'adm-imagenet64', 'edm2-xs' or 'edm2-s' at `size`."""
    if size not in SIZES:
        raise ValueError(f'size must be one of {SIZES}, got {size!r}')
    if name in ('ddpmpp-cifar10', 'adm-imagenet64'):
        kwargs = dict(flops.EDM_PRESETS[name], use_fp16=False)
        if size != 'full':
            kwargs.update((_EDM_TINY if name.startswith('ddpmpp') else _ADM_TINY)[size], dropout=0)
        return NetSpec(name, edm2=False, kwargs=kwargs)
    if name in ('edm2-xs', 'edm2-s'):
        width = name.split('-')[1]
        kwargs = networks_edm2.preset_kwargs(f'edm2-img512-{width}', use_fp16=False)
        if size != 'full':
            kwargs.update(_EDM2_TINY[size], model_channels=_EDM2_WIDTH[width][size])
        return NetSpec(name, edm2=True, kwargs=kwargs)
    raise ValueError(f"unknown benchmark network {name!r}; choose one of {TRAIN_NETS}")


TRAIN_NETS = ('ddpmpp-cifar10', 'adm-imagenet64', 'edm2-xs', 'edm2-s')

#----------------------------------------------------------------------------
# Batch sizes and workloads per size.

TRAIN_BATCH = {
    'full':  {'ddpmpp-cifar10': 128, 'adm-imagenet64': 32, 'edm2-xs': 32, 'edm2-s': 32},  # fp32 fits in 80 GB
    'tiny':  {'ddpmpp-cifar10': 8, 'adm-imagenet64': 8, 'edm2-xs': 8, 'edm2-s': 8},
    'quick': {'ddpmpp-cifar10': 2, 'adm-imagenet64': 2, 'edm2-xs': 2, 'edm2-s': 2},
}


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """A sampling workload: network, sampler, steps, guidance and batch."""
    name:       str     # Display name.
    net:        str     # Network name for net_spec().
    sampler:    str     # 'edm' (EDM generate.py, float64) or 'edm2' (EDM2 generate_images.py, float32).
    num_steps:  int     # Noise levels N (NFE = 2N - 1 per network).
    guidance:   float   # 1 = no guidance; else a guiding network of the same architecture is built.
    batch:      int     # Images per sampler call.


def sample_specs(size: str) -> list[SampleSpec]:
    """EDM 18-step CIFAR-10 and EDM2-S 32-step without and with guidance."""
    batch = {'full': (128, 16), 'tiny': (8, 4), 'quick': (2, 2)}[size]  # EDM2-S: 63 NFE x 102 GFLOP per image
    edm_steps, edm2_steps = (18, 32) if size != 'quick' else (3, 3)
    return [
        SampleSpec(f'edm-cifar10-{edm_steps}step', 'ddpmpp-cifar10', 'edm', edm_steps, 1.0, batch[0]),
        SampleSpec(f'edm2-s-{edm2_steps}step', 'edm2-s', 'edm2', edm2_steps, 1.0, batch[1]),
        SampleSpec(f'edm2-s-{edm2_steps}step-guided', 'edm2-s', 'edm2', edm2_steps, 1.4, batch[1]),
    ]


FID_BATCH = {'full': 256, 'tiny': 8, 'quick': 1}      # 32x32 uint8 images through Inception-v3
ENCODE_IMAGES = {'full': (32, 512), 'tiny': (8, 64), 'quick': (2, 32)}  # (images, resolution)


def vae_config(size: str) -> dict:
    """AutoencoderKL config: Stable Diffusion's VAE architecture (full) or a narrow 4-level copy."""
    levels = 4  # 8x downsampling, as the real VAE
    channels = {'full': (128, 256, 512, 512), 'tiny': (32, 32, 64, 64), 'quick': (32, 32, 32, 32)}[size]
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
                layers_per_block=2 if size == 'full' else 1, norm_num_groups=32,
                down_block_types=('DownEncoderBlock2D',) * levels, up_block_types=('UpDecoderBlock2D',) * levels,
                sample_size=ENCODE_IMAGES[size][1])
