"""The benchmark cases: training, sampling, FID feature extraction and latent encoding.

Each case builds its workload once per variant (bench/fastpaths.py), times it with
bench/timing.py and returns one record: the workload, then per variant the median time,
images/s, peak memory and, where FLOPs are known, model FLOP utilisation.
"""

import gc

import torch

from bench import configs, timing
from bench.fastpaths import (BatchedGuidance, Variant, autocast, compile_module, make_adam, make_ema, prepare_network,
                             same_architecture, variant_scope)
from training import detectors, encoders, loss, sampling, speed
from training.flops import count_flops


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def _random_batch(net, batch: int, device: torch.device, seed: int = 0):
    """Images with the data's scale (sigma_data = 0.5) and one-hot labels, seeded."""
    gen = torch.Generator(device).manual_seed(seed)
    shape = [batch, net.img_channels, net.img_resolution, net.img_resolution]
    images = torch.randn(shape, generator=gen, device=device) * 0.5
    labels = None
    if net.label_dim:
        classes = torch.randint(net.label_dim, [batch], generator=gen, device=device)
        labels = torch.eye(net.label_dim, device=device)[classes]
    return images, labels


def run_variants(variants: list[Variant], make_fn, device: torch.device, warmup: int, reps: int, batch: int) -> dict:
    """{variant name: measurement}, where make_fn(variant) -> (callable, extra fields)."""
    results = {}
    for variant in variants:
        with variant_scope(variant):
            fn, extra = make_fn(variant)
            result = timing.measure(fn, device, warmup=warmup, reps=reps)
            result.update(images_per_s=batch / result['median_s'], **extra)
            results[variant.name] = result
            del fn
        _release(device)
    return results


def add_mfu(results: dict, variants: list[Variant], flops_per_call: float, peak: dict) -> None:
    """Model FLOP utilisation = FLOPs / time / peak of the variant's numerics (bf16 or fp32)."""
    for variant in variants:
        entry = results[variant.name]
        dtype = 'bf16' if variant.bf16 and 'bf16' in peak else 'fp32'
        entry['tflops'] = flops_per_call / entry['median_s'] / 1e12
        entry['mfu'] = entry['tflops'] / peak[dtype]
        entry['mfu_dtype'] = dtype

#----------------------------------------------------------------------------
# Training.

class TrainStep:
    """One optimizer step as training/training_loop.py takes it: loss (network calls under autocast), backward,
    non-finite gradients clamped, Adam, EMA. Images stay NCHW, as the data loader delivers them, so
    that randn_like draws the same noise in both variants; channels-last weights suffice."""

    def __init__(self, spec: configs.NetSpec, variant: Variant, device: torch.device, batch: int, lr: float = 1e-4):
        torch.manual_seed(0)
        self.net, self.call = prepare_network(spec.build(device).train().requires_grad_(True), variant)
        self.loss_fn = loss.EDM2Loss() if spec.edm2 else loss.EDMLoss()
        betas = (0.9, 0.99) if spec.edm2 else (0.9, 0.999)
        self.optimizer = make_adam(self.net.parameters(), variant, lr=lr, betas=betas, eps=1e-8)
        self.ema = make_ema(self.net, spec.edm2, variant)
        self.images, self.labels = _random_batch(self.net, batch, device)
        self.variant, self.device, self.batch, self.cur_nimg = variant, device, batch, 0

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        net = speed.autocast_calls(self.call, self.device, enabled=self.variant.bf16)  # as the training loop: loss in fp32
        loss_value = self.loss_fn(net=net, images=self.images, labels=self.labels)
        loss_value.to(torch.float32).sum().mul(1 / self.batch).backward()
        for param in self.net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        self.optimizer.step()
        self.cur_nimg += self.batch
        self.ema.update(cur_nimg=self.cur_nimg, batch_size=self.batch)


def bench_train(name: str, size: str, variants, device, warmup: int, reps: int, peak: dict, batch: int | None = None) -> dict:
    """Training images/s, peak memory and MFU (3x forward FLOPs per image) of one network;
    `batch` None = configs.TRAIN_BATCH."""
    spec = configs.net_spec(name, size)
    batch = batch or configs.TRAIN_BATCH[size][name]
    params, forward_flops = count_flops(spec.build('meta'), batch=batch)
    results = run_variants(variants, lambda v: (TrainStep(spec, v, device, batch), {}), device, warmup, reps, batch)
    add_mfu(results, variants, 3 * forward_flops, peak)
    return dict(task='train', config=name, batch=batch, params=params, flops_per_call=3 * forward_flops,
                variants=results)

#----------------------------------------------------------------------------
# Sampling.

