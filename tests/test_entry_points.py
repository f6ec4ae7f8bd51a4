"""The reference-named entry points: example.py (EDM), generate_images.py with EDM2's generate_images()
API, calculate_metrics.py, count_flops.py and train_edm2.py (EDM2): their defaults, outputs and
agreement with the scripts they share code with."""

import json
import os
import re

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import calculate_metrics
import count_flops
import example
import fid
import generate
import generate_images
import train_edm2
from tests.conftest import free_port
from tests.test_metrics import tiny_vit
from torch_utils import distributed as dist
from torch_utils import persistence
from training import example_grid, networks, networks_edm2, presets, sampling

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def edm2_net(label_dim=4, seed=0):
    torch.manual_seed(seed)
    net = networks_edm2.Precond(img_resolution=4, img_channels=3, label_dim=label_dim, use_fp16=False, model_channels=8,
                                channel_mult=[1], num_blocks=1, attn_resolutions=[]).eval().requires_grad_(False)
    for name, param in net.named_parameters():
        if name.endswith('_gain'):  # EDM2 starts its learned gains at 0, which would make every net D(x) = c_skip x.
            param.fill_(1)
    return net


def edm_net(label_dim=4, seed=0):
    torch.manual_seed(seed)
    net = networks.EDMPrecond(img_resolution=4, img_channels=3, label_dim=label_dim, model_type='SongUNet', model_channels=8,
                              channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0).eval().requires_grad_(False)
    for param in net.parameters():  # The output layer starts near 0; make the net's output matter.
        param.add_(torch.randn_like(param) * 0.1)
    return net


@pytest.fixture(scope='module')
def pickles(tmp_path_factory):
    root = tmp_path_factory.mktemp('entry-pickles')
    paths = dict(edm2=root / 'edm2.pkl', guide=root / 'guide.pkl', edm_cond=root / 'edm-cond.pkl', edm_uncond=root / 'edm-uncond.pkl')
    persistence.save_pickle({'ema': edm2_net()}, paths['edm2'])
    persistence.save_pickle({'ema': edm2_net(label_dim=0, seed=1)}, paths['guide'])
    persistence.save_pickle({'ema': edm_net()}, paths['edm_cond'])
    persistence.save_pickle({'ema': edm_net(label_dim=0, seed=2)}, paths['edm_uncond'])
    return {k: str(v) for k, v in paths.items()}


