"""Training recipes: what EDM and EDM2 decide differently, one small object each (STYLE.md, Recipes).

The training loop (training/training_loop.py) is the same for every recipe; it asks the recipe
for the encoder, the EMA, the learning rate, how to clean gradients, when to update the EMA,
how to name and fill snapshots and how to write stats.jsonl. A new recipe is a new subclass
registered in RECIPE_CLASSES, not new branches in the loop.
"""

import copy
import json
import os
import time

import numpy as np
import torch

import dnnlib
from torch_utils import misc
from torch_utils import persistence
from torch_utils import training_stats


def learning_rate_schedule(cur_nimg, batch_size, ref_lr=100e-4, ref_batches=70e3, rampup_Mimg=10):
    """alpha_ref / sqrt(max(t / t_ref, 1)) with a linear ramp-up (EDM2 Eq. 67; EDM: no decay)."""
    lr = ref_lr
    if ref_batches > 0:
        lr /= np.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1)
    return lr


def step_seed(seed: int, rank: int, cur_nimg: int) -> int:
    """RNG seed of one training step, a pure function of (seed, rank, cur_nimg)."""
    return int(np.random.SeedSequence([seed, rank, cur_nimg]).generate_state(1)[0])


class Recipe:
    """The questions the training loop asks; subclasses answer them for one reference recipe."""

    name = ''
    kimg_digits = 6             # Width of the kimg field in output file names.
    first_status_after_one_step = False  # A status line after the first step of each run or resume (EDM's tick 0)?

    def __init__(self, cfg):
        self.cfg = cfg

    def network_kwargs(self, interface: dict) -> dnnlib.EasyDict:
        """Network constructor kwargs as training_options.json records them, for the dataset interface."""
        from training.training_loop import network_kwargs
        return network_kwargs(self.cfg)

    def network_interface(self, interface: dict) -> dict:
        """Constructor kwargs the options do not record (EDM/EDM2: img_resolution, img_channels, label_dim)."""
        return interface

    def loss_kwargs(self) -> dnnlib.EasyDict:
        """Constructor kwargs of the loss."""
        from training.training_loop import loss_kwargs
        return loss_kwargs(self.cfg)

    def options_kwargs(self) -> dict:
        """The loss entry of training_options.json."""
        return self.loss_kwargs()

    def summary_inputs(self, batch: int, image_shape, label_dim: int, device) -> list:
        """Example inputs for the module summary: (images, noise levels, labels)."""
        return [torch.zeros([batch, *image_shape], device=device), torch.ones([batch], device=device),
                torch.zeros([batch, label_dim], device=device)]

    def make_encoder(self, dataset):
        """(encoder, encoder_kwargs) mapping dataset pixels to model space; (None, None) = [-1, 1] pixels."""
        return None, None

    def seed_rng(self, rank: int, cur_nimg: int | None = None) -> None:
        """Reseed before the network is built (cur_nimg None) or before the step at cur_nimg: SeedSequence of (seed, rank, cur_nimg)."""
        torch.manual_seed(step_seed(self.cfg.seed, rank, cur_nimg or 0))

    def data_sampler(self, dataset, rank: int, world: int, start_idx: int) -> torch.utils.data.Sampler:
        """Training data order from image start_idx on: a fresh (seed, epoch) permutation per epoch."""
        return misc.InfiniteSampler(dataset=dataset, rank=rank, num_replicas=world, seed=self.cfg.seed,
                                    window_size=None, start_idx=start_idx)

    def make_ema(self, net):
        """The EMA tracker of the network being trained."""
        raise NotImplementedError

    def load_transfer(self, ctx) -> str:
        """--transfer: copy weights of another network into ctx.net (the loop then resets the EMA); returns what was read."""
        data = persistence.load_pickle(self.cfg.transfer, trust=self.cfg.trust_pickle)
        src = data['ema'] if isinstance(data, dict) else data
        misc.copy_params_and_buffers(src_module=src, dst_module=ctx.net, require_all=False)
        return 'ema' if isinstance(data, dict) else 'network'

    def learning_rate(self, cur_nimg: int) -> float:
        """Learning rate of the optimizer step taken at cur_nimg (the images seen before the step)."""
        cfg = self.cfg
        return learning_rate_schedule(cur_nimg, cfg.batch_size, ref_lr=cfg.lr, ref_batches=cfg.lr_decay_batches,
                                      rampup_Mimg=cfg.lr_rampup_Mimg)

    def clean_gradients(self, params) -> None:
        """Make the gradients of params safe for the optimizer step (in place)."""
        raise NotImplementedError

    def update_ema(self, ema, prev_nimg: int, cur_nimg: int) -> None:
        """Advance the EMA after the optimizer step that took training from prev_nimg to cur_nimg."""
        raise NotImplementedError

    def prepare(self, ctx) -> None:
        """Last step of the loop's setup, on every rank (load what evaluate() needs)."""

    def evaluate(self, ctx) -> bool:
        """Measure the network before a snapshot (every rank); True when a value was reported for this status line."""
        return False

    def kimg_name(self, cur_nimg: int) -> str:
        """The kimg field of network-snapshot / training-state file names."""
        return f'{cur_nimg // 1000:0{self.kimg_digits}d}'

    def stats_line(self, stats: dict) -> str:
        """One stats.jsonl line from the collector's {name: {num, mean, std}}."""
        raise NotImplementedError

    def save_snapshot(self, ctx) -> list[str]:
        """Write the network snapshot(s) of the current EMA (rank 0); returns their paths."""
        raise NotImplementedError


