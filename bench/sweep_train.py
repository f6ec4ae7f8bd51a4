"""One switch at a time: the training step of train.py (augmentation, loss, backward, gradient cleaning, Adam,
EMA) under each combination of precision, memory format, compile mode, Adam and attention implementation.

    python -m bench.sweep_train --net ddpmpp-cifar10 --batch 512 --variants fp16,bf16,bf16+cl+blocks
    python -m bench.sweep_train --net ddpmpp-cifar10 --size tiny --device cpu --variants fp32,bf16 --steps 2
    python -m bench.sweep_train --net edm2-s --batch 256 --batch-gpu 32 --variants fp16,bf16+full,bf16+full+nhwc
    python -m bench.sweep_train --net edm2-s --task sample --batch 32 --variants fp16,bf16+full

EDM's networks (ddpmpp-cifar10, adm-imagenet64) train with EDM's loss, augmentation, Adam and EMA, and sample with
EDM's 18-step sampler. EDM2's (edm2-s, edm2-xs) train as train.py's EDM2 recipe does: raw 8-channel latents through
StabilityVAEEncoder.encode_latents, EDM2's loss with its learned uncertainty, Adam with betas (0.9, 0.99), gradient
cleaning, the power-function EMA; `--batch-gpu` splits a step into rounds of gradient accumulation. They sample with
EDM2's 32-step sampler from snapshot-like networks (float16 weights), guided by an EDM2-XS network at weight 1.4.

A variant is '+'-joined switches: a precision (fp32, fp16 = the reference fp16 path, bf16 = autocast with
bf16 group norm; EDM2: float32 inputs and autocast, as train.py --bf16=1 and generate.py --precision=bf16;
bf16gn32 = autocast with float32 group norm), then any of cl (channels-last weights),
blocks / full (torch.compile per block / whole network), foreach (Adam), einsum (reference attention) or sdpa
(SDPA for every head; without either, attention 'auto' as train.py runs it: SDPA up to 128 channels per head, the
einsum with float32 logits above; until session 29 the default was sdpa), convresample (box-filter resampling
by the reference's depthwise convolutions instead of pooling / copying),
cudagraphs / autotune (with blocks or full: torch.compile mode reduce-overhead / max-autotune-no-cudagraphs),
nhwc (with blocks or full: inductor runs every convolution channels-last; its heuristic declines DDPM++, whose
decoder convolutions halve the channels, and cuDNN then transposes around each convolution).
Each variant runs in a fresh process with its own inductor cache, so a compile is timed cold; `VARIANT@warm`
reruns it on the cache the previous process left (a resume). One JSON line per variant.
"""

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import click
import torch

from bench import configs, kernels, timing
from training import augment, encoders, loss, networks, phema, sampling, speed

PRECISIONS = ('fp32', 'fp16', 'bf16', 'bf16gn32')
SWITCHES = ('cl', 'blocks', 'full', 'foreach', 'einsum', 'sdpa', 'convresample', 'cudagraphs', 'autotune', 'nhwc')
ATTENTION_SWITCHES = dict(einsum='reference', sdpa='sdpa')  # networks.attention_impl of each; 'auto' without
# torch.compile modes of the compile switches
INDUCTOR_MODES = dict(cudagraphs='reduce-overhead', autotune='max-autotune-no-cudagraphs')


def parse_variant(text: str) -> dict:
    """'bf16+cl+blocks' -> dict(precision='bf16', cl=True, compile='blocks', adam='fused', attention='auto', resample='auto', ...)."""
    precision, *switches = text.split('+')
    bad = [s for s in switches if s not in SWITCHES]
    if precision not in PRECISIONS or bad:
        raise click.BadParameter(f'{text!r}: precision must be one of {PRECISIONS} and switches from {SWITCHES}')
    compile_mode = 'full' if 'full' in switches else 'blocks' if 'blocks' in switches else None
    modes = [INDUCTOR_MODES[s] for s in switches if s in INDUCTOR_MODES]
    if len(modes) + ('nhwc' in switches) > 1 or ((modes or 'nhwc' in switches) and compile_mode is None):
        raise click.BadParameter(f'{text!r}: cudagraphs, autotune or nhwc (one of them) go with blocks or full')
    attentions = [ATTENTION_SWITCHES[s] for s in switches if s in ATTENTION_SWITCHES]
    if len(attentions) > 1:
        raise click.BadParameter(f'{text!r}: einsum or sdpa, not both')
    return dict(precision=precision, cl='cl' in switches, compile=compile_mode,
                adam='foreach' if 'foreach' in switches else 'fused', attention=attentions[0] if attentions else 'auto',
                resample='reference' if 'convresample' in switches else 'auto',
                inductor_mode=modes[0] if modes else None, nhwc='nhwc' in switches)