def invoke(command, *args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    return result.exit_code, result.output + (repr(result.exception) if result.exception and result.exit_code != 1 else '')


def read_png(path):
    return np.asarray(PIL.Image.open(path))

#----------------------------------------------------------------------------
# generate_images.py and EDM2's generate_images() API.

def test_generate_images_defaults_and_same_images_as_generate(pickles, tmp_path):
    code, output = invoke(generate_images.cmdline, '--net', pickles['edm2'], '--outdir', tmp_path / 'a', '--device', 'cpu')
    assert code == 0, output
    assert sorted(os.listdir(tmp_path / 'a')) == ['000016.png', '000017.png', '000018.png', '000019.png']  # EDM2's seeds 16-19
    code, output = invoke(generate.main, '--net', pickles['edm2'], '--outdir', tmp_path / 'b', '--seeds', '16-19',
                          '--steps', 32, '--device', 'cpu')
    assert code == 0, output
    for name in os.listdir(tmp_path / 'a'):
        assert np.array_equal(read_png(tmp_path / 'a' / name), read_png(tmp_path / 'b' / name)), name
    # EDM2 rewrites what is there (generate.py would resume and keep these): another net, other images.
    code, output = invoke(generate_images.cmdline, '--net', pickles['guide'], '--outdir', tmp_path / 'a', '--seeds', 16,
                          '--device', 'cpu')
    assert code == 0, output
    assert not np.array_equal(read_png(tmp_path / 'a/000016.png'), read_png(tmp_path / 'b/000016.png'))


def test_generate_images_uses_edm2_sampler_also_for_edm_nets(pickles, tmp_path):
    # EDM2's script runs its float32 sampler whatever the pickle; generate.py picks EDM's for EDM nets. With churn
    # above --S_max on the first step they differ: EDM's sampler draws that step's noise anyway, EDM2's does not.
    churn = ['--seeds', 0, '--steps', 4, '--S_churn', 10, '--S_max', 50, '--device', 'cpu']
    assert invoke(generate_images.cmdline, '--net', pickles['edm_cond'], '--outdir', tmp_path / 'a', *churn)[0] == 0
    assert invoke(generate.main, '--net', pickles['edm_cond'], '--outdir', tmp_path / 'b', '--sampler', 'edm2', *churn)[0] == 0
    assert invoke(generate.main, '--net', pickles['edm_cond'], '--outdir', tmp_path / 'c', *churn)[0] == 0
    assert np.array_equal(read_png(tmp_path / 'a/000000.png'), read_png(tmp_path / 'b/000000.png'))
    assert not np.array_equal(read_png(tmp_path / 'a/000000.png'), read_png(tmp_path / 'c/000000.png'))


def test_generate_images_cli_errors_are_one_line(pickles, tmp_path):
    code, output = invoke(generate_images.cmdline, '--outdir', tmp_path)
    assert code != 0 and '--preset or --net' in output and 'Traceback' not in output
    code, output = invoke(generate_images.cmdline, '--net', pickles['edm2'], '--guidance', 2, '--outdir', tmp_path)
    assert code == 1 and '--gnet' in output and 'Traceback' not in output
    code, output = invoke(generate_images.cmdline, '--preset', 'edm-cifar10-32x32-cond-vp', '--outdir', tmp_path)
    assert code == 2 and 'edm2-img512-s-guid-dino' in output  # EDM2's presets only


def test_generate_images_api_yields_reference_fields_and_writes_pngs(pickles, tmp_path):
    seeds = [3, 1, 4, 1000, 5]
    batches = generate_images.generate_images(pickles['edm2'], gnet=pickles['guide'], guidance=2.0, outdir=str(tmp_path),
                                              subdirs=True, seeds=seeds, max_batch_size=2, num_steps=4, device='cpu',
                                              verbose=False)
    assert len(batches) == 3
    results = list(batches)
    assert [r.batch_idx for r in results] == [0, 1, 2] and all(r.num_batches == 3 for r in results)
    assert [s for r in results for s in r.seeds] == seeds
    assert [int(i) for r in results for i in r.indices] == list(range(5))
    first = results[0]
    assert set(first) == {'images', 'labels', 'noise', 'batch_idx', 'num_batches', 'indices', 'seeds'}
    assert first.images.dtype == torch.uint8 and first.images.shape == (2, 3, 4, 4)
    assert first.noise.shape == (2, 3, 4, 4) and first.labels.shape == (2, 4)
    # The noise is seed 3's own generator, whatever the batch.
    torch.testing.assert_close(first.noise[0], torch.randn([3, 4, 4], generator=torch.Generator().manual_seed(3)))
    assert np.array_equal(read_png(tmp_path / '001000' / '001000.png'), results[1].images[1].permute(1, 2, 0).numpy())
    assert os.path.isfile(tmp_path / '000000' / '000003.png')

    # A module and the default sampler (EDM2's): the same images as the richer generator.
    net = edm2_net()
    api = next(iter(generate_images.generate_images(net, seeds=[16, 17], class_idx=1, num_steps=8, device='cpu', verbose=False)))
    ours = next(iter(sampling.generate_images(net, [16, 17], class_idx=1, sampler='edm2', num_steps=8)))
    assert torch.equal(api.images, ours.images) and api.labels[:, 1].eq(1).all()


def _api_worker(rank, port, net_pkl, outdir, results):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2')
    torch.set_num_threads(1)
    dist.init(torch.device('cpu'))
    batches = generate_images.generate_images(net_pkl, outdir=outdir, seeds=range(7), max_batch_size=2, num_steps=4,
                                              device='cpu', verbose=False)
    results[rank] = [(r.batch_idx, r.num_batches, list(r.seeds)) for r in batches]
    dist.shutdown()


def test_generate_images_api_splits_seeds_over_two_ranks_like_edm2(pickles, tmp_path):
    port, results = free_port(), torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_api_worker, args=(port, pickles['edm2'], str(tmp_path / 'two'), results), nprocs=2, join=True)
    # EDM2: 7 seeds in 2 x ceil(7 / (2 x 2)) = 4 near-equal batches, dealt round-robin; equal counts per rank.
    assert dict(results) == {0: [(0, 2, [0, 1]), (1, 2, [4, 5])], 1: [(0, 2, [2, 3]), (1, 2, [6])]}
    for _ in generate_images.generate_images(pickles['edm2'], outdir=str(tmp_path / 'one'), seeds=range(7), num_steps=4,
                                             device='cpu', verbose=False):
        pass
    for seed in range(7):
        name = f'{seed:06d}.png'
        assert np.array_equal(read_png(tmp_path / 'one' / name), read_png(tmp_path / 'two' / name)), name


