"""Generation presets and the resolved generation config: the one source of truth for generate.py.

EDM2 presets are `config_presets` of NVlabs/edm2 generate_images.py: post-hoc EMA reconstructions
(`edm2-img512-<size>-<training images in kimg>-<EMA std>.pkl`) chosen for the best FID or FD_DINOv2,
and, for `-guid-` / `-autog-`, a guiding network and weight (classifier-free guidance resp.
autoguidance). The comment after each gives the score published with it. EDM presets are the
pretrained models of NVlabs/edm with the sampler settings its README recommends per dataset.

`build_config(preset, **overrides)` returns a validated `GenerateConfig`; options that are `None`
leave the preset value in place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Optional

EDM2_ROOT = 'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions'
EDM_ROOT = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained'

# Sampler options, with the command-line flag that sets each one.
SAMPLER_FLAGS = {
    'num_steps': '--steps', 'sigma_min': '--sigma_min', 'sigma_max': '--sigma_max', 'rho': '--rho',
    'guidance': '--guidance', 'S_churn': '--S_churn', 'S_min': '--S_min', 'S_max': '--S_max',
    'S_noise': '--S_noise', 'solver': '--solver', 'discretization': '--disc', 'schedule': '--schedule',
    'scaling': '--scaling', 'eta': '--eta', 'skip_schedule': '--skip-schedule', 'subseq_size': '--subseq-size',
}
ABLATION_OPTIONS = ('solver', 'discretization', 'schedule', 'scaling')


# Names of training.sampling.SAMPLERS, kept here so generate.py --help lists them without importing torch
# (tests/test_help.py checks that the two agree).
SAMPLER_NAMES = ('edm', 'edm1', 'edm2', 'ablation', 'ddim', 'ddpm', 'dpmpp2m', 'dpmpp2m-sde', 'cifar-edm2')


@dataclass(frozen=True)
class GenerateConfig:
    """Everything generate.py needs; sampler options left at None take the sampler's own default."""

    # Networks.
    net:            Optional[str]   = None      # Main network pickle, path or URL.
    gnet:           Optional[str]   = None      # Guiding network pickle; None = no guidance.
    guidance:       Optional[float] = None      # Guidance weight; None or 1 = no guidance.
    trust_pickle:   bool            = False     # Allow pickles that run their embedded code.
    ckpt:           int             = 0         # net None: first training state of --outdir to sample (kimg).
    end_ckpt:       Optional[int]   = None      # net None: last training state to sample (kimg); None = newest.
    # Output.
    outdir:         Optional[str]   = None      # Folder for SEED.png files; None = write none.
    subdirs:        bool            = False     # One subfolder per 1000 seeds.
    grid:           Optional[str]   = None      # Also write all images tiled into this PNG.
    # What to generate.
    seeds:          tuple           = tuple(range(64))  # One image per seed.
    class_idx:      Optional[int]   = None      # Class of every image; None = random per seed.
    batch_size:     int             = 32        # Maximum images per network call.
    device:         str             = 'auto'    # auto | cuda | cuda:N | cpu | mps.
    # Speed (the defaults are the reference numerics).
    precision:      str             = 'fp32'    # fp32 | bf16 (autocast of the network calls).
    channels_last:  bool            = False     # Channels-last weights and inputs.
    batched_guidance: bool          = False     # net and gnet in one vmapped call (same architecture), else overlapped.
    compile:        bool            = False     # torch.compile the networks (training/speed.py).
    fast:           bool            = False     # The best measured speed set: bf16 + compile where the device runs them.
    # Sampler.
    sampler:        Optional[str]   = None      # training.sampling.SAMPLERS name; None = edm, or ablation if ablated.
    num_steps:      Optional[int]   = None      # Number of noise levels.
    sigma_min:      Optional[float] = None      # Lowest noise level.
    sigma_max:      Optional[float] = None      # Highest noise level.
    rho:            Optional[float] = None      # Time step exponent (EDM Eq. 5).
    S_churn:        Optional[float] = None      # Stochasticity strength.
    S_min:          Optional[float] = None      # Lowest noise level with churn.
    S_max:          Optional[float] = None      # Highest noise level with churn.
    S_noise:        Optional[float] = None      # Noise inflation of the churn.
    solver:         Optional[str]   = None      # Ablation: euler | heun.
    discretization: Optional[str]   = None      # Ablation / DDIM / DPM++: vp | ve | iddpm | edm.
    schedule:       Optional[str]   = None      # Ablation: vp | ve | linear.
    scaling:        Optional[str]   = None      # Ablation: vp | none.
    eta:            Optional[float] = None      # DDIM / DPM++ stochasticity.
    skip_schedule:  Optional[str]   = None      # DDPM networks, DDIM: timestep subsequence linear | quadratic.
    subseq_size:    Optional[int]   = None      # DDPM networks, DDIM: number of timesteps.
    # DDPM networks (.pt checkpoints of tqch/ddpm-torch or of our DDPM recipe).
    use_ema:        bool            = False     # Load the EMA weights (ema.shadow) instead of 'model'.
    dataset:        Optional[str]   = None      # Reference config of a published checkpoint: cifar10 | celeba | celebahq.

    def sampler_kwargs(self) -> dict:
        """The sampler options that are set, keyed by the sampler's argument names."""
        return {name: getattr(self, name) for name in SAMPLER_FLAGS if getattr(self, name) is not None}