def _sampler_call(spec: configs.SampleSpec, size: str, variant: Variant, device: torch.device):
    """Sampler run of `spec`; with guidance, batched (vmap) when the variant allows it."""
    net_spec = configs.net_spec(spec.net, size)
    torch.manual_seed(0)
    net, call = prepare_network(net_spec.build(device).eval().requires_grad_(False), variant)
    sampler_fn = sampling.edm_sampler if spec.sampler == 'edm' else sampling.edm2_sampler
    kwargs = dict(num_steps=spec.num_steps)
    if device.type == 'mps':
        kwargs['dtype'] = torch.float32  # MPS has no float64
    batched = False
    if spec.guidance != 1:
        torch.manual_seed(1)
        gnet = net_spec.build(device).eval().requires_grad_(False)
        batched = variant.batched_guidance and same_architecture(net, gnet)
        if batched:
            guided = BatchedGuidance(net, gnet, spec.guidance)
            call = compile_module(guided, variant)
        else:
            _, kwargs['gnet'] = prepare_network(gnet, variant)
            kwargs['guidance'] = spec.guidance
    noise, labels = _random_batch(net, spec.batch, device, seed=2)  # NCHW, as generate_images draws it

    def run():
        with torch.no_grad(), autocast(variant, device):
            return sampler_fn(call, noise, labels, **kwargs)
    return run, dict(batched_guidance=batched)


def bench_sample(spec: configs.SampleSpec, size: str, variants, device, warmup: int, reps: int, peak: dict) -> dict:
    """Sampling images/s and MFU (NFE x forward FLOPs, twice with guidance) of one sampler setup."""
    nets = 1 if spec.guidance == 1 else 2
    params, forward_flops = count_flops(configs.net_spec(spec.net, size).build('meta'), batch=spec.batch)
    flops_per_call = (2 * spec.num_steps - 1) * forward_flops * nets
    results = run_variants(variants, lambda v: _sampler_call(spec, size, v, device), device, warmup, reps, spec.batch)
    add_mfu(results, variants, flops_per_call, peak)
    return dict(task='sample', config=spec.name, batch=spec.batch, params=params, num_steps=spec.num_steps,
                guidance=spec.guidance, flops_per_call=flops_per_call, variants=results)

#----------------------------------------------------------------------------
# FID feature extraction.

def bench_fid(size: str, variants, device, warmup: int, reps: int, detector_path: str | None = None) -> dict:
    """Inception-v3 feature extraction (training/detectors.py) of 32x32 uint8 images: images/s,
    peak memory, and the largest feature difference of each variant from the reference."""
    batch = configs.FID_BATCH[size]
    images = torch.randint(0, 256, [batch, 3, 32, 32], dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    images = images.to(device)
    features = {}

    def make_fn(variant):
        detector = detectors.InceptionV3Detector(path=detector_path, allow_download=False)
        if variant.channels_last:
            detector.model.to(memory_format=torch.channels_last)
        features[variant.name] = detector(images)
        return (lambda: detector(images)), dict(detector=detector.kind)

    results = run_variants(variants, make_fn, device, warmup, reps, batch)
    reference = features[variants[0].name]
    for name, feats in features.items():
        results[name]['max_abs_feature_diff'] = float((feats - reference).abs().max())
    return dict(task='fid', config='inception-v3-32px', batch=batch, variants=results)

#----------------------------------------------------------------------------
# Latent encoding.

def _vae_encoder(size: str, vae: str | None, batch_size: int, device: torch.device) -> encoders.StabilityVAEEncoder:
    """StabilityVAEEncoder around the named VAE, or around a random AutoencoderKL of configs.vae_config(size).
    The encoder offers no public way to hand it a VAE or reach its VAE, hence `_vae` (docs/performance.md)."""
    encoder = encoders.StabilityVAEEncoder(vae_name=vae or 'random-init', batch_size=batch_size)
    if vae is None:
        import diffusers
        torch.manual_seed(0)
        encoder._vae = diffusers.models.AutoencoderKL(**configs.vae_config(size)).eval().requires_grad_(False)
    encoder.init(device)
    return encoder


def _encode_call(size: str, vae: str | None, variant: Variant, device: torch.device, images: torch.Tensor):
    """StabilityVAEEncoder.encode_pixels: one image per VAE call (reference) or the whole batch (fast)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    encoder = _vae_encoder(size, vae, 1 if variant.name == 'reference' else len(images), device)
    encoder._vae.set_attn_processor(AttnProcessor2_0() if variant.attention == 'sdpa' else AttnProcessor())
    if variant.channels_last:
        encoder._vae.to(memory_format=torch.channels_last)

    def run():
        with torch.no_grad(), autocast(variant, device):
            return encoder.encode_pixels(images)
    return run, dict(vae_batch_size=encoder.batch_size)


def encode_images(size: str, device: torch.device) -> torch.Tensor:
    """The encode cases' input: configs.ENCODE_IMAGES[size] seeded random uint8 RGB images on `device`."""
    count, resolution = configs.ENCODE_IMAGES[size]
    return torch.randint(0, 256, [count, 3, resolution, resolution], dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(4)).to(device)


def bench_encode(size: str, variants, device, warmup: int, reps: int, vae: str | None = None) -> dict:
    """Latent encoding images/s with StabilityVAEEncoder; `vae` None = random init of configs.vae_config."""
    count, resolution = configs.ENCODE_IMAGES[size]
    images = encode_images(size, device)
    results = run_variants(variants, lambda v: _encode_call(size, vae, v, device, images), device, warmup, reps, count)
    return dict(task='encode', config=f'sd-vae-{resolution}px' + ('' if vae else '-random'), batch=count,
                resolution=resolution, variants=results)
