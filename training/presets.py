"""Training presets: the one source of truth for every training hyperparameter.

EDM presets reproduce the configurations of the EDM paper (README table of
NVlabs/edm; `--precond` switches to the VP/VE baselines). EDM2 presets reproduce
`config_presets` of NVlabs/edm2 `train_edm2.py`. Tiny presets train in seconds on
a CPU and are used by the tests and the quickstart.

`build_config(preset, **overrides)` returns a resolved, validated `TrainConfig`;
options that are `None` leave the preset value in place.
"""

import dataclasses
from dataclasses import dataclass, replace
from typing import Optional

ARCHS = ('ddpmpp', 'ncsnpp', 'adm', 'edm2', 'ddpm', 'cifar-edm2')
PRECONDS = ('vp', 've', 'edm', 'edm2', 'ddpm', 'cifar-edm2')
RECIPES = ('edm', 'edm2', 'ddpm', 'cifar-edm2')

# Architecture defaults of EDM train.py / EDM2 networks_edm2.UNet.
ARCH_DEFAULTS = {
    'ddpmpp': dict(model_channels=128, channel_mult=(2, 2, 2)),
    'ncsnpp': dict(model_channels=128, channel_mult=(2, 2, 2)),
    'adm':    dict(model_channels=192, channel_mult=(1, 2, 3, 4)),
    'edm2':   dict(model_channels=192, channel_mult=(1, 2, 3, 4)),
    'ddpm':   dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=2),
}


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run; units are in the names (nimg = images, Mimg = 1e6 images)."""

    # Recipe, data and model.
    recipe:             str                     = 'edm'     # 'edm' (EDM paper), 'edm2' (EDM2 paper) or 'ddpm' (Ho et al.).
    data:               Optional[str]           = None      # Dataset folder or zip; None = must be given.
    cond:               bool                    = False     # Class-conditional (needs labels in dataset.json).
    resolution:         Optional[int]           = None      # Required dataset resolution; None = any.
    arch:               str                     = 'ddpmpp'  # ddpmpp | ncsnpp | adm | edm2.
    precond:            str                     = 'edm'     # vp | ve | edm | edm2 (also selects the loss).
    model_channels:     Optional[int]           = None      # Base channel count; None = architecture default.
    channel_mult:       Optional[tuple]         = None      # Per-resolution multipliers; None = architecture default.
    num_blocks:         Optional[int]           = None      # Residual blocks per resolution; None = architecture default.
    attn_resolutions:   Optional[tuple]         = None      # Resolutions with self-attention; None = architecture default.
    dropout:            float                   = 0.13      # Dropout probability.
    edm2_config:        str                     = 'G'       # EDM2 Table 1 network config 'B'..'G' (arch=edm2 only).
    # Loss.
    P_mean:             Optional[float]         = None      # Mean of log sigma in training; None = loss default.
    P_std:              Optional[float]         = None      # Std of log sigma in training; None = loss default.
    sigma_data:         float                   = 0.5       # Standard deviation of the training data.
    stf:                bool                    = False     # Use the Stable Target Field loss.
    rbatch:             Optional[int]           = None      # STF reference batch per GPU, its training images included; None = 4096 (STF fork).
    augment:            float                   = 0.12      # Augmentation probability; 0 = off (EDM only).
    xflip:              bool                    = False     # Double the dataset with x-flips.
    # Optimisation.
    total_nimg:         int                     = 200_000_000  # Training duration in images.
    batch_size:         int                     = 512       # Total batch per optimizer step (all ranks).
    batch_gpu:          Optional[int]           = None      # Per-rank batch per accumulation round; None = no limit.
    lr:                 float                   = 1e-3      # Learning rate (EDM2: alpha_ref).
    lr_rampup_Mimg:     float                   = 10.0      # Linear learning-rate ramp-up.
    lr_decay_batches:   float                   = 0.0       # EDM2 inverse-sqrt decay start t_ref; 0 = no decay.
    adam_betas:         tuple                   = (0.9, 0.999)  # Adam (beta1, beta2).
    ema_halflife_Mimg:  float                   = 0.5       # EDM: EMA half-life.
    ema_rampup_ratio:   Optional[float]         = 0.05      # EDM: half-life ramp-up ratio; None = no ramp-up.
    ema_stds:           tuple                   = (0.050, 0.100)  # EDM2: power-function EMA relative stds.
    fp16:               bool                    = False     # Reference mixed precision (network fp16 path).
    bf16:               bool                    = False     # bf16 autocast for the network.
    loss_scaling:       float                   = 1.0       # Loss scaling factor for fp16.
    # Run.
    status_nimg:        Optional[int]           = 50_000    # Status line / stats.jsonl interval; None = never.
    snapshot_nimg:      Optional[int]           = 2_500_000 # Network snapshot interval; None = never.
    checkpoint_nimg:    Optional[int]           = 25_000_000  # Training state interval; None = only at the end.
    seed:               int                     = 0         # Global random seed.
    device:             str                     = 'auto'    # auto | cuda | cpu | mps.
    compile:            bool                    = False     # torch.compile the network (training/speed.py).
    compile_async:      bool                    = False     # With compile: train eagerly while a child process compiles (training/async_compile.py).
    fast:               bool                    = False     # The best measured speed set: bf16 + compile where the device runs them.
    channels_last:      bool                    = False     # Channels-last weights for the conv nets (inputs stay NCHW).
    deterministic:      bool                    = False     # torch.use_deterministic_algorithms.
    cudnn_benchmark:    bool                    = True      # cuDNN autotuning (EDM --bench); off when deterministic.
    workers:            int                     = 1         # DataLoader worker processes.
    cache:              bool                    = True      # Keep the dataset in CPU memory.
    transfer:           Optional[str]           = None      # Initialise weights from a network pickle.
    resume:             Optional[str]           = None      # Resume from this training-state-*.pt; None = newest in run dir.
    trust_pickle:       bool                    = False     # Let training states and --transfer pickles run code stored in them.
    allow_option_change: bool                   = False     # Resume even if run-altering options differ from the run's.
    preset:             str                     = ''        # Name of the preset this config came from.
    first_step:         bool                    = False     # Stop once the first optimizer step is done; save nothing.
    # DDPM recipe (tqch/ddpm-torch, training/presets_ddpm.py); None for the other recipes.
    timesteps:          Optional[int]           = None      # Diffusion steps T.
    beta_schedule:      Optional[str]           = None      # quad | linear | warmup10 | warmup50 | jsd.
    beta_start:         Optional[float]         = None      # First beta.
    beta_end:           Optional[float]         = None      # Last beta.
    model_mean_type:    Optional[str]           = None      # Network output: mean | x_0 | eps.
    model_var_type:     Optional[str]           = None      # learned | fixed-small | fixed-large.
    loss_type:          Optional[str]           = None      # mse (hybrid with learned) | kl.
    ema_decay:          Optional[float]         = None      # EMA decay (warmed up as (1 + n) / (10 + n)).
    grad_norm:          Optional[float]         = None      # Clip the global gradient norm; 0 = no clipping.
    lr_warmup_steps:    Optional[int]           = None      # Linear learning-rate warm-up in optimizer steps.
    epochs:             Optional[float]         = None      # Duration in epochs of the dataset; None = total_nimg.
    chkpt_intv:         Optional[float]         = None      # Snapshot and training-state interval in epochs; None = snapshot_nimg / checkpoint_nimg.
    block_size:         Optional[int]           = None      # Pixel-unshuffle block around the UNet (ddpm-torch ModelWrapper); 1 = none.
    eval:               Optional[bool]          = None      # FID of the EMA at every snapshot (ddpm-torch --eval).
    eval_total_size:    Optional[int]           = None      # --eval: images generated per evaluation.
    eval_batch_size:    Optional[int]           = None      # --eval: images per sampling batch (all ranks together).
    eval_ref:           Optional[str]           = None      # --eval: reference statistics (.npz / .pkl); None = computed from --data once.
    use_ddim:           Optional[bool]          = None      # --eval: sample with DDIM (eta 0) instead of all T ancestral steps.
    skip_schedule:      Optional[str]           = None      # --eval with DDIM: timestep subsequence linear | quadratic.
    subseq_size:        Optional[int]           = None      # --eval with DDIM: number of timesteps.
    # CIFAR EDM2 recipe (FutureXiang/edm2, training/presets_cifar_edm2.py); None for the other recipes.
    lr_warmup_epochs:   Optional[int]           = None      # Linear learning-rate warm-up, in epochs.
    lr_tref_epochs:     Optional[int]           = None      # Inverse-sqrt learning-rate decay from this epoch on.
    ema_beta:           Optional[float]         = None      # EMA decay, reached by ema-pytorch's 1 - k^(-2/3) warm-up.
    epoch_images:       Optional[int]           = None      # Images per epoch (training split) for the schedule.
    random_flip:        Optional[bool]          = None      # Flip each training image at random (not --xflip's copies).


def _edm(**kwargs) -> TrainConfig:
    return TrainConfig(recipe='edm', **kwargs)


def _edm2(channels, duration_Mi, lr, decay, dropout, P_mean, P_std, resolution) -> TrainConfig:
    return TrainConfig(
        recipe='edm2', cond=True, resolution=resolution, arch='edm2', precond='edm2', model_channels=channels,
        dropout=dropout, P_mean=P_mean, P_std=P_std, augment=0.0, total_nimg=duration_Mi << 20, batch_size=2048,
        lr=lr, lr_rampup_Mimg=10.0, lr_decay_batches=decay, adam_betas=(0.9, 0.99), ema_rampup_ratio=None,
        fp16=True, status_nimg=128 << 10, snapshot_nimg=8 << 20, checkpoint_nimg=128 << 20, workers=2, cache=False)


def _cifar_edm2(config: str) -> TrainConfig:
    schedule = dict(lr=4e-4, lr_decay_batches=0, total_nimg=50_000_000) if config == 'C' else \
               dict(lr=2e-2, lr_decay_batches=39062, total_nimg=100_000_000)
    return TrainConfig(
        recipe='edm2', cond=False, resolution=32, arch='edm2', precond='edm2', edm2_config=config,
        model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=2, attn_resolutions=(16,), dropout=0.13,
        P_mean=-1.2, P_std=1.2, augment=0.0, xflip=True, batch_size=512, lr_rampup_Mimg=10.0,
        adam_betas=(0.9, 0.99), ema_rampup_ratio=None, status_nimg=128 << 10, snapshot_nimg=5 << 20,
        checkpoint_nimg=25 << 20, workers=2, **schedule)


_FACES = dict(resolution=64, batch_size=256, channel_mult=(1, 2, 2, 2), lr=2e-4, augment=0.15)

PRESETS: dict[str, TrainConfig] = {
    # EDM paper, README table of NVlabs/edm (EDM preconditioning; vp = DDPM++, ve = NCSN++).
    'edm-cifar10-32x32-cond-vp':     _edm(cond=True, resolution=32, arch='ddpmpp'),
    'edm-cifar10-32x32-cond-ve':     _edm(cond=True, resolution=32, arch='ncsnpp'),
    'edm-cifar10-32x32-uncond-vp':   _edm(cond=False, resolution=32, arch='ddpmpp'),
    'edm-cifar10-32x32-uncond-ve':   _edm(cond=False, resolution=32, arch='ncsnpp'),
    'edm-ffhq-64x64-uncond-vp':      _edm(arch='ddpmpp', dropout=0.05, **_FACES),
    'edm-ffhq-64x64-uncond-ve':      _edm(arch='ncsnpp', dropout=0.05, **_FACES),
    'edm-afhqv2-64x64-uncond-vp':    _edm(arch='ddpmpp', dropout=0.25, **_FACES),
    'edm-afhqv2-64x64-uncond-ve':    _edm(arch='ncsnpp', dropout=0.25, **_FACES),
    'edm-imagenet-64x64-cond-adm':   _edm(cond=True, resolution=64, arch='adm', total_nimg=2_500_000_000,
                                          batch_size=4096, lr=1e-4, ema_halflife_Mimg=50.0, dropout=0.10,
                                          augment=0.0, fp16=True, loss_scaling=100.0, status_nimg=200_000,
                                          snapshot_nimg=10_000_000, checkpoint_nimg=100_000_000),
    # EDM2 paper, config_presets of NVlabs/edm2 train_edm2.py (img512 = 64x64x4 SD-VAE latents).
    'edm2-img512-xxs': _edm2(64,  2048, 0.0170, 70000, 0.00, -0.4, 1.0, 64),
    'edm2-img512-xs':  _edm2(128, 2048, 0.0120, 70000, 0.00, -0.4, 1.0, 64),
    'edm2-img512-s':   _edm2(192, 2048, 0.0100, 70000, 0.00, -0.4, 1.0, 64),
    'edm2-img512-m':   _edm2(256, 2048, 0.0090, 70000, 0.10, -0.4, 1.0, 64),
    'edm2-img512-l':   _edm2(320, 1792, 0.0080, 70000, 0.10, -0.4, 1.0, 64),
    'edm2-img512-xl':  _edm2(384, 1280, 0.0070, 70000, 0.10, -0.4, 1.0, 64),
    'edm2-img512-xxl': _edm2(448, 896,  0.0065, 70000, 0.10, -0.4, 1.0, 64),
    'edm2-img64-xs':   _edm2(128, 1024, 0.0120, 35000, 0.00, -0.8, 1.6, 64),
    'edm2-img64-s':    _edm2(192, 1024, 0.0100, 35000, 0.00, -0.8, 1.6, 64),
    'edm2-img64-m':    _edm2(256, 2048, 0.0090, 35000, 0.10, -0.8, 1.6, 64),
    'edm2-img64-l':    _edm2(320, 1024, 0.0080, 35000, 0.10, -0.8, 1.6, 64),
    'edm2-img64-xl':   _edm2(384, 640,  0.0070, 35000, 0.10, -0.8, 1.6, 64),
    # EDM2 Table 1 configs C/E/G in pixel space on CIFAR (unconditional, 37.6 M parameters; channel
    # layout, schedule and sigma distribution of the public CIFAR reimplementation, FID 3.03 (C) and
    # 2.72 (E) on CIFAR-10 at 18 steps). C keeps Adam at a constant rate; E and G add forced weight
    # normalisation and inverse-sqrt decay (t_ref = 400 epochs of 50k images at batch 512).
    **{f'edm2-{data}-32x32-uncond-{c.lower()}': _cifar_edm2(c) for data in ('cifar10', 'cifar100') for c in 'CEG'},
    # Quickstart: 16x16 class-conditional CIFAR-10 subset, a few minutes on 2 CPU cores.
    'quickstart': _edm(cond=True, resolution=16, arch='ddpmpp', model_channels=32, channel_mult=(1, 2, 2), num_blocks=1,
                       attn_resolutions=(), dropout=0.0, augment=0.0, total_nimg=40_000, batch_size=64, lr=2e-3,
                       lr_rampup_Mimg=0.002, ema_halflife_Mimg=0.002, ema_rampup_ratio=0.25, status_nimg=1024,
                       snapshot_nimg=20_000, checkpoint_nimg=20_000, workers=0),
    # Tiny CPU configurations (16 channels, one block per level; any resolution, 8x8 in the tests).
    'tiny-edm': _edm(resolution=None, arch='ddpmpp', model_channels=16, channel_mult=(1, 2), num_blocks=1,
                     attn_resolutions=(), dropout=0.0, augment=0.0, total_nimg=4096, batch_size=32, lr=2e-3,
                     lr_rampup_Mimg=0.0, ema_halflife_Mimg=0.001, ema_rampup_ratio=None, status_nimg=1024,
                     snapshot_nimg=4096, checkpoint_nimg=4096, workers=0, device='cpu'),
    'tiny-edm2': replace(_edm2(16, 0, 0.01, 100, 0.0, -0.8, 1.6, None), cond=False, channel_mult=(1, 2),
                         num_blocks=1, attn_resolutions=(), total_nimg=4096, batch_size=32, lr_rampup_Mimg=0.0,
                         fp16=False, status_nimg=1024, snapshot_nimg=4096, checkpoint_nimg=4096, workers=0,
                         device='cpu'),
}

DEFAULT_PRESET = 'edm-cifar10-32x32-uncond-vp'
MAX_TOTAL_NIMG = 10**12  # beyond any published run (EDM2-XXL: 0.9e9 images): a unit mix-up, not a plan
STF_RBATCH = 4096   # --rbatch default of the STF fork (Newbeeer/stf train.py).

from training.presets_ddpm import DDPM_PRESETS, resolve_ddpm, validate_ddpm  # noqa: E402  (needs TrainConfig)

PRESETS.update(DDPM_PRESETS)

from training.presets_cifar_edm2 import CIFAR_EDM2_PRESETS, validate_cifar_edm2  # noqa: E402  (needs TrainConfig)

PRESETS.update(CIFAR_EDM2_PRESETS)

#----------------------------------------------------------------------------


# What --fast turns on (docs/performance.md has the measurements): bf16 in place of fp16 (same speed, no loss
# scaling), and torch.compile of the network.
FAST_SWITCHES = dict(bf16=True, fp16=False, compile=True)


def build_config(preset: str = DEFAULT_PRESET, **overrides) -> TrainConfig:
    """Preset + non-None overrides -> resolved and validated TrainConfig (pure; no I/O)."""
    if preset not in PRESETS:
        raise ValueError(f'--preset={preset!r} is unknown; choose one of: {", ".join(PRESETS)}')
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f'unknown config fields {unknown}; valid fields: {sorted(names)}')
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get('fast'):  # options given beside --fast win; training/speed.py drops what the device lacks
        fill = {k: v for k, v in FAST_SWITCHES.items() if k not in overrides and not (k == 'bf16' and overrides.get('fp16'))}
        overrides = {**fill, **overrides}
    for key in ('channel_mult', 'attn_resolutions', 'adam_betas', 'ema_stds'):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    cfg = replace(PRESETS[preset], preset=preset, **overrides)
    cfg = resolve_ddpm(_resolve(cfg, overrides), overrides)
    _validate(cfg)
    return cfg


def _resolve(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    """Fill the fields that depend on others: recipe from --precond, architecture defaults."""
    if 'precond' in overrides or 'arch' in overrides:
        uses_edm2 = 'edm2' in (cfg.precond, cfg.arch)
        if uses_edm2 and cfg.recipe != 'edm2':
            # An EDM preset switched to the EDM2 network trains with the EDM2 recipe (prefer an edm2-* preset).
            cfg = replace(cfg, recipe='edm2', precond=overrides.get('precond', 'edm2'), arch=overrides.get('arch', 'edm2'),
                          augment=overrides.get('augment', 0.0), adam_betas=(0.9, 0.99), ema_rampup_ratio=None)
        elif not uses_edm2 and cfg.recipe != 'edm':
            raise ValueError(f'--arch={cfg.arch} --precond={cfg.precond} need an EDM preset, '
                             f'but --preset={cfg.preset} is an EDM2 recipe')
    arch_defaults = ARCH_DEFAULTS.get(cfg.arch, {})
    fill = {k: v for k, v in arch_defaults.items() if getattr(cfg, k) is None}
    cfg = replace(cfg, **fill)
    if cfg.stf and cfg.rbatch is None:
        cfg = replace(cfg, rbatch=STF_RBATCH)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    """Reject inconsistent options with a message naming the flag and the fix."""
    if cfg.recipe not in RECIPES:
        raise ValueError(f'recipe={cfg.recipe!r} must be one of {RECIPES}')
    if cfg.arch not in ARCHS:
        raise ValueError(f'--arch={cfg.arch} must be one of {", ".join(ARCHS)}')
    if cfg.precond not in PRECONDS:
        raise ValueError(f'--precond={cfg.precond} must be one of {", ".join(PRECONDS)}')
    if cfg.edm2_config not in tuple('BCDEFG'):
        raise ValueError(f'--edm2-config={cfg.edm2_config} must be one of B, C, D, E, F, G (EDM2 Table 1)')
    if cfg.edm2_config != 'G' and cfg.arch not in ('edm2', 'cifar-edm2'):
        raise ValueError(f'--edm2-config={cfg.edm2_config} needs --arch=edm2 (got --arch={cfg.arch})')
    if (cfg.arch == 'edm2') != (cfg.precond == 'edm2'):
        raise ValueError(f'--arch={cfg.arch} and --precond={cfg.precond} do not match; '
                         f'edm2 architecture and edm2 preconditioning go together')
    if cfg.recipe == 'edm2' and cfg.augment > 0:
        raise ValueError(f'--augment={cfg.augment} is not supported by the EDM2 recipe; use --augment=0')
    validate_ddpm(cfg)
    validate_cifar_edm2(cfg)
    if cfg.fp16 and cfg.bf16:
        raise ValueError('--fp16 and --bf16 are mutually exclusive; pick one')
    for name in ('total_nimg', 'batch_size', 'model_channels'):
        if getattr(cfg, name) <= 0:
            raise ValueError(f'{name}={getattr(cfg, name)} must be positive')
    if cfg.total_nimg > MAX_TOTAL_NIMG:
        raise ValueError(f'--duration is {cfg.total_nimg:.3g} images, over the {MAX_TOTAL_NIMG:.0e} limit; a plain '
                         f'--duration counts Mimg in EDM presets and images in EDM2 presets, so write e.g. 200M or 2048Mi')
    if cfg.seed < 0:
        raise ValueError(f'--seed={cfg.seed} must be >= 0')
    if cfg.batch_gpu is not None and cfg.batch_gpu <= 0:
        raise ValueError(f'--batch-gpu={cfg.batch_gpu} must be positive')
    if cfg.stf and cfg.rbatch < 1:
        raise ValueError(f'--rbatch={cfg.rbatch} must be at least 1')
    if not 0 <= cfg.augment <= 1 or not 0 <= cfg.dropout <= 1:
        raise ValueError(f'--augment={cfg.augment} and --dropout={cfg.dropout} must lie in [0, 1]')


def check_batch(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """Per-rank batch and accumulation rounds; ValueError naming the flags if they do not divide."""
    batch_gpu_total = cfg.batch_size // world_size
    batch_gpu = batch_gpu_total if cfg.batch_gpu is None else min(cfg.batch_gpu, batch_gpu_total)
    if batch_gpu_total == 0 or batch_gpu == 0 or cfg.batch_size != batch_gpu_total * world_size \
            or batch_gpu_total % batch_gpu != 0:
        raise ValueError(f'--batch={cfg.batch_size} is not divisible by {world_size} GPUs x '
                         f'--batch-gpu={cfg.batch_gpu if cfg.batch_gpu is not None else batch_gpu_total}')
    if cfg.stf and cfg.rbatch < batch_gpu_total:
        raise ValueError(f'--rbatch={cfg.rbatch} is smaller than the {batch_gpu_total} training images per GPU '
                         f'(--batch={cfg.batch_size} on {world_size} GPUs); the reference batch of each GPU includes '
                         f'its training images, so use --rbatch>={batch_gpu_total}')
    return batch_gpu, batch_gpu_total // batch_gpu


def to_json(cfg: TrainConfig) -> dict:
    """Plain-JSON view of a config (for run_config.json and --dry-run)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def from_json(data: dict) -> TrainConfig:
    """Inverse of to_json; ignores unknown keys from newer versions."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
    return TrainConfig(**kwargs)
