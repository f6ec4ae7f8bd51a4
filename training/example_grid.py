"""The 8x8 image grids of NVlabs/edm example.py: the best published EDM model per dataset, sampled with
the settings of the paper's main results, drawn from one global seed.

Random numbers are drawn as example.py draws them: `torch.manual_seed(seed)`, then all latents, then
the class labels, then the churn noise of every step from the global generator. So the grid differs
from generate.py's per-seed images, and matches the reference's grid for the same model and device.
"""

from __future__ import annotations

import dataclasses

import torch

from torch_utils import distributed as dist
from training import sampling

MODEL_ROOT = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained'


@dataclasses.dataclass(frozen=True)
class Example:
    """One grid of EDM example.py: which pickle, which file, which sampler settings."""
    network:    str     # Pickle file name under the model root.
    dest:       str     # PNG written in the output folder.
    sampler:    dict    # edm_sampler options (EDM Table 2/5 settings).


# EDM example.py main(): FID 1.79 / 1.97 / 1.96 at NFE 35 / 79 / 79, and 1.36 at NFE 511 (stochastic).
EXAMPLES = {
    'cifar10':  Example('edm-cifar10-32x32-cond-vp.pkl',   'cifar10-32x32.png',  dict(num_steps=18)),
    'ffhq':     Example('edm-ffhq-64x64-uncond-vp.pkl',    'ffhq-64x64.png',     dict(num_steps=40)),
    'afhqv2':   Example('edm-afhqv2-64x64-uncond-vp.pkl',  'afhqv2-64x64.png',   dict(num_steps=40)),
    'imagenet': Example('edm-imagenet-64x64-cond-adm.pkl', 'imagenet-64x64.png',
                        dict(num_steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)),
}


def generate_image_grid(
    network_pkl: str,                   # Network pickle, path or URL.
    dest_path: str,                     # PNG to write.
    seed: int           = 0,            # Global torch seed for latents, labels and churn noise.
    gridw: int          = 8,            # Images per grid row.
    gridh: int          = 8,            # Grid rows.
    device              = None,         # torch.device; None = auto (CUDA, MPS, else CPU).
    trust: bool         = False,        # Let the pickle run its embedded code.
    **sampler_kwargs,                   # edm_sampler options: num_steps, sigma_min, ..., S_noise.
) -> torch.Tensor:
    """Sample gridw x gridh images with the EDM sampler and save them as one PNG (EDM example.py)."""
    from torch_utils import misc
    device = misc.choose_device(device)
    batch_size = gridw * gridh
    dist.print0(f'Loading network from "{network_pkl}"...')
    net, _encoder = sampling.load_network(network_pkl, trust=trust, device=device)
    sampling.check_networks(net)
    # Seeded after loading: the safe loader rebuilds modules through their constructors, which draw
    # random numbers, where the reference's plain unpickling draws none.
    torch.manual_seed(seed)

    dist.print0(f'Generating {batch_size} images...')
    latents = torch.randn([batch_size, net.img_channels, net.img_resolution, net.img_resolution], device=device)
    class_labels = None
    if net.label_dim:
        class_labels = torch.eye(net.label_dim, device=device)[torch.randint(net.label_dim, size=[batch_size], device=device)]
    if device.type == 'mps':
        sampler_kwargs.setdefault('dtype', torch.float32)  # MPS has no float64.
    with torch.no_grad():
        x = sampling.edm_sampler(net, latents, class_labels, randn_like=torch.randn_like, **sampler_kwargs)
    images = sampling.decode_images(x)

    dist.print0(f'Saving image grid to "{dest_path}"...')
    sampling.save_png(sampling.image_grid(images.numpy(), grid_w=gridw), dest_path)
    dist.print0('Done.')
    return images
