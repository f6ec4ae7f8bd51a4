"""The command lines of the EDM, EDM2 and STF READMEs (tests/readme_commands.py) run here as written.

One work folder stands in for a user's checkout: `downloads/` holds tiny raw data of each kind,
$DNNLIB_CACHE_DIR holds tiny files under every published URL the rows use (network pickles from two
short training runs, FID / FD_DINOv2 reference statistics), and the feature detectors are tiny
stand-ins ($EDM_FID_DETECTOR, $EDM_DINOV2_WEIGHTS). Rows run in order in this process through click.
"""

import glob
import importlib
import io
import os
import pickle
import re
import shlex
import shutil
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
from tests.readme_commands import ROWS
from tests.test_metrics import tiny_vit
from torch_utils import persistence
from training import metrics, presets_generate, toy, training_loop
from training.presets import build_config

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py

# Script -> name of its click command.
COMMANDS = {'example.py': 'main', 'generate.py': 'main', 'fid.py': 'main', 'dataset_tool.py': 'cmdline',
            'train.py': 'main', 'reconstruct_phema.py': 'cmdline', 'generate_images.py': 'cmdline',
            'calculate_metrics.py': 'cmdline', 'count_flops.py': 'cli', 'train_edm2.py': 'cmdline',
            'toy_example.py': 'cmdline'}

#----------------------------------------------------------------------------
# Tiny stand-ins.

