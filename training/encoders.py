"""Converting image data between pixels and the latents that the network sees (EDM2 Section 5 / App. B).

Raw pixels (uint8, NCHW) are encoded into raw latents, which datasets store; raw latents are
turned into final latents, which the network denoises; decoding goes from final latents back to
raw pixels. Keeping the last, cheap step out of the dataset lets the whitening change without
re-encoding the dataset. Same classes, constructor arguments and numerics as the reference
`training/encoders.py` of EDM2, so that reference pickles rebuild their encoder from its init kwargs.
"""

import functools
import importlib.util
import os
import socket
import urllib.parse
import warnings

import numpy as np
import torch

from torch_utils import misc, persistence

warnings.filterwarnings('ignore', 'torch.utils._pytree._register_pytree_node is deprecated.')
warnings.filterwarnings('ignore', '`resume_download` is deprecated')

#----------------------------------------------------------------------------

@persistence.persistent_class
class Encoder:
    """Abstract pixel <-> latent converter; subclasses override the three conversions."""

    def __init__(self):
        pass

    def init(self, device: torch.device) -> None:
        """Do any lazy initialization now, on `device`."""

    def __getstate__(self) -> dict:
        return self.__dict__

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels => final latents."""
        return self.encode_latents(self.encode_pixels(x))

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels => raw latents (what a dataset stores)."""
        raise NotImplementedError

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Raw latents => final latents (what the network sees)."""
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Final latents => raw pixels."""
        raise NotImplementedError

#----------------------------------------------------------------------------

@persistence.persistent_class
class StandardRGBEncoder(Encoder):
    """Pixel-space 'encoder': uint8 [0, 255] <-> float [-1, 1] (EDM2 pixel models)."""

    def __init__(self):
        super().__init__()

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels are stored as they are."""
        return x

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Scale [0, 255] to [-1, 1]."""
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Scale [-1, 1] to uint8; +128 rather than +127.5 makes the cast round to nearest."""
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)

#----------------------------------------------------------------------------

@persistence.persistent_class
class StabilityVAEEncoder(Encoder):
    """Stable Diffusion's KL autoencoder, with latents whitened to final_std (EDM2 Section 5)."""

    def __init__(self,
        vae_name    = 'stabilityai/sd-vae-ft-mse',  # Hugging Face model name, or a local diffusers folder.
        raw_mean    = [5.81, 3.25, 0.12, -2.15],    # Assumed per-channel mean of the raw latents.
        raw_std     = [4.17, 4.62, 3.71, 3.28],     # Assumed per-channel standard deviation of the raw latents.
        final_mean  = 0,                            # Desired mean of the final latents.
        final_std   = 0.5,                          # Desired standard deviation of the final latents (sigma_data).
        batch_size  = 8,                            # Images per VAE call; bounds memory, does not change results.
    ):
        super().__init__()
        self.vae_name = vae_name
        self.scale = np.float32(final_std) / np.float32(raw_std)
        self.bias = np.float32(final_mean) - np.float32(raw_mean) * self.scale
        self.batch_size = int(batch_size)
        self._vae = None

    def init(self, device: torch.device) -> None:
        """Load the VAE (once) and move it to `device`."""
        super().init(device)
        if self._vae is None:
            self._vae = load_stability_vae(self.vae_name, device=device)
        else:
            self._vae.to(device)

    def __getstate__(self) -> dict:
        return dict(super().__getstate__(), _vae=None)  # the VAE is reloaded by name, never pickled

    def _run_vae_encoder(self, x: torch.Tensor) -> torch.Tensor:
        dist = self._vae.encode(x)['latent_dist']
        return torch.cat([dist.mean, dist.std], dim=1)

    def _run_vae_decoder(self, x: torch.Tensor) -> torch.Tensor:
        return self._vae.decode(x)['sample']

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels => 8-channel raw latents: posterior mean and std, concatenated."""
        self.init(x.device)
        x = x.to(torch.float32) / 255  # [0, 1] input, as the reference (not the usual [-1, 1])
        return torch.cat([self._run_vae_encoder(batch) for batch in x.split(self.batch_size)])

    def _const(self, x: torch.Tensor, value: np.ndarray) -> torch.Tensor:
        # Cached per dtype and device, as the reference's const_like: a fresh upload would make the host wait for
        # the GPU in every call (each round of every EDM2 training step).
        return misc.const_like(x, value).reshape(1, -1, 1, 1)

    def encode_latents(self, x: torch.Tensor, noise: torch.Tensor = None) -> torch.Tensor:
        """Sample the posterior, mean + std * noise, and whiten; `noise` None = torch.randn_like."""
        mean, std = x.to(torch.float32).chunk(2, dim=1)
        noise = torch.randn_like(mean) if noise is None else noise.to(mean.device, torch.float32)
        x = mean + noise * std
        return x * self._const(x, self.scale) + self._const(x, self.bias)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Final latents => uint8 pixels."""
        self.init(x.device)
        x = x.to(torch.float32)
        x = (x - self._const(x, self.bias)) / self._const(x, self.scale)
        x = torch.cat([self._run_vae_decoder(batch) for batch in x.split(self.batch_size)])
        return x.to(torch.float32).clamp(0, 1).mul(255).to(torch.uint8)

