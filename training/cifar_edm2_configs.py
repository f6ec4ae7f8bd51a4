"""The six configs of the CIFAR EDM2 reimplementation (FutureXiang/edm2 config/<dataset>/<C|E>.yaml) and its
epoch arithmetic, without torch, so that train.py --help and the presets stay light
(training/recipe_cifar_edm2.py is the recipe that uses them)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

# The YAMLs' `network` sections, mirrored from training/networks_cifar_edm2.NETWORKS (that module imports
# torch and must stay self-contained for pickles); tests/test_recipe_cifar_edm2.py checks that they agree.
_CIFAR = dict(n_channels=128, ch_mults=[1, 2, 2, 2], is_attn=[False, True, False, False], dropout=0.13, n_blocks=3)
NETWORKS = {
    'cifar10':      dict(img_resolution=32, **_CIFAR),
    'cifar100':     dict(img_resolution=32, **_CIFAR),
    'tinyimagenet': dict(img_resolution=64, n_channels=128, ch_mults=[1, 2, 2, 2], is_attn=[False, False, True, False],
                         dropout=0.1, n_blocks=5),
}

#----------------------------------------------------------------------------
# The configs (config/<dataset>/<C|E>.yaml; G = UNetG with the E file).

@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """One YAML of FutureXiang/edm2: dataset, network, training schedule and linear-probe settings."""
    dataset:        str             # cifar10 | cifar100 | tinyimagenet.
    classes:        int             # Class count (the probe's classifier width).
    config:         str             # Network: C, E or G.
    n_epoch:        int             # Training epochs.
    batch_size:     int             # Global batch (all processes).
    lrate:          float           # Adam learning rate after warm-up (alpha_ref).
    warm_epoch:     int             # Linear warm-up epochs.
    tref_epoch:     Optional[int]   # Inverse-sqrt decay from this epoch; None = n_epoch (constant after warm-up).
    flip:           bool            # Random horizontal flips of the training images.
    ema:            float = 0.9993  # ema-pytorch beta.
    P_mean:         float = -1.2    # Mean of ln(sigma) in training.
    P_std:          float = 1.2     # Std of ln(sigma) in training.
    sigma_data:     float = 0.5     # Data standard deviation (preconditioning).
    probe_t:        int = 4         # linear.timestep: noise index into reversed(18-step schedule).
    probe_block:    str = 'out_6'   # linear.blockname.

    @property
    def num_images(self) -> int:
        """Training split size: 50,000 (CIFAR-10/100), 100,000 (Tiny-ImageNet)."""
        return 100_000 if self.dataset == 'tinyimagenet' else 50_000

    def network_kwargs(self) -> dict:
        """CifarPrecond kwargs (the YAML `network` section)."""
        return dict(img_channels=3, config=self.config, **NETWORKS[self.dataset])


def _configs() -> dict[str, ReferenceConfig]:
    out = {}
    for dataset, classes in (('cifar10', 10), ('cifar100', 100), ('tinyimagenet', 200)):
        tiny = dataset == 'tinyimagenet'
        c = ReferenceConfig(dataset, classes, 'C', n_epoch=2000 if tiny else 1000, batch_size=192 if tiny else 512,
                            lrate=1.5e-4 if tiny else 4e-4, warm_epoch=200, tref_epoch=None, flip=not tiny,
                            probe_t=5 if tiny else 4)
        e = dataclasses.replace(c, config='E', n_epoch=2000, lrate=7.5e-3 if tiny else 2e-2, tref_epoch=400)
        out.update({f'{dataset}-c': c, f'{dataset}-e': e, f'{dataset}-g': dataclasses.replace(e, config='G')})
    return out


REFERENCE_CONFIGS = _configs()


def reference_config(name: str) -> ReferenceConfig:
    """'cifar10-e' (also 'cifar10/E') -> its ReferenceConfig."""
    from training import networks_cifar_edm2
    dataset, config = networks_cifar_edm2.parse_reference_config(name)
    return REFERENCE_CONFIGS[f'{dataset}-{config.lower()}']

#----------------------------------------------------------------------------
# Time in epochs, learning rate.

def steps_per_epoch(num_images: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch: ceil(ceil(N / world) / (batch // world)), the last batch partial."""
    if batch_size % world_size != 0:
        raise ValueError(f'batch_size={batch_size} is not divisible by {world_size} processes')
    return math.ceil(math.ceil(num_images / world_size) / (batch_size // world_size))


def learning_rate(epoch: int, lrate: float, warm_epoch: int, tref_epoch: Optional[int], n_epoch: int) -> float:
    """lrate (epoch + 1) / warm_epoch during warm-up, then lrate / sqrt(max(epoch / tref_epoch, 1)) (0-based epoch)."""
    if epoch < warm_epoch:
        return lrate * (epoch + 1) / warm_epoch
    return float(lrate / np.sqrt(max(epoch / (n_epoch if tref_epoch is None else tref_epoch), 1)))  # a Python float: safe to torch.load


def epoch_of_step(step: int, num_images: int, batch_size: int, world_size: int = 1) -> int:
    """The 0-based epoch that optimizer step `step` (0-based) belongs to."""
    return step // steps_per_epoch(num_images, batch_size, world_size)
