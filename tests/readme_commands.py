"""Every command line of the reference READMEs, one row each, with what the test changes to run it here.

Sources: NVlabs/edm README.md (EDM), NVlabs/edm2 README.md (EDM2), Newbeeer/stf README.md (STF, the
Stable Target Field fork of EDM). tests/test_readme_commands.py runs the rows in order in one work
folder where the published URLs resolve to tiny local files (placed in $DNNLIB_CACHE_DIR) and
`downloads/`, `datasets/` hold tiny data of the same kind, so the commands run as written.

What a row may change, each spelled out in `subs` as (text in the command, replacement):
- `torchrun --standalone --nproc_per_node=N` -> `python`: one process, in the test's process;
- sizes: 50000 images or seeds, 256+ sampling steps -> a handful;
- training commands get `-n` (print the resolved config and stop): a paper-size network cannot
  take a step on a CPU in a test. The tiny runs that make the test's pickles exercise the loop.
`xfail` names the owner of a feature still missing on this branch; such a row must fail, and a
row that starts passing is reported, so that the mark gets removed.

Left out, not being commands of this project: `docker build` (the `docker run` lines run
`python example.py` / `generate_images.py`, listed), `conda env create`, `rclone copy`, `pip install`,
and the `python <script>.py --help` the READMEs point to (tests/test_docs.py runs every `--help`).
"""

import dataclasses

TORCHRUN = 'torchrun --standalone --nproc_per_node='
EDM = 'https://nvlabs-fi-cdn.nvidia.com/edm'
EDM2 = 'https://nvlabs-fi-cdn.nvidia.com/edm2'


@dataclasses.dataclass(frozen=True)
class Row:
    source: str                 # 'EDM', 'EDM2' or 'STF' README.
    command: str                # As the README writes it (line continuations joined).
    subs: tuple = ()            # (old, new) text replacements; each old must occur in the command.
    expect: tuple = ()          # What it must leave: path globs, or '>text' it must print.
    xfail: str = ''             # Why the row fails on this branch (the owner of the missing feature).

    def runnable(self) -> str:
        """The command with the substitutions applied."""
        command = self.command
        for old, new in self.subs:
            assert old in command, f'substitution {old!r} does not occur in {self.command!r}'
            command = command.replace(old, new)
        return command


def _torchrun(n):
    return (f'{TORCHRUN}{n}', 'python')


_DRY = ('--data=', '-n --data=')      # Training rows: print the resolved config only.
_SEEDS_50K = ('--seeds=0-49999', '--seeds=0-7')