#----------------------------------------------------------------------------
# Loading the VAE: a local diffusers folder, the download cache, or the Hugging Face Hub.

def _cache_dir() -> str:
    """Where downloaded VAEs live: $DNNLIB_CACHE_DIR/diffusers, else ~/.cache/dnnlib/diffusers (reference)."""
    root = os.environ.get('DNNLIB_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'dnnlib')
    return os.path.join(root, 'diffusers')

def _hub_reachable(timeout: float = 5) -> bool:
    """Can we open a connection to the Hub? Checked first, because the Hub client retries for long."""
    from huggingface_hub import constants
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == 'https' else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False

def _no_vae_error(vae_name: str, why: str) -> FileNotFoundError:
    return FileNotFoundError(
        f'cannot load the VAE {vae_name!r}: {why}. Download it on a machine with internet access '
        f'(e.g. `huggingface-cli download {vae_name}`) into the Hugging Face cache or {_cache_dir()} '
        f'(then HF_HUB_OFFLINE=1 is fine), or pass a local diffusers folder with config.json and the weights')

def load_stability_vae(vae_name: str = 'stabilityai/sd-vae-ft-mse', device: torch.device = torch.device('cpu')):
    """diffusers AutoencoderKL in eval mode without gradients, from a folder, the cache or the Hub."""
    os.environ.setdefault('HF_HUB_DISABLE_SYMLINKS_WARNING', '1')
    os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')
    import diffusers
    load = functools.partial(diffusers.models.AutoencoderKL.from_pretrained,  # without accelerate, say nothing
                             low_cpu_mem_usage=importlib.util.find_spec('accelerate') is not None)
    if os.path.isdir(vae_name) or vae_name.startswith(('/', './', '../', '~')):
        if not os.path.isdir(os.path.expanduser(vae_name)):
            raise FileNotFoundError(f'VAE folder {vae_name} not found; pass a diffusers folder with config.json and the weights')
        try:
            vae = load(os.path.expanduser(vae_name))
        except (OSError, ValueError) as err:
            raise ValueError(f'cannot load the VAE folder {vae_name}: {err}') from None
        return vae.eval().requires_grad_(False).to(device)
    vae = None
    for cache_dir in (_cache_dir(), None):  # ours first (as the reference), then the standard HF cache
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings('ignore', '.*local_dir_use_symlinks.*')
                vae = load(vae_name, cache_dir=cache_dir, local_files_only=True)
            break
        except (OSError, ValueError):
            pass
    if vae is None:
        if os.environ.get('HF_HUB_OFFLINE', '0').lower() in ('1', 'true', 'yes', 'on'):
            raise _no_vae_error(vae_name, 'it is not in the local cache and HF_HUB_OFFLINE is set')
        if not _hub_reachable():
            raise _no_vae_error(vae_name, 'it is not in the local cache and the Hugging Face Hub cannot be reached')
        try:
            vae = load(vae_name, cache_dir=_cache_dir())
        except (OSError, ValueError) as err:
            raise _no_vae_error(vae_name, f'download failed ({err})') from None
    return vae.eval().requires_grad_(False).to(device)

#----------------------------------------------------------------------------