def _network(net_name: str, size: str, variant: dict, device: torch.device, train: bool) -> torch.nn.Module:
    """The benchmark's network (EDMPrecond or EDM2's Precond), seeded, in the variant's precision path and memory
    format. EDM2's sampling networks hold float16 weights, as its snapshots and published pickles do."""
    spec = configs.net_spec(net_name, size)
    torch.manual_seed(0)
    net = spec.build(device)
    net.use_fp16 = variant['precision'] == 'fp16'
    if spec.edm2 and not train:
        net.to(torch.float16)
    net.train(train).requires_grad_(train)
    if variant['cl']:
        net.to(memory_format=torch.channels_last)
    return net


def _compiled(net: torch.nn.Module, variant: dict) -> torch.nn.Module:
    if not variant['compile']:
        return net
    options = dict(force_layout_optimization=True) if variant['nhwc'] else None
    return speed.compile_network(net, variant['compile'], inductor_mode=variant['inductor_mode'], options=options)


def build_step(net_name: str, size: str, batch: int, variant: dict, device: torch.device, batch_gpu: int | None = None):
    """A closure running one training step of train.py's recipe for the network (EDM or EDM2) with the variant's
    switches, in rounds of `batch_gpu` images (gradient accumulation; None = one round)."""
    edm2 = configs.net_spec(net_name, size).edm2
    batch_gpu = batch_gpu or batch
    if batch % batch_gpu:
        raise click.BadParameter(f'--batch={batch} must be a multiple of --batch-gpu={batch_gpu}')
    net = _network(net_name, size, variant, device, train=True)
    if edm2:  # EDM2's recipe (training/recipes.py): no augmentation, betas (0.9, 0.99), power-function EMA
        ema = phema.PowerFunctionEMA(net, stds=[0.050, 0.100])
        pipe, loss_fn, betas, inf = None, loss.EDM2Loss(), (0.9, 0.99), 0
    else:
        ema = phema.TraditionalEMA(net, halflife_Mimg=0.5, rampup_ratio=0.05)  # copies net before it is compiled
        pipe = augment.AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        loss_fn, betas, inf = loss.EDMLoss(), (0.9, 0.999), 1e5
    call = _compiled(net, variant)
    fused = variant['adam'] == 'fused' and device.type == 'cuda'
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, betas=betas, eps=1e-8, fused=fused or None, foreach=not fused)
    gen = torch.Generator(device).manual_seed(0)
    shape = [batch, net.img_channels * 2 if edm2 else 3, net.img_resolution, net.img_resolution]
    if edm2:  # raw latents (mean and std) as `dataset_tool.py encode` stores them
        data = torch.randn(shape, generator=gen, device=device).abs_()
        encoder = encoders.StabilityVAEEncoder()
    else:
        data = torch.randint(0, 256, shape, generator=gen, device=device, dtype=torch.uint8)
    labels = torch.eye(net.label_dim, device=device)[torch.randint(net.label_dim, [batch], generator=gen, device=device)]
    bf16 = variant['precision'].startswith('bf16')
    state = dict(nimg=0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        for images, round_labels in zip(data.split(batch_gpu), labels.split(batch_gpu)):
            images = encoder.encode_latents(images) if edm2 else images.to(torch.float32) / 127.5 - 1
            value = loss_fn(net=speed.autocast_calls(call, device, enabled=bf16), images=images, labels=round_labels,
                            augment_pipe=pipe)
            value.to(torch.float32).sum().mul(1 / batch).backward()
        for grad in [p.grad for p in net.parameters() if p.grad is not None]:
            torch.nan_to_num(grad, nan=0, posinf=inf, neginf=-inf, out=grad)
        optimizer.step()
        ema.update(cur_nimg=state['nimg'] + (batch if edm2 else 0), batch_size=batch)  # EDM2: the count after the step
        state['nimg'] += batch
    return step


def build_sampler(net_name: str, size: str, batch: int, variant: dict, device: torch.device, batch_gpu=None):
    """A closure generating one batch as generate.py does: EDM's 18-step sampler (EDM networks), or EDM2's 32-step
    sampler guided by EDM2-XS at weight 1.4 (EDM2 networks), under the variant's switches."""
    del batch_gpu  # one call samples the whole batch
    edm2 = configs.net_spec(net_name, size).edm2
    net = _network(net_name, size, variant, device, train=False)
    call = _compiled(net, variant)  # a compiled module hands attribute reads (img_channels, ...) to net
    gnet = _compiled(_network('edm2-xs', size, variant, device, train=False), variant) if edm2 else None
    gen = torch.Generator(device).manual_seed(0)
    noise = torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], generator=gen, device=device)
    labels = torch.eye(net.label_dim, device=device)[torch.randint(net.label_dim, [batch], generator=gen, device=device)]
    bf16 = variant['precision'].startswith('bf16')

    def run():
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            if edm2:
                return sampling.edm2_sampler(call, noise, labels, gnet=gnet, num_steps=32, guidance=1.4)
            return sampling.edm_sampler(call, noise, labels, num_steps=18)
    return run


