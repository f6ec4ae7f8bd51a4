"""Rows of `python -m bench --mode=e2e`: which user script runs, with which flags, at which size.

A row is one command line. Its group names the script, the measurement and the base arguments
(per --size); the row adds the flags under test. Adding a row is one line in ROWS, e.g.

    Row('train-fast', 'train', ('--fast=1',)),

Placeholders in braces are filled by bench/e2e.py: {device} (cpu or cuda), {outdir} (a fresh
folder per row), {data} (PNG dataset zip) and {images} (its size), {latents} (EDM2 raw-latent zip),
{network} (the last snapshot of this run's fp32 'train' row, else one made by a one-batch train.py
run), {edm2_net} and {edm2_gnet} (EDM2-S and EDM2-XS pickles made by one-batch train.py runs on
{latents}, decoding with {vae}), {encode_data} (larger images for the VAE), {vae} (a diffusers
folder) and {ref} (FID reference statistics). Within a group, `ref` marks the reference code's
fastest path (EDM --fp16=1, EDM2 fp16, one-image-at-a-time encoding), run on the reference code's
layers (python -m bench.reference_kernels: einsum attention, depthwise-convolution resampling), and
`fp32` the plain fp32 path; every row of the group reports its img/s as a ratio to both (a group
without an fp32 row has no second ratio). A row may run another script than its group's (`script`),
e.g. the reference's own entry point. A row that compiles starts on an empty compile cache, unless
`warm_from` names the row whose cache it reruns on.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Row:
    """One benchmarked command line."""
    name:   str                     # Selected with --rows (globs allowed).
    group:  str                     # Key of GROUPS: script, measurement and base arguments.
    args:   tuple[str, ...] = ()    # Flags under test, appended to the group's base arguments.
    ref:    bool = False            # The reference code's fastest path of this group (ratio denominator).
    fp32:   bool = False            # The fp32 path of this group (second ratio denominator).
    warm_from: str | None = None    # Row whose compile caches this row reuses (a rerun: a resume's start); None = its own, emptied first.
    script: str | None = None       # Script in the repository root; None = the group's.


@dataclasses.dataclass(frozen=True)
class Group:
    """What the rows of one group run and how they are measured."""
    script:  str                         # Script in the repository root.
    measure: str                         # 'train' (stats.jsonl ticks), 'images' (PNG mtimes) or 'progress' (tqdm counts on stderr).
    base:    dict[str, tuple[str, ...]]  # Base arguments per --size.


# Sizes of the made-up inputs per --size: PNG dataset, EDM2 latents, VAE input images.
DATA = {
    'full': dict(images=5000, resolution=32, latents=1024, latent_resolution=64, encode_images=256, encode_resolution=512),
    'tiny': dict(images=64, resolution=32, latents=32, latent_resolution=64, encode_images=64, encode_resolution=64),
}

# train.py: DDPM++ class-conditional CIFAR-10 (EDM config F); six status ticks, the first one holds the start-up.
_DDPMPP = ('--data={data}', '--outdir={outdir}', '--nosubdir', '--arch=ddpmpp', '--cond=1', '--device={device}',
           '--snapshot=1G', '--checkpoint=1G', '--seed=0')
# train.py: EDM2-S on 64x64x4 latents (ImageNet-512), batch 256 in rounds of 32.
_EDM2 = ('--preset=edm2-img512-s', '--data={latents}', '--outdir={outdir}', '--device={device}',
         '--snapshot=1G', '--checkpoint=1G', '--seed=0')

# generate.py and EDM2's generate_images.py: EDM2-S guided by EDM2-XS at weight 1.4. --steps is given to
# both scripts, so they do the same work: at full size EDM2's 32 (the reference's default --batch=32 too).
_EDM2_GEN = ('--net={edm2_net}', '--gnet={edm2_gnet}', '--guidance=1.4', '--outdir={outdir}')

# The networks of the edm2-gen rows: placeholder -> (train.py preset, arguments added per --size). They are
# one-batch runs with the 'edm2' group's base arguments. At tiny size the guide is narrower than the main
# net, so that the two differ in architecture as XS and S do: --batched-guidance overlaps them instead of stacking.
EDM2_NETS = {
    'edm2_net':  ('edm2-img512-s',  dict(full=(), tiny=())),
    'edm2_gnet': ('edm2-img512-xs', dict(full=(), tiny=('--cbase=8',))),
}

GROUPS = {
    'train': Group('train.py', 'train', dict(
        full=_DDPMPP + ('--batch=512', '--status=5Ki', '--duration=30Ki'),
        tiny=_DDPMPP + ('--batch=8', '--cbase=16', '--cres=1,2', '--workers=0', '--status=16', '--duration=0.048k'))),
    'edm2': Group('train.py', 'train', dict(
        full=_EDM2 + ('--batch=256', '--batch-gpu=32', '--status=1280', '--duration=7680'),
        tiny=_EDM2 + ('--batch=8', '--cbase=16', '--cres=1,2', '--workers=0', '--status=16', '--duration=64'))),
    'generate': Group('generate.py', 'images', dict(
        full=('--network={network}', '--outdir={outdir}', '--seeds=0-4095', '--batch=512', '--steps=18', '--device={device}'),
        tiny=('--network={network}', '--outdir={outdir}', '--seeds=0-7', '--batch=4', '--steps=6', '--device={device}'))),
    'edm2-gen': Group('generate.py', 'images', dict(
        full=_EDM2_GEN + ('--seeds=0-511', '--batch=32', '--steps=32', '--device={device}'),
        tiny=_EDM2_GEN + ('--seeds=0-7', '--batch=4', '--steps=4', '--device={device}'))),
    'fid': Group('fid.py', 'progress', dict(
        full=('calc', '--images={data}', '--ref={ref}', '--num={images}', '--batch=256', '--device={device}'),
        tiny=('calc', '--images={data}', '--ref={ref}', '--num={images}', '--batch=8', '--workers=0', '--device={device}'))),
    'fid-gen': Group('fid.py', 'progress', dict(
        full=('gen', '--net={network}', '--ref={ref}', '--num=4096', '--batch=512', '--steps=18', '--device={device}'),
        tiny=('gen', '--net={network}', '--ref={ref}', '--num=16', '--batch=4', '--steps=6', '--device={device}'))),
    'encode': Group('dataset_tool.py', 'progress', dict(
        full=('encode', '--model={vae}', '--source={encode_data}', '--dest={outdir}', '--device={device}'),
        tiny=('encode', '--model={vae}', '--source={encode_data}', '--dest={outdir}', '--workers=0', '--device={device}'))),
}

# Rows with one of these flags, or with warm_from, get a compile cache of their own in the work folder
# ($TORCHINDUCTOR_CACHE_DIR, Triton's cache inside it): cold unless warm_from, whatever ran before.
COMPILE_FLAGS = ('--compile', '--fast')

ROWS = [
    Row('train-fp16',               'train',    ('--fp16=1',), ref=True),
    Row('train-fp16-ours',          'train',    ('--fp16=1',)),  # the same command on our layers
    Row('train-fp32',               'train',    (), fp32=True),
    Row('train-bf16',               'train',    ('--bf16=1',)),
    Row('train-cl',                 'train',    ('--channels-last=1',)),
    Row('train-bf16-cl',            'train',    ('--bf16=1', '--channels-last=1')),
    Row('train-fp16-compile',       'train',    ('--fp16=1', '--compile')),
    Row('train-fp32-compile',       'train',    ('--compile',)),
    Row('train-bf16-compile',       'train',    ('--bf16=1', '--compile')),
    Row('train-bf16-cl-compile',    'train',    ('--bf16=1', '--channels-last=1', '--compile')),
    Row('train-fast',               'train',    ('--fast',)),
    Row('train-fast-rerun',         'train',    ('--fast',), warm_from='train-fast'),  # a resume's start, on inductor's cache
    Row('train-fast-async',         'train',    ('--fast', '--compile-async=1', '--duration=400Ki')),  # eager until a child has compiled; long enough to switch
    Row('edm2-fp16',                'edm2',     ('--fp16=1',), ref=True),
    Row('edm2-fp32',                'edm2',     ('--fp16=0',), fp32=True),
    Row('edm2-bf16',                'edm2',     ('--fp16=0', '--bf16=1')),
    Row('edm2-bf16-compile',        'edm2',     ('--fp16=0', '--bf16=1', '--compile')),
    Row('gen-fp32',                 'generate', (), ref=True, fp32=True),  # EDM's CIFAR-10 models sample in fp32
    Row('gen-fp32-ours',            'generate', ()),  # the same command on our layers
    Row('gen-bf16',                 'generate', ('--precision=bf16',)),
    Row('gen-bf16-cl',              'generate', ('--precision=bf16', '--channels-last')),
    Row('gen-fast',                 'generate', ('--fast',)),
    Row('gen-fast-rerun',           'generate', ('--fast',), warm_from='gen-fast'),  # the same command again, on inductor's cache
    Row('edm2-gen-ref',             'edm2-gen', (), ref=True, script='generate_images.py'),  # EDM2's own script: fp16 pickles, no compile
    Row('edm2-gen-ours',            'edm2-gen', ()),  # generate.py with the same options: the pickles' fp16, our layers, eager
    Row('edm2-gen-fast',            'edm2-gen', ('--fast',)),
    Row('edm2-gen-fast-batched',    'edm2-gen', ('--fast', '--batched-guidance')),
    Row('fid-calc',                 'fid',      (), ref=True, fp32=True),
    Row('fid-gen',                  'fid-gen',  (), ref=True, fp32=True),  # generate.py's sampler + Inception, no PNGs
    Row('encode-b1-tf32',           'encode',   ('--batch=1', '--precision=tf32'), ref=True),  # the reference: one image per call, TF32 convolutions
    Row('encode-b1',                'encode',   ('--batch=1', '--precision=fp32'), fp32=True),
    Row('encode-b32-tf32',          'encode',   ('--batch=32', '--precision=tf32')),
    Row('encode-b8',                'encode',   ('--batch=8',)),  # the defaults: 8 per call, TF32 (before 2026-12-05: fp32)
    Row('encode-b32-bf16',          'encode',   ('--batch=32', '--precision=bf16')),
]


def script_of(row: Row) -> str:
    """The script a row runs: its own, else its group's."""
    return row.script or GROUPS[row.group].script