ROWS = [
    # ---- EDM README ----
    Row('EDM', 'python example.py',
        expect=('cifar10-32x32.png', 'ffhq-64x64.png', 'afhqv2-64x64.png', 'imagenet-64x64.png')),
    Row('EDM', 'python generate.py --outdir=out --seeds=0-63 --batch=64 '
               f'--network={EDM}/pretrained/edm-cifar10-32x32-cond-vp.pkl',
        expect=('out/000000.png', 'out/000063.png')),
    Row('EDM', 'torchrun --standalone --nproc_per_node=2 generate.py --outdir=out --seeds=0-999 --batch=64 '
               f'--network={EDM}/pretrained/edm-cifar10-32x32-cond-vp.pkl',
        subs=(_torchrun(2), ('--seeds=0-999', '--seeds=0-99')), expect=('out/000099.png',)),
    Row('EDM', f'python generate.py --outdir=out --steps=18 --network={EDM}/pretrained/edm-cifar10-32x32-cond-vp.pkl',
        expect=('out/000063.png',)),
    Row('EDM', f'python generate.py --outdir=out --steps=40 --network={EDM}/pretrained/edm-ffhq-64x64-uncond-vp.pkl',
        expect=('out/000063.png',)),
    Row('EDM', 'python generate.py --outdir=out --steps=256 --S_churn=40 --S_min=0.05 --S_max=50 --S_noise=1.003 '
               f'--network={EDM}/pretrained/edm-imagenet-64x64-cond-adm.pkl',
        subs=(('--steps=256', '--steps=16'),), expect=('out/000063.png',)),
    Row('EDM', 'python generate.py --outdir=out --steps=512 --solver=euler --disc=vp --schedule=vp --scaling=vp '
               f'--network={EDM}/pretrained/baseline/baseline-cifar10-32x32-uncond-vp.pkl',
        subs=(('--steps=512', '--steps=16'),), expect=('out/000063.png',)),
    Row('EDM', 'python generate.py --outdir=out --steps=128 --solver=heun --disc=edm --schedule=vp --scaling=vp '
               f'--network={EDM}/pretrained/baseline/baseline-cifar10-32x32-uncond-vp.pkl',
        subs=(('--steps=128', '--steps=8'),), expect=('out/000063.png',)),
    Row('EDM', 'python generate.py --outdir=out --steps=18 --solver=heun --disc=edm --schedule=linear --scaling=none '
               f'--network={EDM}/pretrained/baseline/baseline-cifar10-32x32-uncond-vp.pkl',
        expect=('out/000063.png',)),
    Row('EDM', 'torchrun --standalone --nproc_per_node=1 generate.py --outdir=fid-tmp --seeds=0-49999 --subdirs '
               f'--network={EDM}/pretrained/edm-cifar10-32x32-cond-vp.pkl',
        subs=(_torchrun(1), _SEEDS_50K), expect=('fid-tmp/000000/000007.png',)),
    Row('EDM', f'torchrun --standalone --nproc_per_node=1 fid.py calc --images=fid-tmp --ref={EDM}/fid-refs/cifar10-32x32.npz',
        subs=(_torchrun(1), ('calc ', 'calc --num=8 ')), expect=('>fid = ',)),
    Row('EDM', 'python fid.py ref --data=datasets/my-dataset.zip --dest=fid-refs/my-dataset.npz',
        expect=('fid-refs/my-dataset.npz',)),
    Row('EDM', 'python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip',
        expect=('datasets/cifar10-32x32.zip',)),
    Row('EDM', 'python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz',
        expect=('fid-refs/cifar10-32x32.npz',)),
    Row('EDM', 'python dataset_tool.py --source=downloads/ffhq/images1024x1024 --dest=datasets/ffhq-64x64.zip --resolution=64x64',
        expect=('datasets/ffhq-64x64.zip',)),
    Row('EDM', 'python fid.py ref --data=datasets/ffhq-64x64.zip --dest=fid-refs/ffhq-64x64.npz',
        expect=('fid-refs/ffhq-64x64.npz',)),
    Row('EDM', 'python dataset_tool.py --source=downloads/afhqv2 --dest=datasets/afhqv2-64x64.zip --resolution=64x64',
        expect=('datasets/afhqv2-64x64.zip',)),
    Row('EDM', 'python fid.py ref --data=datasets/afhqv2-64x64.zip --dest=fid-refs/afhqv2-64x64.npz',
        expect=('fid-refs/afhqv2-64x64.npz',)),
    Row('EDM', 'python dataset_tool.py --source=downloads/imagenet/ILSVRC/Data/CLS-LOC/train '
               '--dest=datasets/imagenet-64x64.zip --resolution=64x64 --transform=center-crop',
        expect=('datasets/imagenet-64x64.zip',)),
    Row('EDM', 'python fid.py ref --data=datasets/imagenet-64x64.zip --dest=fid-refs/imagenet-64x64.npz',
        expect=('fid-refs/imagenet-64x64.npz',)),
    Row('EDM', 'torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs '
               '--data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp',
        subs=(_torchrun(8), _DRY), expect=('>Dry run',)),
    # The training table: the options of each pretrained model, on the command above.
    *[Row('EDM', f'torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs --data=datasets/{data} {options}',
          subs=(_torchrun(8), _DRY), expect=('>Dry run',)) for data, options in [
        ('cifar10-32x32.zip', '--cond=1 --arch=ncsnpp'),
        ('cifar10-32x32.zip', '--cond=0 --arch=ddpmpp'),
        ('cifar10-32x32.zip', '--cond=0 --arch=ncsnpp'),
        ('ffhq-64x64.zip', '--cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0.15'),
        ('ffhq-64x64.zip', '--cond=0 --arch=ncsnpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0.15'),
        ('afhqv2-64x64.zip', '--cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.25 --augment=0.15'),
        ('afhqv2-64x64.zip', '--cond=0 --arch=ncsnpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.25 --augment=0.15'),
        ('imagenet-64x64.zip', '--cond=1 --arch=adm --duration=2500 --batch=4096 --lr=1e-4 --ema=50 --dropout=0.10 '
                               '--augment=0 --fp16=1 --ls=100 --tick=200'),
    ]],

    # ---- EDM2 README ----
    Row('EDM2', 'python generate_images.py --preset=edm2-img512-s-guid-dino --outdir=out',
        expect=('out/000016.png', 'out/000019.png')),
    Row('EDM2', f'python generate_images.py --net={EDM2}/posthoc-reconstructions/edm2-img512-xxl-0939524-0.015.pkl '
                f'--gnet={EDM2}/posthoc-reconstructions/edm2-img512-xs-uncond-2147483-0.015.pkl --guidance=1.7 --outdir=out',
        expect=('out/000019.png',)),
    Row('EDM2', f'python count_flops.py {EDM2}/posthoc-reconstructions/edm2-img512-s-2147483-0.130.pkl',
        expect=('>Gflops/sample',)),
    Row('EDM2', 'torchrun --standalone --nproc_per_node=8 generate_images.py '
                '--preset=edm2-img512-s-guid-fid --outdir=out --subdirs --seeds=0-49999',
        subs=(_torchrun(8), _SEEDS_50K), expect=('out/000000/000007.png',)),
    Row('EDM2', f'python calculate_metrics.py calc --images=out --ref={EDM2}/dataset-refs/img512.pkl',
        subs=(('calc ', 'calc --num=8 '),), expect=('>fid = ', '>fd_dinov2 = ')),
    Row('EDM2', 'torchrun --standalone --nproc_per_node=8 calculate_metrics.py gen '
                f'--net={EDM2}/posthoc-reconstructions/edm2-img512-s-2147483-0.130.pkl '
                f'--ref={EDM2}/dataset-refs/img512.pkl --seed=123456789',
        subs=(_torchrun(8), ('gen ', 'gen --num=4 ')), expect=('>fid = ', '>fd_dinov2 = ')),
    Row('EDM2', 'python reconstruct_phema.py --indir=raw-snapshots/edm2-img512-xs --outdir=out --outstd=0.150',
        expect=('out/phema-*-0.150.pkl',)),
    Row('EDM2', 'python reconstruct_phema.py --indir=raw-snapshots/edm2-img512-xs --outdir=out '
                '--outstd=0.010,0.015,...,0.250 --batch=8',
        expect=('out/phema-*-0.010.pkl', 'out/phema-*-0.250.pkl')),
    Row('EDM2', 'python dataset_tool.py convert --source=downloads/imagenet/ILSVRC/Data/CLS-LOC/train '
                '--dest=datasets/img512.zip --resolution=512x512 --transform=center-crop-dhariwal',
        expect=('datasets/img512.zip',)),
    # The SD VAE comes from the Hugging Face hub; here a tiny local diffusers folder of the same layout.
    Row('EDM2', 'python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip',
        subs=(('encode ', 'encode --model=tiny-vae '),), expect=('datasets/img512-sd.zip',)),
    Row('EDM2', 'python calculate_metrics.py ref --data=datasets/img512.zip --dest=dataset-refs/img512.pkl',
        expect=('dataset-refs/img512.pkl',)),
    Row('EDM2', 'torchrun --standalone --nproc_per_node=8 train_edm2.py --outdir=training-runs/00000-edm2-img512-xs '
                '--data=datasets/img512-sd.zip --preset=edm2-img512-xs --batch-gpu=32',
        subs=(_torchrun(8), _DRY), expect=('>Dry run',)),
    # No display in a test: the figure goes to a file; fewer samples and a coarser density grid.
    Row('EDM2', 'python toy_example.py plot', subs=(('plot', 'plot --samples=64 --grid=16 --save=toy.png'),),
        expect=('toy.png',)),

    # ---- STF README (the EDM fork): its training form and per-checkpoint evaluation ----
    Row('STF', 'torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs --name=exp_name '
               '--data=datasets/cifar10-32x32.zip --cond=0 --arch=ncsnpp --stf=1 --rbatch 1024',
        subs=(_torchrun(8), _DRY), expect=('>Dry run',)),
    Row('STF', 'torchrun --standalone --nproc_per_node=8 generate.py --seeds=0-49999 --outdir=./training-runs/exp_name',
        subs=(_torchrun(8), _SEEDS_50K), expect=('training-runs/exp_name/**/000007.png',)),
    Row('STF', 'torchrun --standalone --nproc_per_node=8 fid.py calc --images=training-runs/exp_name '
               '--ref=fid-refs/cifar10-32x32.npz --num 50000',
        subs=(_torchrun(8), ('--num 50000', '--num 8')), expect=('>fid = ',)),
]
