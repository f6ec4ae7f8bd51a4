"""One switch at a time: what `dataset_tool.py encode` spends per image in the VAE encoder, or (`--task decode`)
what generate.py spends in the VAE decoder of a latent model, under each variant, with where the device time goes
(`--profile`, bench/kernels.py).

    python -m bench.sweep_encode --variants tf32+b1,fp32,bf16,bf16+gn,bf16+cl,bf16+gn+cl --profile
    python -m bench.sweep_encode --task decode --variants tf32,bf16,bf16+cl,bf16+gn+cl
    python -m bench.sweep_encode --size tiny --device cpu --variants fp32,fp32+b1 --steps 1

The decode task decodes whitened latents of configs.ENCODE_IMAGES[size] images with StabilityVAEEncoder.decode, 8 per
VAE call (the encoder's default, as generate.py decodes) or one (b1). tf32 is what generate.py's fp32 runs (torch's
default: cuDNN convolutions in TF32) and EDM2's generate_images.py too; bf16 is generate.py's --precision=bf16.

A variant is '+'-joined switches: a precision (fp32 = TF32 off, our default; tf32 = cuDNN TF32 on, the reference's
numerics; bf16 = autocast, as `--precision=bf16`), then any of b1 (one image per VAE call, as the reference; else
the whole batch in one call, or 8 when decoding), cl (channels-last VAE weights and input), gn (group norm in its input's dtype under
autocast, as this project's networks do; torch's autocast runs it in float32), autotune (cuDNN benchmark mode;
dataset_tool.py leaves it off) and compile (torch.compile of the VAE encoder, or decoder). Only the precisions and b1 exist in
dataset_tool.py; the other switches are candidates to measure first. Variants run one after another in this
process, each on its own random-weight VAE (bench/configs.py).
"""

import contextlib
import json

import click
import torch

from bench import cases, configs, kernels, timing

PRECISIONS = ('fp32', 'tf32', 'bf16')
SWITCHES = ('b1', 'cl', 'gn', 'autotune', 'compile')


def parse_variant(text: str) -> dict:
    """'bf16+gn+cl' -> dict(precision='bf16', b1=False, cl=True, gn=True, autotune=False, compile=False)."""
    precision, *switches = text.split('+')
    bad = [s for s in switches if s not in SWITCHES]
    if precision not in PRECISIONS or bad:
        raise click.BadParameter(f'{text!r}: precision must be one of {PRECISIONS} and switches from {SWITCHES}')
    if 'gn' in switches and precision != 'bf16':
        raise click.BadParameter(f'{text!r}: gn changes only what autocast does, so it goes with bf16')
    return dict(precision=precision, **{switch: switch in switches for switch in SWITCHES})


def group_norm_in_input_dtype(vae: torch.nn.Module) -> int:
    """Make every GroupNorm of `vae` normalise in its input's dtype under autocast (the statistics are still
    accumulated in float32 by the kernel); returns how many. Autocast would run them, and every elementwise
    op after them up to the next convolution, in float32."""
    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype),
                                                  self.eps)
    norms = [m for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)]
    for norm in norms:
        norm.forward = forward.__get__(norm)
    return len(norms)


def _vae_call(size: str, variant: dict, device: torch.device, part: str, inputs: torch.Tensor, batch_size: int):
    """A closure running StabilityVAEEncoder's `part` ('encoder': encode_pixels, 'decoder': decode) on `inputs`, with
    a random-weight VAE, the variant's switches and backend flags, `batch_size` items per VAE call (b1: one)."""
    encoder = cases._vae_encoder(size, None, 1 if variant['b1'] else batch_size, device)
    vae = encoder._vae
    if variant['gn']:
        group_norm_in_input_dtype(vae)
    if variant['cl']:
        vae.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    if variant['compile']:
        setattr(vae, part, torch.compile(getattr(vae, part), dynamic=False))
    if device.type == 'cuda':  # as dataset_tool.py sets them, except autotune
        torch.backends.cudnn.allow_tf32 = variant['precision'] == 'tf32'
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = variant['autotune']
    call = encoder.encode_pixels if part == 'encoder' else encoder.decode
    bf16 = variant['precision'] == 'bf16'

    def run():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            return call(inputs)
    return run, len(inputs)


def build_encode(size: str, variant: dict, device: torch.device):
    """A closure encoding configs.ENCODE_IMAGES[size] random images, the whole batch in one call (b1: one each)."""
    images = cases.encode_images(size, device)
    return _vae_call(size, variant, device, 'encoder', images, len(images))


DECODE_BATCH = 8  # StabilityVAEEncoder's default batch_size, with which generate.py decodes


def build_decode(size: str, variant: dict, device: torch.device):
    """A closure decoding whitened latents of configs.ENCODE_IMAGES[size] images to uint8 pixels, 8 per VAE call."""
    count, resolution = configs.ENCODE_IMAGES[size]
    latents = torch.randn([count, 4, resolution // 8, resolution // 8], generator=torch.Generator().manual_seed(5)) * 0.5
    return _vae_call(size, variant, device, 'decoder', latents.to(device), DECODE_BATCH)


def run_one(size: str, text: str, device: torch.device, steps: int, profile: bool = False, task: str = 'encode') -> dict:
    """First call (autotuning, compile) and the median of `steps` steady calls; `profile` adds kernel groups."""
    variant = parse_variant(text)
    run, count = (build_encode if task == 'encode' else build_decode)(size, variant, device)
    with timing.peak_memory(device) as mem:
        result = timing.time_call(run, device, warmup=1, reps=steps)
        extra = dict(profile=kernels.profile(run, device, calls=1)) if profile else {}
    return dict(task=task, variant=text, size=size, images=count, step_s=result['median_s'],
                images_per_s=count / result['median_s'], peak_mem_mb=mem.get('peak_mem_mb'), times_s=result['times_s'],
                **extra)


@click.command()
@click.option('--task', default='encode', show_default=True, type=click.Choice(['encode', 'decode']))
@click.option('--size', default='full', show_default=True, type=click.Choice(['full', 'tiny', 'quick']))
@click.option('--variants', required=True, help='Comma list of variants (module docstring)')
@click.option('--steps', default=3, show_default=True, type=click.IntRange(min=1), help='Timed calls per variant')
@click.option('--device', default='auto', show_default=True)
@click.option('--profile', is_flag=True, help='Add where a steady call spends its device time (kernel groups)')
@click.option('--out', type=click.Path(dir_okay=False), help='Append the JSON lines here too')
def main(task, size, variants, steps, device, profile, out):
    """Time the VAE encoder of dataset_tool.py encode, or the decoder of generate.py, under each variant."""
    from torch_utils import misc
    device = misc.choose_device(device)
    texts = variants.split(',')
    for text in texts:
        parse_variant(text)  # refuse a bad list before anything runs
    for text in texts:
        record = json.dumps(run_one(size, text, device, steps, profile, task))
        click.echo(record)
        if out:
            with open(out, 'a') as f:
                f.write(record + '\n')


if __name__ == '__main__':
    main()
