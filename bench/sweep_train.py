"""One switch at a time: the training step of train.py (augmentation, loss, backward, gradient cleaning, Adam,
EMA) under each combination of precision, memory format, compile mode, Adam and attention implementation.

    python -m bench.sweep_train --net ddpmpp-cifar10 --batch 512 --variants fp16,bf16,bf16+cl+blocks
    python -m bench.sweep_train --net ddpmpp-cifar10 --size tiny --device cpu --variants fp32,bf16 --steps 2

A variant is '+'-joined switches: a precision (fp32, fp16 = the reference fp16 path, bf16 = autocast with
bf16 group norm, bf16gn32 = autocast with float32 group norm), then any of cl (channels-last weights),
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
from training import augment, loss, networks, phema, sampling, speed

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
    """The benchmark's EDMPrecond, seeded, in the variant's precision path and memory format."""
    spec = configs.net_spec(net_name, size)
    torch.manual_seed(0)
    with torch.device(device):
        net = networks.EDMPrecond(**dict(spec.kwargs, use_fp16=(variant['precision'] == 'fp16')))
    net.train(train).requires_grad_(train)
    if variant['cl']:
        net.to(memory_format=torch.channels_last)
    return net


def _compiled(net: torch.nn.Module, variant: dict) -> torch.nn.Module:
    if not variant['compile']:
        return net
    options = dict(force_layout_optimization=True) if variant['nhwc'] else None
    return speed.compile_network(net, variant['compile'], inductor_mode=variant['inductor_mode'], options=options)


def build_step(net_name: str, size: str, batch: int, variant: dict, device: torch.device):
    """A closure running one training step of train.py's EDM recipe with the variant's switches."""
    net = _network(net_name, size, variant, device, train=True)
    ema = phema.TraditionalEMA(net, halflife_Mimg=0.5, rampup_ratio=0.05)  # copies net before it is compiled
    call = _compiled(net, variant)
    pipe = augment.AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    loss_fn = loss.EDMLoss()
    fused = variant['adam'] == 'fused' and device.type == 'cuda'
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, fused=fused or None,
                                 foreach=not fused)
    gen = torch.Generator(device).manual_seed(0)
    images = torch.randint(0, 256, [batch, 3, net.img_resolution, net.img_resolution], generator=gen, device=device,
                           dtype=torch.uint8)
    labels = torch.eye(net.label_dim, device=device)[torch.randint(net.label_dim, [batch], generator=gen, device=device)]
    bf16 = variant['precision'].startswith('bf16')
    state = dict(nimg=0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        value = loss_fn(net=speed.autocast_calls(call, device, enabled=bf16), images=images.to(torch.float32) / 127.5 - 1,
                        labels=labels, augment_pipe=pipe)
        value.to(torch.float32).sum().mul(1 / batch).backward()
        for grad in [p.grad for p in net.parameters() if p.grad is not None]:
            torch.nan_to_num(grad, nan=0, posinf=1e5, neginf=-1e5, out=grad)
        optimizer.step()
        ema.update(cur_nimg=state['nimg'], batch_size=batch)
        state['nimg'] += batch
    return step


def build_sampler(net_name: str, size: str, batch: int, variant: dict, device: torch.device):
    """A closure generating one batch with generate.py's EDM sampler (18 steps) under the variant's switches."""
    net = _network(net_name, size, variant, device, train=False)
    call = _compiled(net, variant)  # a compiled module hands attribute reads (img_channels, ...) to net
    gen = torch.Generator(device).manual_seed(0)
    noise = torch.randn([batch, 3, net.img_resolution, net.img_resolution], generator=gen, device=device)
    labels = torch.eye(net.label_dim, device=device)[torch.randint(net.label_dim, [batch], generator=gen, device=device)]
    bf16 = variant['precision'].startswith('bf16')

    def run():
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            return sampling.edm_sampler(call, noise, labels, num_steps=18)
    return run


def run_one(net_name, size, batch, text, device, steps, task='train', profile=False) -> dict:
    """Time the first step (compile, autotuning) and the median of `steps` steady ones; `profile` adds where
    the device time of a steady step goes (bench/kernels.py)."""
    variant = parse_variant(text.split('@')[0])
    patch = contextlib.nullcontext()
    if variant['precision'] == 'bf16gn32':  # the old behaviour: autocast runs group norm in float32
        patch = _patched(networks, '_autocast_off', lambda x: contextlib.nullcontext())
    with patch, networks.attention_impl(variant['attention']), networks.resample_impl(variant['resample']):
        start = time.perf_counter()
        step = (build_step if task == 'train' else build_sampler)(net_name, size, batch, variant, device)
        with timing.peak_memory(device) as mem:
            step()
            timing.synchronize(device)
            first_s = time.perf_counter() - start
            step()
            result = timing.time_call(step, device, warmup=1, reps=steps)
            extra = dict(profile=kernels.profile(step, device)) if profile else {}
    return dict(task=task, variant=text, net=net_name, size=size, batch=batch, first_step_s=round(first_s, 2),
                step_s=result['median_s'], images_per_s=batch / result['median_s'], peak_mem_mb=mem.get('peak_mem_mb'),
                times_s=result['times_s'], **extra)


@contextlib.contextmanager
def _patched(module, name, value):
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


@click.command()
@click.option('--net', 'net_name', default='ddpmpp-cifar10', show_default=True, type=click.Choice(['ddpmpp-cifar10', 'adm-imagenet64']))
@click.option('--task', default='train', show_default=True, type=click.Choice(['train', 'sample']))
@click.option('--size', default='full', show_default=True, type=click.Choice(['full', 'tiny', 'quick']))
@click.option('--batch', default=512, show_default=True, type=click.IntRange(min=1))
@click.option('--variants', required=True, help='Comma list of variants (module docstring)')
@click.option('--steps', default=10, show_default=True, type=click.IntRange(min=1), help='Timed steps per variant')
@click.option('--device', default='auto', show_default=True)
@click.option('--inline', is_flag=True, help='Run in this process (one variant)')
@click.option('--profile', is_flag=True, help='Add where a steady step spends its device time (kernel groups)')
@click.option('--out', type=click.Path(dir_okay=False), help='Append the JSON lines here too')
def main(task, net_name, size, batch, variants, steps, device, inline, profile, out):
    """Time train.py's training step under each variant, one fresh process per variant."""
    from torch_utils import misc
    device = misc.choose_device(device)
    torch.backends.cudnn.benchmark = True
    if inline:
        click.echo(json.dumps(run_one(net_name, size, batch, variants, device, steps, task, profile)))
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
