"""DDPM presets and checks: configs/cifar10.json, celeba.json and celebahq.json of tqch/ddpm-torch.

The DDPM recipe reuses TrainConfig: hid_channels = model_channels, ch_multipliers = channel_mult,
num_res_blocks = num_blocks, drop_rate = dropout, apply_attn = the levels whose resolution is in
attn_resolutions, Adam betas (beta1, beta2) = adam_betas; the fields below are DDPM-only.
"""

from dataclasses import replace

from training.presets import TrainConfig

# TrainConfig field -> the train.py flag that sets it (DDPM recipe only).
DDPM_FLAGS = {
    'timesteps': '--timesteps', 'beta_schedule': '--beta-schedule', 'beta_start': '--beta-start',
    'beta_end': '--beta-end', 'model_mean_type': '--model-mean-type', 'model_var_type': '--model-var-type',
    'loss_type': '--loss-type', 'ema_decay': '--ema-decay', 'grad_norm': '--grad-norm',
    'lr_warmup_steps': '--warmup', 'epochs': '--epochs', 'chkpt_intv': '--chkpt-intv', 'block_size': '--block-size',
    'eval': '--eval', 'eval_total_size': '--eval-total-size', 'eval_batch_size': '--eval-batch-size',
    'eval_ref': '--eval-ref', 'use_ddim': '--use-ddim', 'skip_schedule': '--skip-schedule', 'subseq_size': '--subseq-size',
}
_OPTIONAL = ('epochs', 'chkpt_intv', 'eval_ref')  # DDPM fields that may stay None.

# Images per epoch of the reference datasets (training split), for the presets' total_nimg.
EPOCH_SIZES = {'cifar10': 50_000, 'celeba': 162_770, 'celebahq': 30_000}