class EDMRecipe(Recipe):
    """EDM (Karras et al. 2022, training/training_loop.py): Adam with a linear ramp-up, half-life EMA."""

    name = 'edm'
    kimg_digits = 6
    first_status_after_one_step = True  # EDM prints tick 0 after the first step, so start-up shows at once

    def make_ema(self, net):
        from training.phema import TraditionalEMA
        cfg = self.cfg
        rampup = None if (cfg.transfer and not cfg.resume) else cfg.ema_rampup_ratio
        return TraditionalEMA(net=net, halflife_Mimg=cfg.ema_halflife_Mimg, rampup_ratio=rampup)

    def clean_gradients(self, params) -> None:
        # EDM replaces NaN by 0 and clamps Inf to +-1e5.
        for grad in [p.grad for p in params if p.grad is not None]:
            torch.nan_to_num(grad, nan=0, posinf=1e5, neginf=-1e5, out=grad)

    def update_ema(self, ema, prev_nimg: int, cur_nimg: int) -> None:
        # EDM advances its EMA with the image count before the step.
        ema.update(cur_nimg=prev_nimg, batch_size=self.cfg.batch_size)

    def stats_line(self, stats: dict) -> str:
        return json.dumps(dict(stats, timestamp=time.time()))

    def save_snapshot(self, ctx) -> list[str]:
        ema = copy.deepcopy(ctx.ema.get()).eval().requires_grad_(False).cpu()
        data = dict(ema=ema, loss_fn=ctx.loss_fn, augment_pipe=ctx.augment_pipe, dataset_kwargs=dict(ctx.dataset_kwargs))
        path = os.path.join(ctx.run_dir, f'network-snapshot-{self.kimg_name(ctx.cur_nimg)}.pkl')
        persistence.save_pickle(data, path)
        return [path]


class EDM2Recipe(Recipe):
    """EDM2 (Karras et al. 2024, training/training_loop.py): inverse-sqrt decay, power-function EMA, fp16 snapshots."""

    name = 'edm2'
    kimg_digits = 7

    def make_encoder(self, dataset):
        names = {3: 'training.encoders.StandardRGBEncoder', 8: 'training.encoders.StabilityVAEEncoder'}
        if dataset.num_channels not in names:
            raise ValueError(f'--data={self.cfg.data}: unsupported channel count {dataset.num_channels} '
                             f'(EDM2 needs 3 for RGB or 8 for VAE latents)')
        kwargs = dnnlib.EasyDict(class_name=names[dataset.num_channels])
        return dnnlib.util.construct_class_by_name(**kwargs), kwargs

    def seed_rng(self, rank: int, cur_nimg: int | None = None) -> None:
        # EDM2: set_random_seed(seed, rank) before building the network, (seed, rank, cur_nimg) before each step.
        misc.set_random_seed(self.cfg.seed, rank) if cur_nimg is None else misc.set_random_seed(self.cfg.seed, rank, cur_nimg)

    def data_sampler(self, dataset, rank: int, world: int, start_idx: int) -> torch.utils.data.Sampler:
        # EDM2's order: per-epoch permutation by hash((seed, epoch)), rank r from start_idx + r.
        return misc.EDM2InfiniteSampler(dataset=dataset, rank=rank, num_replicas=world, seed=self.cfg.seed,
                                        start_idx=start_idx)

    def make_ema(self, net):
        from training.phema import PowerFunctionEMA
        return PowerFunctionEMA(net=net, stds=list(self.cfg.ema_stds))

    def learning_rate(self, cur_nimg: int) -> float:
        lr = super().learning_rate(cur_nimg)
        training_stats.report('Loss/learning_rate', lr)
        return lr

    def clean_gradients(self, params) -> None:
        # EDM2 zeroes every non-finite gradient entry.
        for grad in [p.grad for p in params if p.grad is not None]:
            torch.nan_to_num(grad, nan=0, posinf=0, neginf=0, out=grad)

    def update_ema(self, ema, prev_nimg: int, cur_nimg: int) -> None:
        # EDM2 advances its EMA with the image count after the step.
        ema.update(cur_nimg=cur_nimg, batch_size=self.cfg.batch_size)

    def stats_line(self, stats: dict) -> str:
        items = {name: (value.mean if np.isfinite(value.mean) else 'NaN') for name, value in stats.items()}
        return json.dumps(dict(items, timestamp=round(time.time(), 3)))

    def save_snapshot(self, ctx) -> list[str]:
        from training import phema
        paths = []
        for ema_net, suffix in ctx.ema.get():
            data = dnnlib.EasyDict(encoder=ctx.encoder, dataset_kwargs=ctx.dataset_kwargs, loss_fn=ctx.loss_fn)
            data.ema = copy.deepcopy(ema_net).cpu().eval().requires_grad_(False).to(torch.float16)
            paths.append(os.path.join(ctx.run_dir, f'network-snapshot-{self.kimg_name(ctx.cur_nimg)}{suffix}.pkl'))
            persistence.save_pickle(data, paths[-1])
        phema.record_snapshots(ctx.run_dir, [os.path.basename(p) for p in paths], ctx.cur_nimg)
        return paths


# A recipe in its own module is named by 'module.Class' (imported when used).
RECIPE_CLASSES: dict[str, type | str] = {'edm': EDMRecipe, 'edm2': EDM2Recipe, 'ddpm': 'training.recipe_ddpm.DDPMRecipe',
                                          'cifar-edm2': 'training.recipe_cifar_edm2.CifarEDM2Recipe'}


def make_recipe(cfg) -> Recipe:
    """The recipe object of cfg.recipe; ValueError lists the valid names."""
    if cfg.recipe not in RECIPE_CLASSES:
        raise ValueError(f'recipe={cfg.recipe!r} must be one of {", ".join(RECIPE_CLASSES)}')
    cls = RECIPE_CLASSES[cfg.recipe]
    return (dnnlib.util.get_obj_by_name(cls) if isinstance(cls, str) else cls)(cfg)
