"""generate.py end to end on a tiny pickle (CliRunner), its config resolution, and its error messages."""

import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
from torch_utils import persistence
from training import presets_generate, sampling
from training.presets_generate import build_config

#----------------------------------------------------------------------------
# Fixtures.

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


class Unknown(torch.nn.Module):
    """A module class the safe loader does not know."""


def tiny_net(resolution=8, label_dim=0, seed=0):
    from training.networks import EDMPrecond
    torch.manual_seed(seed)
    net = EDMPrecond(img_resolution=resolution, img_channels=3, label_dim=label_dim, model_type='SongUNet',
                     model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope='module')
def pickles(tmp_path_factory):
    root = tmp_path_factory.mktemp('pickles')
    paths = {}
    for name, kwargs in [('uncond', {}), ('cond', dict(label_dim=4)), ('guide', dict(label_dim=4, seed=1)),
                         ('res16', dict(resolution=16, label_dim=4))]:
        paths[name] = str(root / f'{name}.pkl')
        persistence.save_pickle({'ema': tiny_net(**kwargs)}, paths[name])
    paths['untrusted'] = str(root / 'untrusted.pkl')
    with open(paths['untrusted'], 'wb') as f:
        pickle.dump({'ema': Unknown()}, f)
    return paths


def run(*args):
    result = CliRunner().invoke(generate.main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def read_png(path):
    return np.asarray(PIL.Image.open(path))

#----------------------------------------------------------------------------
# Working runs.

def test_writes_one_png_per_seed_and_resumes(pickles, tmp_path):
    outdir = tmp_path / 'out'
    code, output = run('--net', pickles['cond'], '--outdir', outdir, '--seeds', '0-2,7', '--steps', 3, '--batch', 3,
                       '--device', 'cpu')
    assert code == 0, output
    names = sorted(os.listdir(outdir))
    assert names == ['000000.png', '000001.png', '000002.png', '000007.png']
    first = {name: read_png(outdir / name) for name in names}
    assert all(img.shape == (8, 8, 3) and img.dtype == np.uint8 for img in first.values())

    # Resume: only the missing seed is generated again, and it comes out identical.
    os.remove(outdir / '000001.png')
    mtime = os.path.getmtime(outdir / '000007.png')
    code, output = run('--net', pickles['cond'], '--outdir', outdir, '--seeds', '0-2,7', '--steps', 3, '--batch', 1,
                       '--device', 'cpu')
    assert code == 0, output
    assert '3 already written' in output
    assert os.path.getmtime(outdir / '000007.png') == mtime
    assert np.array_equal(read_png(outdir / '000001.png'), first['000001.png'])


def test_subdirs_class_and_grid(pickles, tmp_path):
    outdir, grid = tmp_path / 'out', tmp_path / 'grid.png'
    code, output = run('--net', pickles['cond'], '--outdir', outdir, '--subdirs', '--seeds', '999-1001',
                       '--class', 2, '--steps', 2, '--grid', grid, '--device', 'cpu', '--trust-pickle')
    assert code == 0, output
    assert sorted(os.listdir(outdir)) == ['000000', '001000']
    assert sorted(os.listdir(outdir / '001000')) == ['001000.png', '001001.png']
    image = read_png(grid)
    assert image.shape == (16, 16, 3)  # 3 images on a 2 x 2 grid.
    assert np.array_equal(image[:8, 8:], read_png(outdir / '001000' / '001000.png'))
    assert not image[8:, 8:].any()


def test_grid_only_with_guidance_and_sampler(pickles, tmp_path):
    grid = tmp_path / 'grid.png'
    code, output = run('--net', pickles['cond'], '--gnet', pickles['guide'], '--guidance', 1.5, '--grid', grid,
                       '--seeds', '0-3', '--sampler', 'dpmpp2m', '--steps', 3, '--device', 'cpu')
    assert code == 0, output
    assert os.listdir(tmp_path) == ['grid.png']
    assert read_png(grid).shape == (16, 16, 3)

#----------------------------------------------------------------------------
# Config resolution.

def test_build_config_applies_presets_and_overrides():
    cfg = build_config('edm2-img512-xxl-autog-fid', outdir='out', num_steps=None)
    assert cfg.net.endswith('/edm2-img512-xxl-0939524-0.075.pkl')
    assert cfg.gnet.endswith('/edm2-img512-m-0268435-0.155.pkl')
    assert cfg.sampler_kwargs() == {'guidance': 2.05}
    cfg = build_config('edm-imagenet-64x64-cond-adm', outdir='out', S_churn=10)
    assert cfg.sampler == 'edm'
    assert cfg.sampler_kwargs() == dict(num_steps=256, S_churn=10, S_min=0.05, S_max=50, S_noise=1.003)
    assert build_config(net='x.pkl', outdir='o', solver='euler').sampler == 'ablation'
    assert build_config(net='x.pkl', outdir='o', gnet='g.pkl', guidance=1).gnet is None
    assert len([p for p in presets_generate.PRESETS if p.startswith('edm2-')]) == 36


@pytest.mark.parametrize('kwargs,match', [
    (dict(), '--net'),
    (dict(outdir='o', grid='g.png'), '--grid=g.png needs one network'),  # no --net: every training state of --outdir
    (dict(outdir='o', ckpt=5, end_ckpt=2), '--ckpt=5 --end_ckpt=2'),
    (dict(net='x.pkl'), '--outdir'),
    (dict(net='x.pkl', outdir='o', guidance=2.0), '--gnet'),
    (dict(net='x.pkl', outdir='o', seeds=[]), 'empty'),
    (dict(net='x.pkl', outdir='o', sampler='ddim', S_churn=3.0), '--S_churn=3.0 does not apply to --sampler=ddim'),
    (dict(net='x.pkl', outdir='o', sampler='heun'), 'not a sampler'),
])
def test_build_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_config(**kwargs)

#----------------------------------------------------------------------------
# Bad input: one clear line, nonzero exit.

@pytest.mark.parametrize('args,match', [
    (['--seeds', '1-a'], "cannot parse '1-a'"),
    (['--seeds', '5-2'], 'is empty'),
    (['--class', 4], 'out of range'),
    (['--guidance', 2], 'needs a guiding network'),
    (['--gnet', '{res16}', '--guidance', 2], 'img_resolution=16'),
    (['--gnet', '{uncond}', '--class', 0, '--net', '{uncond}'], 'unconditional'),
    (['--net', '{missing}'], 'no such file'),
    (['--net', '{untrusted}'], '--trust-pickle'),
])
def test_bad_input_fails_with_one_clear_line(pickles, tmp_path, args, match):
    paths = dict(pickles, missing=str(tmp_path / 'missing.pkl'))
    args = [str(a).format(**paths) for a in args]
    if '--net' not in args:
        args = ['--net', pickles['cond']] + args
    code, output = run(*args, '--outdir', tmp_path / 'out', '--steps', 2, '--device', 'cpu')
    assert code != 0
    assert 'Traceback' not in output
    errors = [line for line in output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and match in errors[0], output
    assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')


def test_gnet_with_other_label_dim_is_rejected(pickles, tmp_path):
    # An unconditional guide is fine (classifier-free guidance); another label count is not.
    persistence.save_pickle({'ema': tiny_net(label_dim=3)}, tmp_path / 'l3.pkl')
    code, output = run('--net', pickles['cond'], '--gnet', tmp_path / 'l3.pkl', '--guidance', 2, '--outdir',
                       tmp_path / 'out', '--steps', 2, '--device', 'cpu')
    assert code != 0 and 'label_dim=3' in output
    code, output = run('--net', pickles['cond'], '--gnet', pickles['uncond'], '--guidance', 2, '--outdir',
                       tmp_path / 'out', '--seeds', 0, '--steps', 2, '--device', 'cpu')
    assert code == 0, output

#----------------------------------------------------------------------------
# Reference pickles, dry run, torchrun.

def test_dry_run_prints_config():
    code, output = run('--preset', 'edm2-img512-s-autog-fid', '--grid', 'g.png', '--dry-run')
    assert code == 0, output
    assert '"guidance": 2.1' in output and 'edm2-img512-xs-0134217-0.125.pkl' in output


def test_reference_pickles_with_classifier_free_guidance(spec_dir, tmp_path):
    # EDM2 snapshot (float16 ema + StandardRGBEncoder), guided by the unconditional one, via the safe loader.
    pickles = spec_dir / 'pickles'
    code, output = run('--net', pickles / 'edm2-snapshot.pkl', '--gnet', pickles / 'edm2-uncond-snapshot.pkl',
                       '--guidance', 1.5, '--outdir', tmp_path, '--seeds', '0,1', '--steps', 3, '--device', 'cpu')
    assert code == 0, output
    assert read_png(tmp_path / '000001.png').shape == (16, 16, 3)


def test_torchrun_two_ranks_match_one(pickles, tmp_path):
    import subprocess
    import sys
    args = ['--net', pickles['cond'], '--seeds', '0-4', '--batch', 2, '--steps', 2, '--device', 'cpu']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', generate.__file__]
    proc = subprocess.run(cmd + [str(a) for a in args + ['--outdir', tmp_path / 'two', '--grid', tmp_path / 'two.png']],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    code, output = run(*args, '--outdir', tmp_path / 'one', '--grid', tmp_path / 'one.png')
    assert code == 0, output
    assert sorted(os.listdir(tmp_path / 'two')) == sorted(os.listdir(tmp_path / 'one'))
    assert np.abs(read_png(tmp_path / 'two.png').astype(int) - read_png(tmp_path / 'one.png')).max() <= 1


def _images(net, gnet=None, **kwargs):
    batches = sampling.generate_images(net, [0, 1, 2], gnet=gnet, batch_size=3, num_steps=4, **kwargs)
    return torch.cat([torch.as_tensor(b.images) for b in batches]).int()


def test_sampling_fast_paths_match_reference_numerics():
    """channels-last and batched guidance give the reference images; bf16 autocast stays close."""
    net, gnet = tiny_net(label_dim=4), tiny_net(label_dim=4, seed=1)
    with torch.no_grad():  # zero-initialised output layers would make every network output 0
        for p in list(net.parameters()) + list(gnet.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    reference = _images(net, gnet, guidance=2.0)
    assert (_images(net, gnet, guidance=2.0, batched_guidance=True) - reference).abs().max() <= 1
    assert (_images(net, gnet, guidance=2.0, channels_last=True) - reference).abs().max() <= 1
    assert (_images(net, gnet, guidance=2.0, channels_last=True, batched_guidance=True) - reference).abs().max() <= 1
    other = tiny_net(label_dim=4, seed=2)  # another architecture: overlapped instead of batched
    other = type(other)(**dict(other.init_kwargs, model_channels=8)).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert (_images(net, other, guidance=2.0, batched_guidance=True) - _images(net, other, guidance=2.0)).abs().max() <= 1
    bf16 = _images(net, gnet, guidance=2.0, precision='bf16')
    assert (bf16 - reference).abs().float().mean() < 3
    with pytest.raises(ValueError, match='fp32 or bf16'):
        _images(net, precision='fp16')


def test_generate_cli_fast_path_flags(pickles, tmp_path):
    args = ['--net', pickles['cond'], '--gnet', pickles['guide'], '--guidance', 1.5, '--seeds', '0-1', '--steps', 3,
            '--device', 'cpu']
    run(*args, '--outdir', tmp_path / 'ref')
    run(*args, '--outdir', tmp_path / 'fast', '--channels-last', '--batched-guidance')
    for seed in (0, 1):
        a = np.asarray(PIL.Image.open(tmp_path / 'ref' / f'{seed:06d}.png')).astype(int)
        b = np.asarray(PIL.Image.open(tmp_path / 'fast' / f'{seed:06d}.png')).astype(int)
        assert np.abs(a - b).max() <= 1


def test_png_writer_writes_in_the_background_and_reports_errors(tmp_path, monkeypatch):
    """PngWriter: every queued image is on disk when the block ends; a failed write is raised, not lost."""
    from training import sampling
    images = torch.randint(0, 256, [3, 3, 8, 8], dtype=torch.uint8)
    with sampling.PngWriter(str(tmp_path / 'out')) as writer:
        writer.write([5, 6], images[:2])
        writer.write([7], images[2:])
    for seed, image in zip([5, 6, 7], images):
        assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / 'out' / f'{seed:06d}.png')), image.permute(1, 2, 0).numpy())
    calls = []
    def fail(image, path):
        calls.append(path)
        raise OSError('No space left on device')
    monkeypatch.setattr(sampling, 'save_png', fail)
    with pytest.raises(OSError, match='No space left'):
        with sampling.PngWriter(str(tmp_path / 'full')) as writer:
            writer.write([1], images[:1])
    assert len(calls) == 1
    writer = sampling.PngWriter(str(tmp_path / 'full'))
    writer.write([1], images[:1])
    with pytest.raises(OSError, match='No space left'):  # or by the next batch's write, which queues nothing
        writer.write([2], images[1:2])
    writer.close()
    assert len(calls) == 2
    with sampling.PngWriter(None) as writer:  # no outdir: nothing written, nothing queued
        writer.write([1], images[:1])
        assert writer._pending is None


def test_bf16_feeds_fp16_networks_float32_and_decodes_under_autocast():
    """--precision bf16: a use_fp16 network (EDM2's pickles) runs from float32 inputs under autocast, through a
    shallow copy that leaves the caller's network as it was; a guide that is the main net stays that net; the
    decoder runs under the same autocast, while fp32 keeps the networks as given and decodes without autocast."""
    net, gnet = tiny_net(label_dim=4), tiny_net(label_dim=4, seed=1)
    net.use_fp16 = gnet.use_fp16 = True
    seen = []

    class Decoder:
        def decode(self, x):
            seen.append(('decode', torch.is_autocast_enabled('cpu')))
            return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)

    def sampler(net_, noise, labels, gnet=None, randn_like=None, guidance=1):
        seen.append((net_.use_fp16, gnet.use_fp16, gnet is net_, net_.model is net.model))
        return noise

    for precision, guide in (('bf16', gnet), ('bf16', net), ('fp32', gnet)):
        seen.clear()
        list(sampling.generate_images(net, [0], gnet=guide, sampler=sampler, guidance=2.0, precision=precision,
                                      encoder=Decoder()))
        fp32 = precision == 'fp32'
        assert seen == [(fp32, fp32, guide is net, True), ('decode', not fp32)], (precision, seen)
        assert net.use_fp16 and gnet.use_fp16
    copy = sampling.float32_inputs(net)
    assert copy is not net and not copy.use_fp16 and list(copy.parameters())[0] is list(net.parameters())[0]
    assert type(copy) is type(net) and copy.model is net.model  # our class, not one rebuilt from pickled source
    plain = tiny_net()
    assert sampling.float32_inputs(plain) is plain and sampling.float32_inputs(None) is None


def test_sampling_derives_edm2_weights_once_per_batch(monkeypatch):
    """generate_images samples each batch inside networks.frozen_weights(): an EDM2 network derives each layer's
    normalized weight once per batch instead of in each of its calls, with the same images; the reference weights
    (networks.reference_kernels(), as the e2e reference rows run) derive them in every call."""
    from training import networks, networks_edm2
    torch.manual_seed(0)
    net = networks_edm2.Precond(img_resolution=8, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1, 2],
                                num_blocks=1, attn_resolutions=[4], channels_per_head=8).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    calls = []
    weight = networks_edm2.MPConv._weight
    monkeypatch.setattr(networks_edm2.MPConv, '_weight', lambda self, *args: calls.append(self) or weight(self, *args))
    frozen = _images(net, sampler='edm2')  # 3 images in one batch, 4 steps: 7 network calls
    layers, frozen_calls = len(set(calls)), len(calls)
    calls.clear()
    with networks.reference_kernels():
        reference = _images(net, sampler='edm2')
    assert frozen_calls == layers and len(calls) == 7 * layers
    assert torch.equal(frozen, reference) and frozen.float().std() > 1