def test_generate_images_api_accepts_sampler_functions(pickles):
    calls = []

    def my_sampler(net, noise, labels=None, gnet=None, randn_like=None, **kwargs):
        calls.append(kwargs)
        return torch.zeros_like(noise)

    batch = next(iter(generate_images.generate_images(pickles['edm2'], seeds=[0], sampler_fn=my_sampler, foo=1,
                                                      device='cpu', verbose=False)))
    assert calls == [dict(foo=1)] and batch.images.eq(128).all()  # zeros decode to mid-grey

#----------------------------------------------------------------------------
# example.py.

def test_example_grid_draws_from_the_global_seed_in_reference_order(pickles, tmp_path):
    dest = tmp_path / 'grid.png'
    example_grid.generate_image_grid(pickles['edm_cond'], str(dest), gridw=3, gridh=2, device='cpu', num_steps=4,
                                     S_churn=10, S_min=0.05, S_max=50, S_noise=1.003)
    # EDM example.py: manual_seed, all latents, then labels, then each step's churn noise from torch.randn_like.
    net = edm_net()
    torch.manual_seed(0)
    latents = torch.randn([6, 3, 4, 4])
    labels = torch.eye(4)[torch.randint(4, size=[6])]
    x = sampling.edm_sampler(net, latents, labels, randn_like=torch.randn_like, num_steps=4, S_churn=10, S_min=0.05,
                             S_max=50, S_noise=1.003)
    images = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = read_png(dest)
    assert grid.shape == (2 * 4, 3 * 4, 3)
    for i in range(6):  # Row-major: image i at row i // 3, column i % 3.
        row, col = divmod(i, 3)
        assert np.array_equal(grid[row * 4:(row + 1) * 4, col * 4:(col + 1) * 4], images[i]), i


