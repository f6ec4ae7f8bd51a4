"""Sampling DDPM networks (tqch/ddpm-torch generate.py): ancestral DDPM with the trained variance
choice, or DDIM over a skip schedule, with the per-seed generators of training/sampling.py.

A DDPM checkpoint (`.pt` in the published layout, or a network-snapshot-*.pt of our DDPM recipe)
is wrapped in `DDPMNetwork`, which carries the diffusion settings and the image interface the
generic generate_images() asks for, so `--sampler=ddpm|ddim` pick the discrete samplers below.
"""

import torch

from training import ddpm
from training.networks_ddpm import load_checkpoint

# The reference configs/<dataset>.json: image resolution and diffusion settings of published checkpoints.
REFERENCE_CONFIGS = {
    'cifar10':  dict(resolution=32, model_var_type='fixed-large'),
    'celeba':   dict(resolution=64, model_var_type='fixed-small'),
    'celebahq': dict(resolution=256, model_var_type='fixed-small'),
}
_DIFFUSION_DEFAULTS = dict(timesteps=1000, beta_schedule='linear', beta_start=1e-4, beta_end=0.02,
                           model_mean_type='eps', loss_type='mse')


class DDPMNetwork(torch.nn.Module):
    """A DDPM UNet with its diffusion settings; net(x, t) calls the UNet at integer timesteps."""

    discrete_time = True

    def __init__(self,
        unet:           torch.nn.Module,    # UNet or ModelWrapper (--block-size): eps/x_0/mean (+ variance) output.
        img_resolution: int,                # Image size the network was trained at.
        diffusion:      dict,               # timesteps, beta_schedule, beta_start, beta_end, model_mean_type, model_var_type.
    ):
        super().__init__()
        self.unet = unet
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, unet.in_channels, 0
        self.diffusion = dict(diffusion)

    def forward(self, x, t):
        return self.unet(x, t)

    def betas(self) -> torch.Tensor:
        d = self.diffusion
        return ddpm.get_beta_schedule(d['beta_schedule'], d['beta_start'], d['beta_end'], d['timesteps'])


class DDPMPixels:
    """Model output in [-1, 1] -> uint8 as ddpm-torch generate.py: (x * 127.5 + 127.5).round().clamp(0, 255)."""

    def decode(self, x):
        return (x * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)


def load_ddpm_network(path: str, dataset: str | None = None, use_ema: bool = False,
                      device: torch.device | str = 'cpu') -> DDPMNetwork:
    """DDPMNetwork from a checkpoint; settings from its 'config' entry, else the reference config of `dataset`."""
    probe = torch.load(path, map_location='cpu', weights_only=True, mmap=True) if dataset is None else None
    config = probe.get('config') if isinstance(probe, dict) else None
    if dataset is not None:
        if dataset not in REFERENCE_CONFIGS:
            raise ValueError(f'--dataset={dataset} has no reference config; choose one of {", ".join(REFERENCE_CONFIGS)}')
        ref = REFERENCE_CONFIGS[dataset]
        settings = dict(_DIFFUSION_DEFAULTS, model_var_type=ref['model_var_type'])
        resolution, unet_kwargs, block_size = ref['resolution'], None, None
    elif config is not None:
        settings, resolution, unet_kwargs = dict(config['diffusion']), config['resolution'], config['unet']
        block_size = int(config.get('block_size', 1))
    else:
        raise ValueError(f'--network={path} holds no config (a published ddpm-torch checkpoint); name its reference '
                         f'config with --dataset ({", ".join(REFERENCE_CONFIGS)})')
    # A `_model.`-prefixed published checkpoint is a --block-size > 1 run (ModelWrapper); its block follows from 3 channels.
    unet, _checkpoint = load_checkpoint(path, use_ema=use_ema, unet_kwargs=unet_kwargs, device=device, block_size=block_size)
    expected = 2 * unet.in_channels if settings['model_var_type'] == 'learned' else unet.in_channels
    if unet.out_channels != expected:
        raise ValueError(f'--network={path}: the UNet outputs {unet.out_channels} channels, but model_var_type='
                         f'{settings["model_var_type"]} needs {expected}')
    return DDPMNetwork(unet, resolution, settings).eval().requires_grad_(False).to(device)


def ddpm_ancestral_sampler(
    net, noise, labels=None, gnet=None, randn_like=torch.randn_like,
    clip_denoised   = True,         # Clamp the predicted x_0 to [-1, 1] at every step (the reference does).
):
    """Ancestral sampling over all T steps with the network's variance choice (Ho et al. 2020, Algorithm 2)."""
    d = net.diffusion
    diffusion = ddpm.GaussianDiffusion(net.betas(), d['model_mean_type'], d['model_var_type'], 'mse')
    return diffusion.p_sample(net, noise.to(torch.float32), randn_like=randn_like, clip_denoised=clip_denoised)


def make_ddim(net, eta: float, skip_schedule: str, subseq_size: int) -> ddpm.DDIM:
    """The DDIM process of ddpm-torch generate.py --use-ddim (model_var_type forced to fixed-small)."""
    d = net.diffusion
    subsequence = ddpm.get_selection_schedule(skip_schedule, subseq_size, d['timesteps'])
    learned = d['model_var_type'] == 'learned'
    # A learned-variance net still outputs 2 C channels; DDIM uses its mean half and the eta-scaled posterior.
    diffusion = ddpm.DDIM(net.betas(), subsequence, eta=eta, model_mean_type=d['model_mean_type'],
                          model_var_type='learned' if learned else 'fixed-small')
    diffusion.model_var_type = 'fixed-small'
    return diffusion


def ddpm_ddim_sampler(
    net, noise, labels=None, gnet=None, randn_like=torch.randn_like,
    eta             = 0.0,          # 0 = deterministic DDIM (still adds 1e-10 noise, as the reference), 1 = DDPM-like.
    skip_schedule   = 'linear',     # Timestep subsequence: 'linear' | 'quadratic'.
    subseq_size     = 50,           # Requested number of steps (linear may give more, quadratic repeats).
    clip_denoised   = True,         # Clamp the predicted x_0 to [-1, 1].
):
    """DDIM (Song et al. 2021, Eq. 12) over a timestep subsequence of a DDPM network."""
    diffusion = make_ddim(net, eta, skip_schedule, subseq_size)
    return diffusion.p_sample(net, noise.to(torch.float32), randn_like=randn_like, clip_denoised=clip_denoised)


DISCRETE_SAMPLERS = {'ddpm': ddpm_ancestral_sampler, 'ddim': ddpm_ddim_sampler}


def discrete_sampler(name: str):
    """The sampler of a DDPM network for --sampler=ddpm|ddim; ValueError for the others."""
    if name not in DISCRETE_SAMPLERS:
        raise ValueError(f'--sampler={name} does not apply to a DDPM network (.pt); use --sampler=ddpm (ancestral) '
                         f'or --sampler=ddim (--use-ddim)')
    return DISCRETE_SAMPLERS[name]


def check_options(net: DDPMNetwork, sampler: str, kwargs: dict) -> None:
    """Build the sampler's schedule once, so a bad --subseq-size / --skip-schedule fails before any image."""
    if sampler == 'ddim':
        make_ddim(net, kwargs.get('eta', 0.0), kwargs.get('skip_schedule', 'linear'), kwargs.get('subseq_size', 50))
