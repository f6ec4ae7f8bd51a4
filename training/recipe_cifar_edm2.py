"""Training and sampling schedule of the CIFAR EDM2 reimplementation (FutureXiang/edm2 train.py, configs).

Its six configs (cifar10 / cifar100 / tinyimagenet x C / E; G runs the E hyper-parameters on UNetG)
count time in epochs of a DistributedSampler: ceil(N / world) images per process in batches of
batch_size // world, the last one partial. The learning rate is set once per epoch: a linear warm-up
over warm_epoch epochs, then alpha / sqrt(max(epoch / tref_epoch, 1)) (EDM2 Eq. 67 in epochs). The EMA
is ema-pytorch's: a fixed beta with a 1 - k^(-2/3) warm-up. Sampling (training.sampling.cifar_edm2_sampler)
is Heun with 18 steps, the denoised image clipped to [-1, 1] (S_noise = 1.007 only matters with eta > 0).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import Optional

import numpy as np
import torch

import dnnlib
from torch_utils import training_stats
from training import networks_cifar_edm2
from training.recipes import EDMRecipe

from training.cifar_edm2_configs import (REFERENCE_CONFIGS, ReferenceConfig, epoch_of_step,  # noqa: F401  (public names here too)
                                        learning_rate, reference_config, steps_per_epoch)

#----------------------------------------------------------------------------
# EMA.

class WarmupEMA:
    """ema-pytorch EMA(beta, update_after_step=0, update_every=1, inv_gamma=1, power=2/3): decay min(beta, 1 - k^(-2/3))."""

    @torch.no_grad()
    def __init__(self,
        net:    torch.nn.Module,    # Network being trained; read at every update().
        beta:   float = 0.9993,     # Decay once the warm-up has passed it.
    ):
        self.net = net
        self.beta = beta
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)
        self.step = 0           # update() calls so far (ema-pytorch's `step` buffer)
        self.initted = False    # ema-pytorch's `initted` buffer

    def decay(self, step: int) -> float:
        """Decay of the update that brings the count to `step`: min(beta, 1 - step^(-2/3)), float32; 0 at step 1."""
        epoch = torch.tensor(float(step - 1), dtype=torch.float32).clamp(min=0)
        if epoch.item() <= 0:
            return 0.0
        return (1 - (1 + epoch) ** (-2 / 3)).clamp(min=0, max=self.beta).item()

    def _tensors(self, module):
        # Every float parameter and buffer, frozen ones (the Fourier features) included.
        return [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]

    @torch.no_grad()
    def update(self, cur_nimg: int = 0, batch_size: int = 0) -> None:
        """One ema-pytorch update() after an optimizer step (the arguments only fit the training loop's call)."""
        first = self.step == 0
        self.step += 1
        if first or not self.initted:  # the 1st call copies; the 2nd copies again and marks initted
            torch._foreach_copy_(self._tensors(self.ema), self._tensors(self.net))
            self.initted = not first
            if first:
                return
        decay = self.decay(self.step)
        torch._foreach_lerp_(self._tensors(self.ema), self._tensors(self.net), 1 - decay)

    def reset(self) -> None:
        """Restart the EMA from the current network (transfer learning)."""
        self.step, self.initted = 0, False
        self.update()

    def get(self) -> torch.nn.Module:
        """The EMA network."""
        return self.ema

    def state_dict(self) -> dict:
        """ema-pytorch's layout: initted, step, online_model.*, ema_model.* (a reference checkpoint's "EMA")."""
        state = {'initted': torch.tensor(self.initted), 'step': torch.tensor(self.step)}
        state.update({f'online_model.{k}': v for k, v in self.net.state_dict().items()})
        state.update({f'ema_model.{k}': v for k, v in self.ema.state_dict().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Inverse of state_dict(); also reads the "EMA" entry of a reference checkpoint."""
        self.initted, self.step = bool(state['initted']), int(state['step'])
        self.ema.load_state_dict({k[len('ema_model.'):]: v for k, v in state.items() if k.startswith('ema_model.')})

#----------------------------------------------------------------------------
# The recipe object of the training loop (train.py --preset=cifar-edm2-*).

def network_kwargs(cfg) -> dnnlib.EasyDict:
    """CifarPrecond kwargs of a TrainConfig, named as the YAML `network` section (is_attn per level)."""
    is_attn = [(cfg.resolution >> level) in cfg.attn_resolutions for level in range(len(cfg.channel_mult))]
    kwargs = dnnlib.EasyDict(class_name='training.networks_cifar_edm2.CifarPrecond', config=cfg.edm2_config,
                             n_channels=cfg.model_channels, ch_mults=list(cfg.channel_mult), is_attn=is_attn,
                             dropout=cfg.dropout, n_blocks=cfg.num_blocks)
    if cfg.sigma_data != 0.5:
        kwargs.sigma_data = cfg.sigma_data
    return kwargs


class CifarEDM2Recipe(EDMRecipe):
    """FutureXiang/edm2 train.py: Adam, per-epoch warm-up + inverse-sqrt lr, ema-pytorch EMA, reference checkpoints."""

    name = 'cifar-edm2'
    kimg_digits = 6
    first_status_after_one_step = False  # status lines only every --status images

    def make_ema(self, net):
        return WarmupEMA(net, beta=self.cfg.ema_beta)

    def epoch(self, cur_nimg: int) -> int:
        """The 0-based epoch of the optimizer step taken at cur_nimg (reference epoch length, one process)."""
        return epoch_of_step(cur_nimg // self.cfg.batch_size, self.cfg.epoch_images, self.cfg.batch_size)

    def learning_rate(self, cur_nimg: int) -> float:
        cfg = self.cfg
        lr = learning_rate(self.epoch(cur_nimg), cfg.lr, cfg.lr_warmup_epochs, cfg.lr_tref_epochs, n_epoch=cfg.lr_tref_epochs)
        training_stats.report('Loss/learning_rate', lr)
        return lr

    def clean_gradients(self, params) -> None:
        pass  # the reference steps on the raw gradients (GradScaler skips non-finite ones under --use_amp)

    def update_ema(self, ema, prev_nimg: int, cur_nimg: int) -> None:
        ema.update()

    def save_snapshot(self, ctx) -> list[str]:
        """network-snapshot-<kimg>.pkl (EMA net, for generate.py) and ckpts/model_<epoch>.pth in the reference layout."""
        paths = super().save_snapshot(ctx)
        epoch = self.epoch(ctx.cur_nimg) - 1  # the last completed epoch, as the reference names its checkpoints
        path = os.path.join(ctx.run_dir, 'ckpts', f'model_{max(epoch, 0)}.pth')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = dict(MODEL={f'module.{k}': v for k, v in ctx.net.state_dict().items()}, EMA=ctx.ema.state_dict(),
                    opt=ctx.optimizer.state_dict())
        with dnnlib.util.atomic_write(path, 'wb') as f:
            torch.save(data, f)
        return paths + [path]


#----------------------------------------------------------------------------
# Reference checkpoints -> network snapshots (for generate.py, fid.py gen / probe).

def export_reference_checkpoint(path: str, reference_config: str, dest: str, weights: str = 'ema',
                                **overrides) -> torch.nn.Module:
    """Write the weights of a FutureXiang/edm2 model_<ep>.pth as our network snapshot pickle {'ema': CifarPrecond}."""
    from torch_utils import persistence
    net = networks_cifar_edm2.load_reference_checkpoint(path, reference_config, weights=weights, **overrides)
    persistence.save_pickle(dict(ema=net), dest)
    return net


def _main():
    import click

    import dnnlib

    @click.command()
    @click.option('--ckpt', help='FutureXiang/edm2 checkpoint', metavar='PTH', type=str, required=True)
    @click.option('--config', 'reference_config', help='Its configuration, e.g. cifar10-e', metavar='NAME', type=str, required=True)
    @click.option('--dest', help='Network snapshot to write', metavar='PKL', type=str, required=True)
    @click.option('--weights', help='Which weights', type=click.Choice(list(networks_cifar_edm2.WEIGHTS)), default='ema', show_default=True)
    @dnnlib.util.cli_errors
    def convert(ckpt, reference_config, dest, weights):
        """Convert a FutureXiang/edm2 checkpoint into a network snapshot pickle of this project."""
        net = export_reference_checkpoint(ckpt, reference_config, dest, weights=weights)
        click.echo(f'{dest}: {type(net.nn_model).__name__}, {sum(p.numel() for p in net.parameters() if p.requires_grad)} parameters, {weights} weights')
    convert()


if __name__ == '__main__':
    _main()