def run_one(net_name, size, batch, text, device, steps, task='train', profile=False, batch_gpu=None) -> dict:
    """Time the first step (compile, autotuning) and the median of `steps` steady ones; `profile` adds where
    the device time of a steady step goes (bench/kernels.py)."""
    variant = parse_variant(text.split('@')[0])
    patch = contextlib.nullcontext()
    if variant['precision'] == 'bf16gn32':  # the old behaviour: autocast runs group norm in float32
        patch = _patched(networks, '_autocast_off', lambda x: contextlib.nullcontext())
    with patch, networks.attention_impl(variant['attention']), networks.resample_impl(variant['resample']):
        start = time.perf_counter()
        step = (build_step if task == 'train' else build_sampler)(net_name, size, batch, variant, device, batch_gpu)
        with timing.peak_memory(device) as mem:
            step()
            timing.synchronize(device)
            first_s = time.perf_counter() - start
            step()
            result = timing.time_call(step, device, warmup=1, reps=steps)
            extra = dict(profile=kernels.profile(step, device)) if profile else {}
    return dict(task=task, variant=text, net=net_name, size=size, batch=batch, batch_gpu=batch_gpu or batch,
                first_step_s=round(first_s, 2), step_s=result['median_s'], images_per_s=batch / result['median_s'],
                peak_mem_mb=mem.get('peak_mem_mb'), times_s=result['times_s'], **extra)


@contextlib.contextmanager
def _patched(module, name, value):
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


@click.command()
@click.option('--net', 'net_name', default='ddpmpp-cifar10', show_default=True, type=click.Choice(configs.TRAIN_NETS))
@click.option('--task', default='train', show_default=True, type=click.Choice(['train', 'sample']))
@click.option('--size', default='full', show_default=True, type=click.Choice(['full', 'tiny', 'quick']))
@click.option('--batch', default=512, show_default=True, type=click.IntRange(min=1))
@click.option('--batch-gpu', type=click.IntRange(min=1),
              help='Images per round of a training step (gradient accumulation)  [default: --batch]')
@click.option('--variants', required=True, help='Comma list of variants (module docstring)')
@click.option('--steps', default=10, show_default=True, type=click.IntRange(min=1), help='Timed steps per variant')
@click.option('--device', default='auto', show_default=True)
@click.option('--inline', is_flag=True, help='Run in this process (one variant)')
@click.option('--profile', is_flag=True, help='Add where a steady step spends its device time (kernel groups)')
@click.option('--out', type=click.Path(dir_okay=False), help='Append the JSON lines here too')
def main(task, net_name, size, batch, batch_gpu, variants, steps, device, inline, profile, out):
    """Time train.py's training step under each variant, one fresh process per variant."""
    from torch_utils import misc
    device = misc.choose_device(device)
    torch.backends.cudnn.benchmark = True
    if inline:
        click.echo(json.dumps(run_one(net_name, size, batch, variants, device, steps, task, profile, batch_gpu)))
        return
    cache_dirs = {}
    for text in variants.split(','):
        parse_variant(text.split('@')[0])
        base = text.split('@')[0]
        if not text.endswith('@warm') or base not in cache_dirs:
            cache_dirs[base] = tempfile.mkdtemp(prefix='inductor-')
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dirs[base], PYTHONUNBUFFERED='1')
        cmd = [sys.executable, '-m', 'bench.sweep_train', '--inline', f'--task={task}', f'--net={net_name}', f'--size={size}',
               f'--batch={batch}', f'--variants={text}', f'--steps={steps}', f'--device={device}'] + ['--profile'] * profile
        cmd += [f'--batch-gpu={batch_gpu}'] if batch_gpu else []
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
        if proc.returncode != 0 or not lines:
            record = dict(variant=text, error=(proc.stderr.strip().splitlines() or ['?'])[-1][:300])
        else:
            record = json.loads(lines[-1])
        record['process_s'] = round(time.perf_counter() - start, 1)
        click.echo(json.dumps(record), nl=True)
        if out:
            with open(out, 'a') as f:
                f.write(json.dumps(record) + '\n')


if __name__ == '__main__':
    main()
