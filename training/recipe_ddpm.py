"""The DDPM training recipe of tqch/ddpm-torch (train.py, Trainer) as a recipe object for the shared loop.

Adam (0.9, 0.999) at a constant rate after a linear warm-up over `lr_warmup_steps` optimizer steps,
global gradient-norm clipping, an EMA with decay min(decay, (1 + n) / (10 + n)), integer timesteps
drawn uniformly, then the noise. Snapshots are checkpoints in the published layout
({model, optimizer, scheduler, ema: {decay, shadow, num_updates}, epoch}) that the reference's
generate.py and our generate.py read; they add a 'config' entry (UNet and diffusion settings).
"""

import copy
import logging
import os

import torch

import dnnlib
from training import ddpm
from training.recipes import EDMRecipe


class DDPMLoss:
    """Per-sample DDPM loss at t ~ U{0..T-1} (t drawn before the noise, as in the reference Trainer)."""

    def __init__(self,
        betas,                          # Float64 beta schedule [T].
        model_mean_type = 'eps',        # 'mean' | 'x_0' | 'eps'.
        model_var_type  = 'fixed-large',# 'fixed-small' | 'fixed-large' | 'learned'.
        loss_type       = 'mse',        # 'mse' (hybrid with learned) | 'kl'.
    ):
        self.diffusion = ddpm.GaussianDiffusion(betas, model_mean_type, model_var_type, loss_type)

    def __call__(self, net, images, labels=None, augment_pipe=None):
        timesteps = torch.empty([images.shape[0]], dtype=torch.int64, device=images.device).random_(0, self.diffusion.timesteps)
        noise = torch.empty_like(images).normal_()
        return self.diffusion.train_losses(net, images, timesteps, noise)