def _edm2(net: str, gnet: str | None = None, guidance: float | None = None) -> GenerateConfig:
    return GenerateConfig(net=f'{EDM2_ROOT}/{net}.pkl', gnet=gnet and f'{EDM2_ROOT}/{gnet}.pkl', guidance=guidance)


def _edm(net: str, **sampler) -> GenerateConfig:
    return GenerateConfig(net=f'{EDM_ROOT}/{net}.pkl', **sampler)


# EDM README: deterministic 18 steps for CIFAR-10 (NFE 35), 40 for FFHQ / AFHQv2 64x64 (NFE 79),
# stochastic 256 steps for ImageNet 64x64 (NFE 511).
_EDM_CIFAR10 = dict(num_steps=18)
_EDM_64 = dict(num_steps=40)
_EDM_IMAGENET = dict(num_steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)

PRESETS: dict[str, GenerateConfig] = {
    'edm2-img512-xs-fid':               _edm2('edm2-img512-xs-2147483-0.135'),      # FID 3.53
    'edm2-img512-xs-dino':              _edm2('edm2-img512-xs-2147483-0.200'),      # FD_DINOv2 103.39
    'edm2-img512-s-fid':                _edm2('edm2-img512-s-2147483-0.130'),       # FID 2.56
    'edm2-img512-s-dino':               _edm2('edm2-img512-s-2147483-0.190'),       # FD_DINOv2 68.64
    'edm2-img512-m-fid':                _edm2('edm2-img512-m-2147483-0.100'),       # FID 2.25
    'edm2-img512-m-dino':               _edm2('edm2-img512-m-2147483-0.155'),       # FD_DINOv2 58.44
    'edm2-img512-l-fid':                _edm2('edm2-img512-l-1879048-0.085'),       # FID 2.06
    'edm2-img512-l-dino':               _edm2('edm2-img512-l-1879048-0.155'),       # FD_DINOv2 52.25
    'edm2-img512-xl-fid':               _edm2('edm2-img512-xl-1342177-0.085'),      # FID 1.96
    'edm2-img512-xl-dino':              _edm2('edm2-img512-xl-1342177-0.155'),      # FD_DINOv2 45.96
    'edm2-img512-xxl-fid':              _edm2('edm2-img512-xxl-0939524-0.070'),     # FID 1.91
    'edm2-img512-xxl-dino':             _edm2('edm2-img512-xxl-0939524-0.150'),     # FD_DINOv2 42.84
    'edm2-img64-s-fid':                 _edm2('edm2-img64-s-1073741-0.075'),        # FID 1.58
    'edm2-img64-m-fid':                 _edm2('edm2-img64-m-2147483-0.060'),        # FID 1.43
    'edm2-img64-l-fid':                 _edm2('edm2-img64-l-1073741-0.040'),        # FID 1.33
    'edm2-img64-xl-fid':                _edm2('edm2-img64-xl-0671088-0.040'),       # FID 1.33
    # Classifier-free guidance by an unconditional XS model.
    'edm2-img512-xs-guid-fid':          _edm2('edm2-img512-xs-2147483-0.045', 'edm2-img512-xs-uncond-2147483-0.045', 1.40),   # FID 2.91
    'edm2-img512-xs-guid-dino':         _edm2('edm2-img512-xs-2147483-0.150', 'edm2-img512-xs-uncond-2147483-0.150', 1.70),   # FD_DINOv2 79.94
    'edm2-img512-s-guid-fid':           _edm2('edm2-img512-s-2147483-0.025', 'edm2-img512-xs-uncond-2147483-0.025', 1.40),    # FID 2.23
    'edm2-img512-s-guid-dino':          _edm2('edm2-img512-s-2147483-0.085', 'edm2-img512-xs-uncond-2147483-0.085', 1.90),    # FD_DINOv2 52.32
    'edm2-img512-m-guid-fid':           _edm2('edm2-img512-m-2147483-0.030', 'edm2-img512-xs-uncond-2147483-0.030', 1.20),    # FID 2.01
    'edm2-img512-m-guid-dino':          _edm2('edm2-img512-m-2147483-0.015', 'edm2-img512-xs-uncond-2147483-0.015', 2.00),    # FD_DINOv2 41.98
    'edm2-img512-l-guid-fid':           _edm2('edm2-img512-l-1879048-0.015', 'edm2-img512-xs-uncond-2147483-0.015', 1.20),    # FID 1.88
    'edm2-img512-l-guid-dino':          _edm2('edm2-img512-l-1879048-0.035', 'edm2-img512-xs-uncond-2147483-0.035', 1.70),    # FD_DINOv2 38.20
    'edm2-img512-xl-guid-fid':          _edm2('edm2-img512-xl-1342177-0.020', 'edm2-img512-xs-uncond-2147483-0.020', 1.20),   # FID 1.85
    'edm2-img512-xl-guid-dino':         _edm2('edm2-img512-xl-1342177-0.030', 'edm2-img512-xs-uncond-2147483-0.030', 1.70),   # FD_DINOv2 35.67
    'edm2-img512-xxl-guid-fid':         _edm2('edm2-img512-xxl-0939524-0.015', 'edm2-img512-xs-uncond-2147483-0.015', 1.20),  # FID 1.81
    'edm2-img512-xxl-guid-dino':        _edm2('edm2-img512-xxl-0939524-0.015', 'edm2-img512-xs-uncond-2147483-0.015', 1.70),  # FD_DINOv2 33.09
    # Autoguidance by a smaller, less trained model.
    'edm2-img512-s-autog-fid':          _edm2('edm2-img512-s-2147483-0.070', 'edm2-img512-xs-0134217-0.125', 2.10),           # FID 1.34
    'edm2-img512-s-autog-dino':         _edm2('edm2-img512-s-2147483-0.120', 'edm2-img512-xs-0134217-0.165', 2.45),           # FD_DINOv2 36.67
    'edm2-img512-xxl-autog-fid':        _edm2('edm2-img512-xxl-0939524-0.075', 'edm2-img512-m-0268435-0.155', 2.05),          # FID 1.25
    'edm2-img512-xxl-autog-dino':       _edm2('edm2-img512-xxl-0939524-0.130', 'edm2-img512-m-0268435-0.205', 2.30),          # FD_DINOv2 24.18
    'edm2-img512-s-uncond-autog-fid':   _edm2('edm2-img512-s-uncond-2147483-0.070', 'edm2-img512-xs-uncond-0134217-0.110', 2.85),  # FID 3.86
    'edm2-img512-s-uncond-autog-dino':  _edm2('edm2-img512-s-uncond-2147483-0.090', 'edm2-img512-xs-uncond-0134217-0.125', 2.90),  # FD_DINOv2 90.39
    'edm2-img64-s-autog-fid':           _edm2('edm2-img64-s-1073741-0.045', 'edm2-img64-xs-0134217-0.110', 1.70),             # FID 1.01
    'edm2-img64-s-autog-dino':          _edm2('edm2-img64-s-1073741-0.105', 'edm2-img64-xs-0134217-0.175', 2.20),             # FD_DINOv2 31.85
    # EDM pretrained models (config F) with the recommended sampler settings.
    'edm-cifar10-32x32-cond-vp':        _edm('edm-cifar10-32x32-cond-vp', **_EDM_CIFAR10),     # FID 1.79
    'edm-cifar10-32x32-cond-ve':        _edm('edm-cifar10-32x32-cond-ve', **_EDM_CIFAR10),
    'edm-cifar10-32x32-uncond-vp':      _edm('edm-cifar10-32x32-uncond-vp', **_EDM_CIFAR10),   # FID 1.97
    'edm-cifar10-32x32-uncond-ve':      _edm('edm-cifar10-32x32-uncond-ve', **_EDM_CIFAR10),
    'edm-ffhq-64x64-uncond-vp':         _edm('edm-ffhq-64x64-uncond-vp', **_EDM_64),           # FID 1.97
    'edm-ffhq-64x64-uncond-ve':         _edm('edm-ffhq-64x64-uncond-ve', **_EDM_64),
    'edm-afhqv2-64x64-uncond-vp':       _edm('edm-afhqv2-64x64-uncond-vp', **_EDM_64),         # FID 1.96
    'edm-afhqv2-64x64-uncond-ve':       _edm('edm-afhqv2-64x64-uncond-ve', **_EDM_64),
    'edm-imagenet-64x64-cond-adm':      _edm('edm-imagenet-64x64-cond-adm', **_EDM_IMAGENET),  # FID 1.36
}


