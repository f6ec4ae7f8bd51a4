"""train.py presets of the CIFAR EDM2 reimplementation (FutureXiang/edm2 config/<dataset>/<C|E>.yaml).

The recipe 'cifar-edm2' (training/recipe_cifar_edm2.py) reuses TrainConfig: n_channels = model_channels,
ch_mults = channel_mult, n_blocks = num_blocks, is_attn = the levels whose resolution is in
attn_resolutions, net_type = edm2_config, lrate = lr, batch_size = batch_size, p_mean / p_std = P_mean /
P_std; the fields in CIFAR_FLAGS are its own. Durations are n_epoch epochs of the reference's epoch
length (training/recipe_cifar_edm2.steps_per_epoch), snapshots every 100 epochs.
"""

from dataclasses import replace

from training import cifar_edm2_configs as rc
from training.presets import TrainConfig

# TrainConfig fields of the cifar-edm2 recipe only, with what they mean.
CIFAR_FLAGS = {
    'lr_warmup_epochs': 'warm_epoch', 'lr_tref_epochs': 'tref_epoch', 'ema_beta': 'ema', 'epoch_images': 'epoch length',
    'random_flip': 'flip',
}


def attn_resolutions(resolution: int, is_attn) -> tuple:
    """is_attn per level -> the resolutions that get attention."""
    return tuple(resolution >> level for level, flag in enumerate(is_attn) if flag)


def preset(ref: rc.ReferenceConfig) -> TrainConfig:
    """The TrainConfig of one reference YAML."""
    net = ref.network_kwargs()
    epoch_nimg = rc.steps_per_epoch(ref.num_images, ref.batch_size) * ref.batch_size
    return TrainConfig(
        recipe='cifar-edm2', arch='cifar-edm2', precond='cifar-edm2', edm2_config=ref.config, cond=False,
        resolution=net['img_resolution'], model_channels=net['n_channels'], channel_mult=tuple(net['ch_mults']),
        num_blocks=net['n_blocks'], attn_resolutions=attn_resolutions(net['img_resolution'], net['is_attn']),
        dropout=net['dropout'], P_mean=ref.P_mean, P_std=ref.P_std, sigma_data=ref.sigma_data, augment=0.0, xflip=False,
        total_nimg=ref.n_epoch * epoch_nimg, batch_size=ref.batch_size, lr=ref.lrate, lr_rampup_Mimg=0.0,
        lr_decay_batches=0.0, adam_betas=(0.9, 0.999), ema_rampup_ratio=None, lr_warmup_epochs=ref.warm_epoch,
        lr_tref_epochs=ref.tref_epoch if ref.tref_epoch is not None else ref.n_epoch, ema_beta=ref.ema,
        epoch_images=ref.num_images, random_flip=ref.flip, status_nimg=epoch_nimg, snapshot_nimg=100 * epoch_nimg,
        checkpoint_nimg=100 * epoch_nimg, workers=1)


CIFAR_EDM2_PRESETS: dict[str, TrainConfig] = {f'cifar-edm2-{name}': preset(ref) for name, ref in rc.REFERENCE_CONFIGS.items()}
# Tiny CPU configuration (config E, 8x8 data; 32 channels: C and E normalise with GroupNorm(32)).
CIFAR_EDM2_PRESETS['tiny-cifar-edm2'] = replace(
    CIFAR_EDM2_PRESETS['cifar-edm2-cifar10-e'], resolution=8, model_channels=32, channel_mult=(1, 1), num_blocks=2,
    attn_resolutions=(4,), dropout=0.0, total_nimg=4096, batch_size=32, lr=1e-2, lr_warmup_epochs=2, lr_tref_epochs=4,
    epoch_images=256, status_nimg=1024, snapshot_nimg=4096, checkpoint_nimg=4096, workers=0, device='cpu')


def validate_cifar_edm2(cfg: TrainConfig) -> None:
    """cifar-edm2 options only with that recipe, and consistent with its network."""
    uses = 'cifar-edm2' in (cfg.recipe, cfg.arch, cfg.precond)
    given = [f'{field}={getattr(cfg, field)}' for field in CIFAR_FLAGS if getattr(cfg, field) is not None]
    if not uses:
        if given:
            raise ValueError(f'{", ".join(given)}: options of the CIFAR EDM2 recipe need a cifar-edm2-* preset, '
                             f'but --preset={cfg.preset} is an {cfg.recipe.upper()} recipe')
        return
    if (cfg.recipe, cfg.arch, cfg.precond) != ('cifar-edm2',) * 3:
        raise ValueError(f'--arch={cfg.arch} --precond={cfg.precond}: the CIFAR EDM2 recipe trains its own networks; '
                         f'use a cifar-edm2-* preset and leave --arch/--precond out')
    if cfg.resolution is None:
        raise ValueError('the CIFAR EDM2 recipe needs --resolution (the attention levels follow from it)')
    if cfg.edm2_config not in ('C', 'E', 'G'):
        raise ValueError(f'--edm2-config={cfg.edm2_config}: the CIFAR EDM2 networks are C, E or G')
    if cfg.cond:
        raise ValueError('--cond=1: the CIFAR EDM2 networks are unconditional; use --cond=0')
    if cfg.stf or cfg.augment > 0 or cfg.xflip:
        raise ValueError('--stf, --augment and --xflip are not part of the CIFAR EDM2 recipe (it flips each image at '
                         'random instead); leave them out')
    missing = [field for field in CIFAR_FLAGS if getattr(cfg, field) is None]
    if missing:
        raise ValueError(f'the CIFAR EDM2 recipe needs {", ".join(missing)}; start from a cifar-edm2-* preset')
    if cfg.edm2_config != 'G' and cfg.model_channels % 32 != 0:
        raise ValueError(f'--cbase={cfg.model_channels} must be a multiple of 32 (GroupNorm(32) in configs C and E)')