def test_example_cli_writes_the_four_reference_grids_from_a_local_model_root(pickles, tmp_path):
    root = tmp_path / 'models'
    root.mkdir()
    for name, ex in example_grid.EXAMPLES.items():
        source = pickles['edm_cond'] if name in ('cifar10', 'imagenet') else pickles['edm_uncond']
        os.symlink(source, root / ex.network)
    code, output = invoke(example.main, '--model-root', root, '--outdir', tmp_path / 'out', '--models', 'cifar10,ffhq',
                          '--device', 'cpu')
    assert code == 0, output
    assert sorted(os.listdir(tmp_path / 'out')) == ['cifar10-32x32.png', 'ffhq-64x64.png']
    assert read_png(tmp_path / 'out/cifar10-32x32.png').shape == (32, 32, 3)  # 8x8 grid of 4x4 images
    assert [ex.sampler['num_steps'] for ex in example_grid.EXAMPLES.values()] == [18, 40, 40, 256]
    assert example_grid.EXAMPLES['imagenet'].sampler == dict(num_steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
    code, output = invoke(example.main, '--models', 'cifar100')
    assert code == 2 and 'cifar10, ffhq, afhqv2, imagenet' in output


def test_dockerfile_copies_the_entry_points():
    from tests.conftest import ROOT
    text = (ROOT / 'Dockerfile').read_text()
    assert 'COPY *.py ./' in text
    for script in ('example.py', 'generate_images.py', 'calculate_metrics.py', 'count_flops.py', 'train_edm2.py'):
        assert (ROOT / script).is_file()

#----------------------------------------------------------------------------
# count_flops.py.

def test_count_flops_prints_edm2_table(pickles, monkeypatch):
    code, output = invoke(count_flops.cli, 'edm2-img512-s')
    assert code == 0, output
    lines = output.splitlines()
    assert lines[1] == '' and lines[2].startswith('Parameters  280.21  M')
    assert lines[3].startswith('Compute     100.8') and lines[3].endswith('Gflops/sample')
    assert lines[4] == 'GPU memory  n/a     GB/sample' and lines[6] == 'Op                        Count  Gflops'
    table = [line.split() for line in lines[7:] if line.strip()]
    assert table[-1][0] == 'Total' and table[0][0] == 'aten::convolution'
    assert int(table[-1][1]) == sum(int(row[1]) for row in table[:-1])
    assert abs(float(table[-1][2]) - sum(float(row[2]) for row in table[:-1])) < 0.02
    # One multiply-add = one flop (EDM2 paper): half of the 201.6 GFLOP that training/flops.py counts
    # (tests/test_networks_flops.py), where the EDM2 paper lists 102 Gflops with its elementwise ops.
    assert round(float(lines[3].split()[1]) * 2, 1) == 201.6
    assert invoke(count_flops.cli, pickles['edm2'])[0] == 0
    monkeypatch.setenv('WORLD_SIZE', '2')
    code, output = invoke(count_flops.cli, pickles['edm2'])
    assert code == 1 and 'Distributed execution is not supported' in output

#----------------------------------------------------------------------------
# train_edm2.py.

def test_train_edm2_options_and_defaults_follow_the_reference():
    cfg = train_edm2.build_config('edm2-img512-xs', data='d.zip')
    assert cfg == presets.build_config('edm2-img512-xs', data='d.zip')
    assert (cfg.cond, cfg.fp16, cfg.loss_scaling, cfg.cudnn_benchmark, cfg.seed, cfg.batch_gpu) == (True, True, 1.0, True, 0, None)
    assert (cfg.status_nimg, cfg.snapshot_nimg, cfg.checkpoint_nimg) == (128 << 10, 8 << 20, 128 << 20)
    runner = CliRunner()
    result = runner.invoke(train_edm2.cmdline, ['--outdir', 'x', '--data', 'd.zip', '-n', '--duration', '2048Mi',
                                                '--batch', '1024', '--batch-gpu', '0', '--status', '1000', '--channels', 64,
                                                '--decay', '35000', '--P_mean', '-0.8', '--fp16', 'False'])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output[result.output.index('{'):result.output.rindex('}') + 1])
    # Counts are images, also a plain number (train.py reads a plain --duration as Mimg).
    assert (shown['total_nimg'], shown['batch_size'], shown['batch_gpu'], shown['status_nimg']) == (2048 << 20, 1024, None, 1000)
    assert (shown['model_channels'], shown['lr_decay_batches'], shown['P_mean'], shown['fp16']) == (64, 35000, -0.8, False)
    assert shown['preset'] == 'edm2-img512-s' and 'Dry run; exiting.' in result.output  # EDM2's default preset
    result = runner.invoke(train_edm2.cmdline, ['--outdir', 'x', '--data', 'd.zip', '--preset', 'edm-cifar10-32x32-cond-vp'])
    assert result.exit_code == 2 and 'edm2-img512-xs' in result.output


