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
    'lr_warmup_steps': '--warmup', 'epochs': '--epochs',
}

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
        status_nimg=50_000, snapshot_nimg=5_000_000, checkpoint_nimg=5_000_000, workers=2)


DDPM_PRESETS: dict[str, TrainConfig] = {
    'ddpm-cifar10-32x32':     _ddpm('cifar10', 32, (1, 2, 2, 2), 0.1, 'fixed-large', 2e-4, 128, 2040),
    'ddpm-celeba-64x64':      _ddpm('celeba', 64, (1, 2, 2, 2), 0.0, 'fixed-small', 2e-5, 128, 600),
    'ddpm-celebahq-256x256':  _ddpm('celebahq', 256, (1, 1, 2, 2, 4, 4), 0.0, 'fixed-small', 2e-5, 64, 1200),
    # Tiny CPU configuration (32 channels: the UNet's GroupNorm has 32 groups).
    'tiny-ddpm': replace(_ddpm('cifar10', 32, (1, 2), 0.0, 'fixed-large', 2e-3, 32, 1), resolution=None,
                         model_channels=32, num_blocks=1, attn_resolutions=(), xflip=False, total_nimg=4096, epochs=None,
                         lr_warmup_steps=10, status_nimg=1024, snapshot_nimg=4096, checkpoint_nimg=4096, workers=0,
                         device='cpu'),
}


def resolve_ddpm(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    """An explicit --duration replaces the preset's --epochs."""
    if cfg.recipe == 'ddpm' and 'total_nimg' in overrides and 'epochs' not in overrides:
        cfg = replace(cfg, epochs=None)
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
                    augment=cfg.augment > 0, transfer=cfg.transfer is not None)
    flags = {'stf': '--stf', 'cond': '--cond', 'fp16': '--fp16', 'P_mean': '--P_mean', 'P_std': '--P_std', 'augment': '--augment',
             'transfer': '--transfer'}
    given = [flags[k] for k, v in edm_only.items() if v]
    if given:
        raise ValueError(f'{", ".join(given)}: EDM/EDM2 option(s) not used by the DDPM recipe (--preset={cfg.preset}); '
                         f'leave them out')
    missing = [flag for field, flag in DDPM_FLAGS.items() if field != 'epochs' and getattr(cfg, field) is None]
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
