"""Preconditioning wrappers D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) of EDM.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Table 1
and Eq. 7: VP and VE (Song et al. 2021), iDDPM (Nichol & Dhariwal 2021) and EDM. Constructor
arguments and state_dicts follow NVlabs/edm, where these classes live in training/networks.py;
that module re-exports them under their reference names.
"""

import importlib

import numpy as np
import torch

from torch_utils import persistence

BACKBONES = ('SongUNet', 'DhariwalUNet')

#----------------------------------------------------------------------------
# Helpers shared with training/networks_edm2.py.

def backbone_class(model_type: str) -> type:
    """Backbone class of training/networks.py named by `model_type` (looked up lazily: no import cycle)."""
    if model_type not in BACKBONES:
        raise ValueError(f'model_type must be one of {BACKBONES}, got {model_type!r}')
    return getattr(importlib.import_module('training.networks'), model_type)


def prepare_inputs(net, x, sigma, class_labels, force_fp32):
    """Validate and cast precond inputs: x fp32, sigma [N,1,1,1], labels [N or 1, label_dim] or None, model dtype."""
    # Self-contained (no project imports): the reference code may execute this file's source.
    expected = [net.img_channels, net.img_resolution, net.img_resolution]
    if x.ndim != 4 or list(x.shape[1:]) != expected:
        raise ValueError(f'x must have shape [N, {", ".join(map(str, expected))}], got {list(x.shape)}')
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.numel() != 1 and sigma.numel() != x.shape[0]:
        raise ValueError(f'sigma must have 1 or N={x.shape[0]} elements, got shape {list(sigma.shape)}')
    x = x.to(torch.float32)
    sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
    if net.label_dim == 0:
        class_labels = None
    elif class_labels is None:
        class_labels = torch.zeros([1, net.label_dim], device=x.device)
    else:
        if class_labels.numel() % net.label_dim != 0:
            raise ValueError(f'class_labels must have shape [N, {net.label_dim}], got {list(class_labels.shape)}')
        class_labels = class_labels.to(torch.float32).reshape(-1, net.label_dim)
        if class_labels.shape[0] != x.shape[0] and class_labels.shape[0] != 1:
            raise ValueError(f'class_labels has batch size {class_labels.shape[0]}, expected 1 or {x.shape[0]} to match the images')
    # The reference runs fp16 on CUDA only; elsewhere use_fp16 is ignored (bf16 autocast works everywhere).
    dtype = torch.float16 if (net.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32
    return x, sigma, class_labels, dtype

#----------------------------------------------------------------------------

@persistence.persistent_class
class VPPrecond(torch.nn.Module):
    """Variance preserving preconditioning (EDM Table 1, "VP" column; Song et al. 2021)."""

    def __init__(self,
        img_resolution:     int,                    # Image resolution.
        img_channels:       int,                    # Number of color channels.
        label_dim:          int     = 0,            # Number of class labels; 0 = unconditional.
        use_fp16:           bool    = False,        # Run the backbone in float16 (CUDA only)?
        beta_d:             float   = 19.9,         # Extent of the noise level schedule.
        beta_min:           float   = 0.1,          # Initial slope of the noise level schedule.
        M:                  int     = 1000,         # Number of timesteps of the original DDPM formulation.
        epsilon_t:          float   = 1e-5,         # Smallest t used in training.
        model_type:         str     = 'SongUNet',   # Backbone class name, one of BACKBONES.
        **model_kwargs,                             # Keyword arguments of the backbone.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # Explicit CPU tensors keep this valid when the module is built under torch.device('meta').
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, device='cpu')))
        self.sigma_max = float(self.sigma(torch.tensor(1, device='cpu')))
        self.model = backbone_class(model_type)(img_resolution=img_resolution, in_channels=img_channels,
            out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels, dtype = prepare_inputs(self, x, sigma, class_labels, force_fp32)
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def sigma(self, t):
        """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM Table 1)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        """Inverse of sigma(t)."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def round_sigma(self, sigma):
        """Continuous noise levels: identity."""
        return torch.as_tensor(sigma)

#----------------------------------------------------------------------------

@persistence.persistent_class
class VEPrecond(torch.nn.Module):
    """Variance exploding preconditioning (EDM Table 1, "VE" column; Song et al. 2021)."""

    def __init__(self,
        img_resolution:     int,                    # Image resolution.
        img_channels:       int,                    # Number of color channels.
        label_dim:          int     = 0,            # Number of class labels; 0 = unconditional.
        use_fp16:           bool    = False,        # Run the backbone in float16 (CUDA only)?
        sigma_min:          float   = 0.02,         # Smallest supported noise level.
        sigma_max:          float   = 100,          # Largest supported noise level.
        model_type:         str     = 'SongUNet',   # Backbone class name, one of BACKBONES.
        **model_kwargs,                             # Keyword arguments of the backbone.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.model = backbone_class(model_type)(img_resolution=img_resolution, in_channels=img_channels,
            out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels, dtype = prepare_inputs(self, x, sigma, class_labels, force_fp32)
        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma):
        """Continuous noise levels: identity."""
        return torch.as_tensor(sigma)

#----------------------------------------------------------------------------

@persistence.persistent_class
class iDDPMPrecond(torch.nn.Module):
    """Improved DDPM preconditioning with its discrete noise levels u_j (EDM Table 1, "iDDPM" column)."""

    def __init__(self,
        img_resolution:     int,                        # Image resolution.
        img_channels:       int,                        # Number of color channels.
        label_dim:          int     = 0,                # Number of class labels; 0 = unconditional.
        use_fp16:           bool    = False,            # Run the backbone in float16 (CUDA only)?
        C_1:                float   = 0.001,            # Timestep adjustment at low noise levels.
        C_2:                float   = 0.008,            # Timestep adjustment at high noise levels.
        M:                  int     = 1000,             # Number of discrete noise levels.
        model_type:         str     = 'DhariwalUNet',   # Backbone class name, one of BACKBONES.
        **model_kwargs,                                 # Keyword arguments of the backbone.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        # The backbone also predicts the variance (learned-sigma iDDPM), hence twice the channels.
        self.model = backbone_class(model_type)(img_resolution=img_resolution, in_channels=img_channels,
            out_channels=img_channels * 2, label_dim=label_dim, **model_kwargs)

        u = torch.zeros(M + 1, device='cpu')
        for j in range(M, 0, -1):  # u_{j-1} from u_j, EDM Table 1
            ratio = self.alpha_bar(torch.tensor(j - 1, device='cpu')) / self.alpha_bar(torch.tensor(j, device='cpu'))
            u[j - 1] = ((u[j] ** 2 + 1) / ratio.clip(min=C_1) - 1).sqrt()
        self.register_buffer('u', u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels, dtype = prepare_inputs(self, x, sigma, class_labels, force_fp32)
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)

    def alpha_bar(self, j):
        """alpha_bar(j) = sin^2(pi j / (2 M (C_2 + 1))) (EDM Table 1)."""
        j = torch.as_tensor(j)
        return (0.5 * np.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        """Snap sigma to the nearest u_j (or return j)."""
        sigma = torch.as_tensor(sigma)
        index = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

#----------------------------------------------------------------------------

@persistence.persistent_class
class EDMPrecond(torch.nn.Module):
    """EDM preconditioning (EDM Table 1, "ours" column; Eq. 7)."""

    def __init__(self,
        img_resolution:     int,                        # Image resolution.
        img_channels:       int,                        # Number of color channels.
        label_dim:          int     = 0,                # Number of class labels; 0 = unconditional.
        use_fp16:           bool    = False,            # Run the backbone in float16 (CUDA only)?
        sigma_min:          float   = 0,                # Smallest supported noise level.
        sigma_max:          float   = float('inf'),     # Largest supported noise level.
        sigma_data:         float   = 0.5,              # Expected standard deviation of the training data.
        model_type:         str     = 'DhariwalUNet',   # Backbone class name, one of BACKBONES.
        **model_kwargs,                                 # Keyword arguments of the backbone.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = backbone_class(model_type)(img_resolution=img_resolution, in_channels=img_channels,
            out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels, dtype = prepare_inputs(self, x, sigma, class_labels, force_fp32)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma):
        """Continuous noise levels: identity."""
        return torch.as_tensor(sigma)