def _ddpm(dataset: str, resolution: int, channel_mult: tuple, dropout: float, var_type: str, lr: float,
          batch_size: int, epochs: int) -> TrainConfig:
    return TrainConfig(
        recipe='ddpm', arch='ddpm', precond='ddpm', cond=False, resolution=resolution, model_channels=128,
        channel_mult=channel_mult, num_blocks=2, attn_resolutions=(16,), dropout=dropout, augment=0.0, xflip=True,
        total_nimg=epochs * (EPOCH_SIZES[dataset] // batch_size) * batch_size, epochs=epochs, batch_size=batch_size,
        lr=lr, lr_rampup_Mimg=0.0, lr_decay_batches=0.0, adam_betas=(0.9, 0.999), ema_rampup_ratio=None,
        timesteps=1000, beta_schedule='linear', beta_start=1e-4, beta_end=0.02, model_mean_type='eps',
        model_var_type=var_type, loss_type='mse', ema_decay=0.9999, grad_norm=1.0, lr_warmup_steps=5000,
        status_nimg=50_000, workers=2, block_size=1, eval=False, eval_total_size=50_000, eval_batch_size=256,
        use_ddim=False, skip_schedule='linear', subseq_size=50,
        # ddpm-torch --chkpt-intv 120 (epochs); the image counts are those of the reference dataset size.
        chkpt_intv=120, snapshot_nimg=120 * (EPOCH_SIZES[dataset] // batch_size) * batch_size,
        checkpoint_nimg=120 * (EPOCH_SIZES[dataset] // batch_size) * batch_size)


DDPM_PRESETS: dict[str, TrainConfig] = {
    'ddpm-cifar10-32x32':     _ddpm('cifar10', 32, (1, 2, 2, 2), 0.1, 'fixed-large', 2e-4, 128, 2040),
    'ddpm-celeba-64x64':      _ddpm('celeba', 64, (1, 2, 2, 2), 0.0, 'fixed-small', 2e-5, 128, 600),
    'ddpm-celebahq-256x256':  _ddpm('celebahq', 256, (1, 1, 2, 2, 4, 4), 0.0, 'fixed-small', 2e-5, 64, 1200),
    # Tiny CPU configuration (32 channels: the UNet's GroupNorm has 32 groups).
    'tiny-ddpm': replace(_ddpm('cifar10', 32, (1, 2), 0.0, 'fixed-large', 2e-3, 32, 1), resolution=None,
                         model_channels=32, num_blocks=1, attn_resolutions=(), xflip=False, total_nimg=4096, epochs=None,
                         lr_warmup_steps=10, status_nimg=1024, snapshot_nimg=4096, checkpoint_nimg=4096, chkpt_intv=None,
                         workers=0, device='cpu'),
}


def resolve_ddpm(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    """An explicit --duration replaces the preset's --epochs, an explicit --snapshot / --checkpoint its --chkpt-intv."""
    intervals = [field for field in ('snapshot_nimg', 'checkpoint_nimg') if field in overrides]
    if 'chkpt_intv' in overrides and intervals:
        flags = ' and '.join(f'--{f.split("_")[0]}={overrides[f]}' for f in intervals)
        raise ValueError(f'--chkpt-intv={overrides["chkpt_intv"]:g} (epochs) and {flags} (images) both set when to save; '
                         f'give one of them (EDM\'s --snap/--dump/--tick set --snapshot/--checkpoint too)')
    if cfg.recipe == 'ddpm' and 'total_nimg' in overrides and 'epochs' not in overrides:
        cfg = replace(cfg, epochs=None)
    if cfg.recipe == 'ddpm' and intervals and 'chkpt_intv' not in overrides:
        cfg = replace(cfg, chkpt_intv=None)
    return cfg


def validate_ddpm(cfg: TrainConfig) -> None:
    """DDPM options only with the DDPM recipe, EDM-only options not with it, and valid DDPM choices."""
    if cfg.recipe != 'ddpm':
        given = [f'{flag}={getattr(cfg, field)}' for field, flag in DDPM_FLAGS.items() if getattr(cfg, field) is not None]
        if given or 'ddpm' in (cfg.arch, cfg.precond):
            what = ' '.join(given) or f'--arch={cfg.arch} --precond={cfg.precond}'
            raise ValueError(f'{what}: DDPM options need a DDPM preset (--preset=ddpm-cifar10-32x32, ddpm-celeba-64x64, '
                             f'ddpm-celebahq-256x256 or tiny-ddpm), but --preset={cfg.preset} is an {cfg.recipe.upper()} recipe')
        return
    if (cfg.arch, cfg.precond) != ('ddpm', 'ddpm'):
        raise ValueError(f'--arch={cfg.arch} --precond={cfg.precond}: the DDPM recipe trains its own UNet; leave them out')
    edm_only = dict(stf=cfg.stf, cond=cfg.cond, fp16=cfg.fp16, P_mean=cfg.P_mean is not None, P_std=cfg.P_std is not None,
                    augment=cfg.augment > 0)
    flags = {'stf': '--stf', 'cond': '--cond', 'fp16': '--fp16', 'P_mean': '--P_mean', 'P_std': '--P_std', 'augment': '--augment'}
    given = [flags[k] for k, v in edm_only.items() if v]
    if given:
        raise ValueError(f'{", ".join(given)}: EDM/EDM2 option(s) not used by the DDPM recipe (--preset={cfg.preset}); '
                         f'leave them out')
    missing = [flag for field, flag in DDPM_FLAGS.items() if field not in _OPTIONAL and getattr(cfg, field) is None]
    if missing:
        raise ValueError(f'the DDPM recipe needs {", ".join(missing)}')
    from training import ddpm  # here: train.py --help and presets stay free of torch
    ddpm.get_beta_schedule(cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.timesteps)  # ValueError names the flag.
    ddpm.GaussianDiffusion(ddpm.get_beta_schedule(cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.timesteps),
                           cfg.model_mean_type, cfg.model_var_type, cfg.loss_type)
    if not 0 < cfg.beta_start <= cfg.beta_end <= 1:
        raise ValueError(f'--beta-start={cfg.beta_start} --beta-end={cfg.beta_end} must satisfy 0 < start <= end <= 1')
    if cfg.model_channels % 32 != 0:
        raise ValueError(f'--cbase={cfg.model_channels} must be a multiple of 32 (GroupNorm with 32 groups in the DDPM UNet)')
    if cfg.channel_mult[0] != 1:
        raise ValueError(f'--cres={",".join(map(str, cfg.channel_mult))} must start with 1 for the DDPM UNet')
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f'--ema-decay={cfg.ema_decay} must lie in [0, 1)')
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise ValueError(f'--epochs={cfg.epochs} must be positive')
    _validate_ddpm_extras(cfg)


def _validate_ddpm_extras(cfg: TrainConfig) -> None:
    """--chkpt-intv, --block-size and the --eval options."""
    if cfg.chkpt_intv is not None and cfg.chkpt_intv <= 0:
        raise ValueError(f'--chkpt-intv={cfg.chkpt_intv:g} must be a positive number of epochs')
    if cfg.block_size < 1:
        raise ValueError(f'--block-size={cfg.block_size} must be at least 1 (1 = no pixel unshuffle)')
    if cfg.resolution is not None and cfg.block_size > 1:
        check_block_size(cfg.resolution, cfg.block_size, len(cfg.channel_mult), f'--preset={cfg.preset}')
    for field in ('eval_total_size', 'eval_batch_size', 'subseq_size'):
        if getattr(cfg, field) < 1:
            raise ValueError(f'{DDPM_FLAGS[field]}={getattr(cfg, field)} must be at least 1')
    if cfg.eval and cfg.eval_total_size < 2:
        raise ValueError(f'--eval-total-size={cfg.eval_total_size}: FID needs at least 2 images')
    if cfg.skip_schedule not in ('linear', 'quadratic'):
        raise ValueError(f'--skip-schedule={cfg.skip_schedule} must be linear or quadratic')
    if cfg.use_ddim and cfg.subseq_size > cfg.timesteps:
        raise ValueError(f'--subseq-size={cfg.subseq_size} is larger than --timesteps={cfg.timesteps}; use at most {cfg.timesteps}')


def check_block_size(resolution: int, block_size: int, levels: int, source: str) -> None:
    """The UNet sees resolution / block_size pixels and halves them levels - 1 times; ValueError names --block-size."""
    inner = resolution // block_size
    if resolution % block_size != 0 or inner < 2 ** (levels - 1):
        raise ValueError(f'--block-size={block_size} does not fit {resolution}x{resolution} images ({source}): the '
                         f'resolution must be a multiple of it and leave at least {2 ** (levels - 1)} pixels for the '
                         f'{levels} UNet levels; use a smaller --block-size')