class DDPMEMA:
    """EMA of the trainable parameters with decay min(decay, (1 + n) / (10 + n)) (ddpm-torch utils EMA)."""

    @torch.no_grad()
    def __init__(self,
        net,                # Network being trained.
        decay = 0.9999,     # Final decay.
    ):
        self.net, self.decay, self.num_updates = net, decay, 0
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)
        self.names = [name for name, p in net.named_parameters() if p.requires_grad]

    def _pairs(self):
        params, ema_params = dict(self.net.named_parameters()), dict(self.ema.named_parameters())
        return [ema_params[n] for n in self.names], [params[n].detach() for n in self.names]

    @torch.no_grad()
    def reset(self):
        """Set the EMA to the current network parameters."""
        ema_params, params = self._pairs()
        torch._foreach_copy_(ema_params, params)

    @torch.no_grad()
    def update(self, cur_nimg=None, batch_size=None):
        """shadow += (1 - d)(param - shadow), d = min(decay, (1 + n) / (10 + n)), n = updates so far."""
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_params, params = self._pairs()
        torch._foreach_lerp_(ema_params, params, 1 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def get(self):
        """The EMA network (buffers from the network)."""
        for ema_buf, buf in zip(self.ema.buffers(), self.net.buffers()):
            ema_buf.copy_(buf)
        return self.ema

    def state_dict(self):
        """{decay, shadow, num_updates}, the reference checkpoint's 'ema' entry."""
        params = dict(self.ema.named_parameters())
        return dict(decay=self.decay, shadow={n: params[n].detach().clone() for n in self.names},
                    num_updates=self.num_updates)

    def load_state_dict(self, state):
        """Inverse of state_dict()."""
        missing = sorted(set(self.names) - set(state['shadow']))
        if missing:
            raise ValueError(f'EMA shadow lacks {", ".join(missing[:5])}')
        params = dict(self.ema.named_parameters())
        with torch.no_grad():
            for name in self.names:
                params[name].copy_(state['shadow'][name])
        self.decay, self.num_updates = state['decay'], int(state['num_updates'])


def attn_levels(resolution: int, channel_mult, attn_resolutions) -> list[bool]:
    """Per-level attention flags of the reference UNet from the resolutions that have attention."""
    return [resolution // 2 ** i in set(attn_resolutions or ()) for i in range(len(channel_mult))]


class DDPMRecipe(EDMRecipe):
    """DDPM (Ho et al. 2020; ddpm-torch train.py): warm-up then constant lr, grad-norm clip, decay EMA."""

    name = 'ddpm'
    kimg_digits = 6
    first_status_after_one_step = False  # status lines only every --status images

    def betas(self):
        cfg = self.cfg
        return ddpm.get_beta_schedule(cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.timesteps)

    def unet_kwargs(self, img_resolution: int, img_channels: int) -> dict:
        """UNet constructor arguments, named as the reference's configs/<dataset>.json; with --block-size b the
        channels are multiplied by b^2 and attention stays at the preset's levels (the reference's per-level apply_attn)."""
        cfg = self.cfg
        out_channels = 2 * img_channels if cfg.model_var_type == 'learned' else img_channels
        area = (cfg.block_size or 1) ** 2
        return dict(in_channels=img_channels * area, hid_channels=cfg.model_channels, out_channels=out_channels * area,
                    ch_multipliers=list(cfg.channel_mult), num_res_blocks=cfg.num_blocks,
                    apply_attn=attn_levels(img_resolution, cfg.channel_mult, cfg.attn_resolutions), drop_rate=cfg.dropout)

    def network_kwargs(self, interface: dict) -> dnnlib.EasyDict:
        kwargs = self.unet_kwargs(interface['img_resolution'], interface['img_channels'])
        block_size = self.cfg.block_size or 1
        if block_size > 1:
            from training.presets_ddpm import check_block_size
            check_block_size(interface['img_resolution'], block_size, len(self.cfg.channel_mult), f'--data={self.cfg.data}')
            return dnnlib.EasyDict(class_name='training.networks_ddpm.ModelWrapper', block_size=block_size, **kwargs)
        return dnnlib.EasyDict(class_name='training.networks_ddpm.UNet', **kwargs)

    def network_interface(self, interface: dict) -> dict:
        return {}

    def loss_kwargs(self) -> dnnlib.EasyDict:
        cfg = self.cfg
        return dnnlib.EasyDict(class_name='training.recipe_ddpm.DDPMLoss', betas=self.betas(),
                               model_mean_type=cfg.model_mean_type, model_var_type=cfg.model_var_type,
                               loss_type=cfg.loss_type)

    def options_kwargs(self) -> dict:
        """Loss settings for training_options.json (JSON: the schedule by name, not the betas)."""
        cfg = self.cfg
        return dict(class_name='training.recipe_ddpm.DDPMLoss', timesteps=cfg.timesteps, beta_schedule=cfg.beta_schedule,
                    beta_start=cfg.beta_start, beta_end=cfg.beta_end, model_mean_type=cfg.model_mean_type,
                    model_var_type=cfg.model_var_type, loss_type=cfg.loss_type)

    def summary_inputs(self, batch: int, image_shape, label_dim: int, device) -> list:
        return [torch.zeros([batch, *image_shape], device=device), torch.zeros([batch], dtype=torch.int64, device=device)]

    def make_ema(self, net):
        return DDPMEMA(net=net, decay=self.cfg.ema_decay)

    def learning_rate(self, cur_nimg: int) -> float:
        # LambdaLR factor min((step + 1) / warmup, 1), step = optimizer steps taken before this one.
        cfg = self.cfg
        step = cur_nimg // cfg.batch_size
        return cfg.lr * min((step + 1) / cfg.lr_warmup_steps, 1.0) if cfg.lr_warmup_steps else cfg.lr

    def clean_gradients(self, params) -> None:
        if self.cfg.grad_norm:
            torch.nn.utils.clip_grad_norm_(list(params), max_norm=self.cfg.grad_norm)

    def update_ema(self, ema, prev_nimg: int, cur_nimg: int) -> None:
        ema.update()

    def prepare(self, ctx) -> None:
        """--eval: the detector and the reference statistics, before the first step."""
        if self.cfg.eval:
            from training.eval_ddpm import Evaluator
            ctx.evaluator = Evaluator(self.cfg, ctx.run_dir, ctx.device, logging.getLogger('edm.training').info)

    def evaluate(self, ctx) -> bool:
        """--eval: FID of the EMA (ddpm-torch Evaluator at every checkpoint), reported as Metrics/fid."""
        if not self.cfg.eval:
            return False
        from torch_utils import training_stats
        if ctx.get('evaluator') is None:
            self.prepare(ctx)
        diffusion = {k: v for k, v in self.options_kwargs().items() if k != 'class_name'}
        fid = ctx.evaluator(ctx.ema.get(), ctx.dataset.resolution, diffusion)
        training_stats.report0('Metrics/fid', fid)
        ctx.eval_results = dict(cur_nimg=ctx.cur_nimg, fid=fid)
        return True

    def load_transfer(self, ctx) -> str:
        """--transfer: a DDPM checkpoint's EMA (else raw) weights, read safely (networks_ddpm.load_transfer)."""
        from training.networks_ddpm import load_transfer
        return load_transfer(ctx.net, self.cfg.transfer)

    def save_snapshot(self, ctx) -> list[str]:
        # An epoch is one pass over the un-flipped images in full batches (training_loop.resolve_epochs).
        images = len(ctx.dataset) // (2 if ctx.cfg.xflip else 1)
        images_per_epoch = max(images // ctx.cfg.batch_size, 1) * ctx.cfg.batch_size
        steps = ctx.cur_nimg // ctx.cfg.batch_size
        lr = self.learning_rate(ctx.cur_nimg)
        data = dict(model=ctx.net.state_dict(), optimizer=ctx.optimizer.state_dict(),
                    scheduler=dict(base_lrs=[self.cfg.lr], last_epoch=steps, _step_count=steps + 1, _last_lr=[lr]),
                    ema=ctx.ema.state_dict(), epoch=ctx.cur_nimg // images_per_epoch,
                    config=dict(unet=self.unet_kwargs(ctx.dataset.resolution, ctx.net.in_channels),
                                resolution=ctx.dataset.resolution, block_size=self.cfg.block_size or 1,
                                diffusion=self.options_kwargs(), cur_nimg=ctx.cur_nimg))
        del data['config']['diffusion']['class_name']
        if (ctx.get('eval_results') or {}).get('cur_nimg') == ctx.cur_nimg:
            data['fid'] = ctx.eval_results['fid']  # the reference stores its evaluation results in the checkpoint
        path = os.path.join(ctx.run_dir, f'network-snapshot-{self.kimg_name(ctx.cur_nimg)}.pt')
        with dnnlib.util.atomic_write(path, 'wb') as f:
            torch.save(data, f)
        return [path]