class TinyInception(torch.nn.Module):
    """[N, 3, 299, 299] in [-1, 1] -> [N, 2048], like the TorchScript FID detector (a fixed random projection)."""

    def __init__(self):
        super().__init__()
        self.register_buffer('proj', torch.randn([48, 2048], generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) @ self.proj


def random_images(n, size, seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=[n, size[1], size[0], 3], dtype=np.uint8)


def write_png_dataset(folder, images, labels=None):
    """The dataset_tool.py layout: 00000/img00000000.png ... plus dataset.json."""
    os.makedirs(folder / '00000', exist_ok=True)
    names = [f'00000/img{i:08d}.png' for i in range(len(images))]
    for name, image in zip(names, images):
        PIL.Image.fromarray(image).save(folder / name)
    label_list = None if labels is None else [[n, int(c)] for n, c in zip(names, labels)]
    (folder / 'dataset.json').write_text(__import__('json').dumps(dict(labels=label_list)))
    return folder


def write_zip(folder, zip_path):
    os.makedirs(zip_path.parent, exist_ok=True)
    with zipfile.ZipFile(zip_path, 'w', compression=zipfile.ZIP_STORED) as z:
        for path in sorted(folder.rglob('*')):
            if path.is_file():
                z.write(path, path.relative_to(folder).as_posix())


def write_cifar_tarball(path, images_per_batch=2):
    os.makedirs(path.parent, exist_ok=True)
    with tarfile.open(path, 'w:gz') as tar:
        for i in range(1, 6):
            images = random_images(images_per_batch, (32, 32), seed=i).transpose(0, 3, 1, 2).reshape(images_per_batch, -1)
            data = pickle.dumps({'data': images, 'labels': [(i + j) % 10 for j in range(images_per_batch)]}, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{i}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_image_files(folder, count, size, ext='png', seed=0):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(random_images(count, size, seed)):
        PIL.Image.fromarray(image).save(folder / f'img{i}.{ext}')


def train_tiny(run_dir, data, preset, batch_size=16, snapshot_nimg=16):
    """A two-step training run of an 8-channel net on 4x4 images (cheap to sample from); returns the run folder with its network-snapshot-*.pkl files."""
    cfg = build_config(preset, data=str(data), cond=True, model_channels=8, channel_mult=(1,), batch_size=batch_size, total_nimg=2 * snapshot_nimg,
                       snapshot_nimg=snapshot_nimg, checkpoint_nimg=2 * snapshot_nimg, status_nimg=snapshot_nimg)
    training_loop.training_loop(cfg, str(run_dir), torch.device('cpu'))
    return run_dir


def place_in_cache(url, path):
    dest = dnnlib.util.url_cache_path(url)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copyfile(path, dest)


def published_urls():
    """Every URL the rows reach: written in the command or behind an EDM2 preset."""
    urls = set()
    for row in ROWS:
        urls |= set(re.findall(r'https://\S+', row.command))
        for preset in re.findall(r'--preset=(\S+)', row.command):
            if preset not in presets_generate.PRESETS:  # a training preset
                continue
            cfg = presets_generate.PRESETS[preset]
            urls |= {u for u in (cfg.net, cfg.gnet) if u is not None}
    return sorted(urls)

#----------------------------------------------------------------------------
# The work folder.

@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp('readme')
    env = dict(DNNLIB_CACHE_DIR=str(root / '.cache'), HF_HUB_OFFLINE='1',
               EDM_FID_DETECTOR=str(root / 'tiny-inception.pt'), EDM_DINOV2_WEIGHTS=str(root / 'tiny-dinov2.pth'))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        torch.jit.save(torch.jit.script(TinyInception().eval()), env['EDM_FID_DETECTOR'])
        torch.save(tiny_vit(seed=1).state_dict(), env['EDM_DINOV2_WEIGHTS'])
        make_downloads(root)
        make_published_files(root)
        yield root
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_downloads(root):
    """Raw data where the READMEs expect it, and the tiny VAE standing in for stabilityai/sd-vae-ft-mse."""
    write_cifar_tarball(root / 'downloads/cifar10/cifar-10-python.tar.gz')
    write_image_files(root / 'downloads/ffhq/images1024x1024', 4, (64, 64))
    write_image_files(root / 'downloads/afhqv2/train/cat', 2, (64, 64), seed=1)
    write_image_files(root / 'downloads/afhqv2/train/dog', 2, (64, 64), seed=2)
    for k, wnid in enumerate(['n01440764', 'n01443537']):
        write_image_files(root / f'downloads/imagenet/ILSVRC/Data/CLS-LOC/train/{wnid}', 2, (80, 72), ext='JPEG', seed=3 + k)
    my = write_png_dataset(root / 'my-dataset', random_images(8, (8, 8), seed=5))
    write_zip(my, root / 'datasets/my-dataset.zip')
    import diffusers
    torch.manual_seed(0)
    diffusers.models.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
        norm_num_groups=4).save_pretrained(root / 'tiny-vae')


def make_published_files(root):
    """Snapshots of two tiny training runs (EDM, EDM2) and reference statistics under every URL of the rows."""
    train_data = write_png_dataset(root / 'train-data', random_images(32, (4, 4), seed=6), labels=np.arange(32) % 10)
    edm_run = train_tiny(root / 'runs/edm', train_data, 'tiny-edm')
    # Post-hoc EMA reconstruction needs snapshots past 0 kimg: 2 x 1024 images in batches of 256.
    edm2_run = train_tiny(root / 'runs/edm2', train_data, 'tiny-edm2', batch_size=256, snapshot_nimg=1024)
    edm_pkl = sorted(glob.glob(str(edm_run / 'network-snapshot-*.pkl')))[-1]
    # The STF rows evaluate a finished run folder: the training states its train.py row (run as -n) would leave.
    os.makedirs(root / 'training-runs/exp_name')
    for path in glob.glob(str(edm_run / 'training-state-*.pt')):
        shutil.copy(path, root / 'training-runs/exp_name')
    edm2_pkls = sorted(glob.glob(str(edm2_run / 'network-snapshot-*.pkl')))
    os.makedirs(root / 'raw-snapshots/edm2-img512-xs')
    for path in edm2_pkls:
        shutil.copy(path, root / 'raw-snapshots/edm2-img512-xs')

    images = root / 'ref-images'
    write_image_files(images, 8, (8, 8), seed=7)
    dev = torch.device('cpu')
    metrics.ref(str(images), str(root / 'ref.npz'), metrics=['fid'], num_workers=0, device=dev)
    metrics.ref(str(images), str(root / 'ref.pkl'), metrics=['fid', 'fd_dinov2'], num_workers=0, device=dev)
    for url in published_urls():
        if url.endswith('.npz'):
            place_in_cache(url, root / 'ref.npz')
        elif '/dataset-refs/' in url:
            place_in_cache(url, root / 'ref.pkl')
        elif '/edm2/' in url:
            place_in_cache(url, edm2_pkls[-1])
        else:
            place_in_cache(url, edm_pkl)
    for spec in toy.DEFAULT_MODELS.values():  # toy_example.py's published models, tiny
        name = toy.model_name(spec['classes'], spec['num_layers'], spec['hidden_dim'])
        toy.save_snapshot(toy.ToyModel(num_layers=1, hidden_dim=8), str(root / 'toy.pkl'))
        place_in_cache(toy.REFERENCE_URL.format(name=name, iter=spec['total_iter']), root / 'toy.pkl')
    for example in ('edm-cifar10-32x32-cond-vp', 'edm-ffhq-64x64-uncond-vp', 'edm-afhqv2-64x64-uncond-vp',
                    'edm-imagenet-64x64-cond-adm'):  # example.py's models
        place_in_cache(f'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/{example}.pkl', edm_pkl)

#----------------------------------------------------------------------------

def run_row(row, workdir):
    """(ok, output) of one row run in `workdir`, and whether it left what it should."""
    args = shlex.split(row.runnable())
    assert args[0] == 'python' and args[1] in COMMANDS, f'not a command of this project: {row.runnable()}'
    if '--outdir=out' in args:
        shutil.rmtree(workdir / 'out', ignore_errors=True)  # generate.py would resume a previous row's images
    command = getattr(importlib.import_module(args[1][:-3]), COMMANDS[args[1]])
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        result = CliRunner().invoke(command, args[2:], prog_name=args[1])
    finally:
        os.chdir(cwd)
    output = result.output + (f'\n{type(result.exception).__name__}: {result.exception}' if result.exception else '')
    missing = [e for e in row.expect if (e[1:] not in result.output if e.startswith('>')
                                         else not glob.glob(str(workdir / e), recursive=True))]
    return result.exit_code == 0 and not missing, output + (f'\nmissing: {missing}' if missing else '')


def test_readme_command_lines_run_as_written(workdir):
    failures, unexpected_passes = [], []
    for row in ROWS:
        ok, output = run_row(row, workdir)
        if row.xfail and ok:
            unexpected_passes.append(f'[{row.source}] {row.command}  (marked: {row.xfail})')
        elif not row.xfail and not ok:
            failures.append(f'[{row.source}] {row.runnable()}\n{output[-1500:]}')
    assert not failures, f'{len(failures)} README rows failed:\n\n' + '\n\n'.join(failures)
    assert not unexpected_passes, 'rows marked xfail now pass; remove the mark:\n' + '\n'.join(unexpected_passes)


def test_table_substitutions_occur_in_their_commands():
    for row in ROWS:
        row.runnable()  # asserts every substitution's text is in the command
        assert row.expect, f'row checks nothing beyond its exit code: {row.command}'
        assert not row.command.startswith('torchrun') or any(old.startswith('torchrun') for old, _ in row.subs)