def _flag(name: str) -> str:
    return SAMPLER_FLAGS.get(name, '--' + name.replace('_', '-'))


def _check_sampler_options(cfg: GenerateConfig) -> None:
    from training import sampling
    if cfg.sampler not in sampling.SAMPLERS:
        raise ValueError(f'--sampler={cfg.sampler} is not a sampler; choose one of {", ".join(sampling.SAMPLERS)}')
    # 'edm' resolves per network, but both of its flavours take the same options.
    fn = sampling.resolve_sampler(cfg.sampler, net=None) if cfg.sampler != 'edm' else sampling.edm2_sampler
    if sampling.is_ddpm_checkpoint(cfg.net):
        from training.sampling_ddpm import discrete_sampler
        fn = discrete_sampler(cfg.sampler)
    valid = sampling.sampler_options(fn)
    for name, value in cfg.sampler_kwargs().items():
        if name not in valid:
            takes = ', '.join(_flag(n) for n in valid if n in SAMPLER_FLAGS)
            raise ValueError(f'{_flag(name)}={value} does not apply to --sampler={cfg.sampler}; it takes {takes or "no options"}')


def _is_ddpm(cfg: GenerateConfig) -> bool:
    from training import sampling
    return sampling.is_ddpm_checkpoint(cfg.net)