def test_train_edm2_trains_into_outdir_itself(tmp_path):
    data = tmp_path / 'data'
    data.mkdir()
    for i, image in enumerate(np.random.RandomState(0).randint(0, 256, [8, 4, 4, 3], dtype=np.uint8)):
        PIL.Image.fromarray(image).save(data / f'{i}.png')
    run = tmp_path / 'training-runs/00000-edm2-tiny'
    result = CliRunner().invoke(train_edm2.cmdline, ['--outdir', str(run), '--data', str(data), '--preset', 'tiny-edm2',
                                                     '--cond', 'False', '--duration', '16', '--batch', '8', '--status', '8',
                                                     '--snapshot', '16', '--checkpoint', '16', '--device', 'cpu'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    names = os.listdir(run)
    assert 'training-state-0000000.pt' in names and 'network-snapshot-0000000-0.050.pkl' in names
    assert os.listdir(run.parent) == [run.name]  # no numbered subfolder

#----------------------------------------------------------------------------
# calculate_metrics.py.

def test_calculate_metrics_prints_what_fid_py_prints(tmp_path, monkeypatch):
    images = tmp_path / 'images'
    images.mkdir()
    for i, image in enumerate(np.random.RandomState(1).randint(0, 256, [6, 8, 8, 3], dtype=np.uint8)):
        PIL.Image.fromarray(image).save(images / f'{i:06d}.png')
    dinov2 = tmp_path / 'tiny-dinov2.pth'
    torch.save(tiny_vit(seed=1).state_dict(), dinov2)
    monkeypatch.setenv('EDM_DINOV2_WEIGHTS', str(dinov2))
    ref = tmp_path / 'refs' / 'ref.pkl'
    code, output = invoke(calculate_metrics.cmdline, 'ref', '--data', images, '--dest', ref, '--metrics', 'fd_dinov2',
                          '--workers', 0)
    assert code == 0 and ref.is_file(), output
    code, output = invoke(calculate_metrics.cmdline, 'calc', '--images', images, '--ref', ref, '--num', 4, '--workers', 0)
    assert code == 0, output
    ours = re.findall(r'fd_dinov2 = \S+', output)
    code, output = invoke(fid.main, 'calc', '--images', images, '--ref', ref, '--num', 4, '--workers', 0)
    assert code == 0 and len(ours) == 1 and re.findall(r'fd_dinov2 = \S+', output) == ours, output
    code, output = invoke(calculate_metrics.cmdline, 'calc', '--images', images, '--ref', ref, '--num', 50, '--workers', 0)
    assert code == 1 and '--num=50' in output and 'Traceback' not in output


def test_edm2_metrics_api_chains_generate_images_as_gen_does(pickles, tmp_path, monkeypatch, capsys):
    from tests.test_readme_commands import TinyInception
    from training import metrics
    detector = tmp_path / 'tiny-inception.pt'
    torch.jit.save(torch.jit.script(TinyInception().eval()), str(detector))
    monkeypatch.setenv('EDM_FID_DETECTOR', str(detector))
    images = tmp_path / 'images'
    images.mkdir()
    for i, image in enumerate(np.random.RandomState(2).randint(0, 256, [6, 8, 8, 3], dtype=np.uint8)):
        PIL.Image.fromarray(image).save(images / f'{i}.png')
    ref = str(tmp_path / 'ref.pkl')
    metrics.ref(str(images), ref, metrics=['fid'], num_workers=0)

    image_iter = generate_images.generate_images(pickles['edm2'], seeds=range(6), num_steps=4, device='cpu', verbose=False)
    stats_iter = calculate_metrics.calculate_stats_for_iterable(image_iter, metrics=['fid'], device='cpu', verbose=False,
                                                                dest_path=str(tmp_path / 'gen.pkl'))
    results = list(stats_iter)
    assert len(results) == 1 and results[-1].stats['num_images'] == 6 and (tmp_path / 'gen.pkl').is_file()
    capsys.readouterr()
    values = calculate_metrics.calculate_metrics_from_stats(results[-1].stats, ref, metrics=['fid', 'fd_dinov2'])
    printed = capsys.readouterr().out
    assert 'No statistics computed for fd_dinov2 -- skipping.' in printed and f'fid = {values["fid"]:g}' in printed
    gen = metrics.gen(pickles['edm2'], ref, metrics=['fid'], num=6, seed=0, num_steps=4)
    assert values == {'fid': pytest.approx(gen[0]['fid'], rel=1e-9)}