def _check_ddpm_options(cfg: GenerateConfig) -> None:
    """--use-ema / --dataset only for DDPM checkpoints; no guidance or classes for them."""
    if not _is_ddpm(cfg):
        if cfg.use_ema or cfg.dataset is not None:
            flag = '--use-ema' if cfg.use_ema else f'--dataset={cfg.dataset}'
            raise ValueError(f'{flag} applies to DDPM checkpoints (.pt) only; --net={cfg.net} is a network pickle')
        return
    if cfg.gnet is not None or cfg.class_idx is not None:
        raise ValueError('DDPM networks are unconditional and take no guidance: leave out --gnet/--guidance/--class')
    if cfg.subseq_size is not None and cfg.subseq_size < 1:
        raise ValueError(f'--subseq-size={cfg.subseq_size} must be at least 1')


# What --fast turns on (docs/performance.md has the measurements).
FAST_SWITCHES = dict(precision='bf16', compile=True)


def build_config(preset: str | None = None, **overrides) -> GenerateConfig:
    """Preset (or defaults) with the given non-None options applied, validated (EDM2 generate_images.py cmdline)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f'--preset={preset} is not a preset; choose one of: {", ".join(PRESETS)}')
    fields = {f.name for f in dataclasses.fields(GenerateConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f'build_config got unknown options {sorted(unknown)}')
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get('fast'):  # options given beside --fast win; generate_from_config drops what the device lacks
        overrides = {**{k: v for k, v in FAST_SWITCHES.items() if k not in overrides}, **overrides}
    cfg = replace(PRESETS[preset] if preset else GenerateConfig(), **overrides)

    if cfg.net is None and cfg.outdir is None:
        raise ValueError('no network: give --net (or --network) PKL|URL, a --preset, or --outdir=RUN_DIR to sample '
                         'every training-state-*.pt of a run (STF fork)')
    if cfg.net is None and cfg.grid is not None:
        raise ValueError(f'--grid={cfg.grid} needs one network: give --net PKL|URL (sampling every training state '
                         f'of --outdir writes one folder per state)')
    if cfg.outdir is None and cfg.grid is None:
        raise ValueError('nowhere to write: give --outdir DIR and/or --grid PNG')
    if cfg.ckpt < 0 or (cfg.end_ckpt is not None and cfg.end_ckpt < cfg.ckpt):
        raise ValueError(f'--ckpt={cfg.ckpt} --end_ckpt={cfg.end_ckpt}: give a kimg range with 0 <= --ckpt <= --end_ckpt')
    if cfg.guidance is None or cfg.guidance == 1:
        cfg = replace(cfg, guidance=None, gnet=None)  # No guidance: the guiding network is not even loaded.
    elif cfg.gnet is None:
        raise ValueError(f'--guidance={cfg.guidance} needs a guiding network: give --gnet PKL|URL (or use --guidance=1)')
    if len(cfg.seeds) == 0:
        raise ValueError('--seeds is empty: give e.g. --seeds=0-63')
    if cfg.batch_size < 1:
        raise ValueError(f'--batch={cfg.batch_size} must be at least 1')
    if cfg.class_idx is not None and cfg.class_idx < 0:
        raise ValueError(f'--class={cfg.class_idx} must be a class index >= 0')
    _check_ddpm_options(cfg)
    if cfg.sampler is None:
        ablated = any(getattr(cfg, name) is not None for name in ABLATION_OPTIONS)
        cfg = replace(cfg, sampler='ddpm' if _is_ddpm(cfg) else 'ablation' if ablated else 'edm')
    _check_sampler_options(cfg)
    return cfg
