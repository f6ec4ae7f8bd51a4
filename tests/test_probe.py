"""Linear-probe accuracy (training/probe.py, fid.py probe): the reference's noise levels, a classifier that
lands at chance on random features and near 100% on separable ones, the CLI on tiny data, any of our
denoisers, 2-process gloo, and one-line errors for bad input."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from tests.conftest import free_port
from torch_utils import persistence
from training import networks, networks_cifar_edm2, networks_edm2, probe
from training.dataset import ImageFolderDataset

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py

# linear_probe.md of the reference facts: reversed(sample_schedule(18))[t], float32 roots as stored there.
REFERENCE_SIGMAS = {0: 0.0, 1: 0.0019999995639802702, 2: 0.0075280190583087141, 3: 0.022934517200790584,
                    4: 0.059947311251500518, 5: 0.13951647430363079, 6: 0.29644230568004892, 7: 0.58534818011625134}


def test_reference_noise_levels():
    for t, sigma in REFERENCE_SIGMAS.items():
        assert probe.reference_sigma(t) == pytest.approx(sigma, rel=1e-12, abs=0)
    assert probe.reference_sigma(18) == pytest.approx(80, rel=1e-6)
    assert (probe.default_t(32), probe.default_t(64)) == (4, 5)
    with pytest.raises(ValueError, match='--t=19'):
        probe.reference_sigma(19)

#----------------------------------------------------------------------------
# The classifier on synthetic features.

def fit_on_features(train_x, train_y, test_x, test_y, num_classes, epochs=15, batch=128):
    """fit_classifiers + evaluate_classifiers where the 'images' are the features themselves."""
    features = lambda images, t: {'out_1': images}  # noqa: E731
    keys = [(4, 'out_1')]
    heads = probe.make_heads({keys[0]: train_x.shape[1]}, num_classes, seed=0, device=torch.device('cpu'))
    order = torch.Generator().manual_seed(1)

    def batches(epoch):
        perm = torch.randperm(len(train_x), generator=order)
        return [(train_x[i], train_y[i]) for i in perm.split(batch)]
    probe.fit_classifiers(heads, batches, features, keys, epochs=epochs, lr=1e-3)
    test = [(x, y) for x, y in zip(test_x.split(batch), test_y.split(batch))]
    correct, seen = probe.evaluate_classifiers(heads, test, features, keys)[keys[0]]
    return 100 * correct / seen


def test_random_features_land_near_chance():
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn([1000, 32], generator=gen), torch.randn([2000, 32], generator=gen)
    train_y, test_y = torch.randint(0, 10, [1000], generator=gen), torch.randint(0, 10, [2000], generator=gen)
    acc = fit_on_features(train_x, train_y, test_x, test_y, num_classes=10)
    assert 10 - 4 * 0.67 < acc < 10 + 4 * 0.67  # chance 10 % +- 4 sigma of 2000 Bernoulli(0.1) draws


def test_separable_features_land_near_100_percent():
    gen = torch.Generator().manual_seed(0)
    means = 10 * torch.eye(10, 32)  # margins a probe at the reference lr (1e-3, 360 steps) can reach
    train_y, test_y = torch.randint(0, 10, [3000], generator=gen), torch.randint(0, 10, [1000], generator=gen)
    train_x = means[train_y] + 0.3 * torch.randn([3000, 32], generator=gen)
    test_x = means[test_y] + 0.3 * torch.randn([1000, 32], generator=gen)
    assert fit_on_features(train_x, train_y, test_x, test_y, num_classes=10) > 99


def test_rank_split_pads_by_repetition_and_marks_padding():
    parts = [probe.rank_indices(10, rank, 4, shuffle_seed=3) for rank in range(4)]
    assert all(len(idx) == 3 for idx, _ in parts)
    real = np.concatenate([idx[valid] for idx, valid in parts])
    assert sorted(real.tolist()) == list(range(10)) and sum((~valid).sum() for _, valid in parts) == 2

#----------------------------------------------------------------------------
# Tiny data and networks.

def write_split(folder, num, labels_of=lambda i: i % 2, with_labels=True, seed=0):
    """8x8 PNGs whose brightness tells the class apart, plus dataset.json (dataset_tool.py layout)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    labels = []
    for i in range(num):
        label = labels_of(i)
        image = rng.integers(0, 64, [8, 8, 3]) + 160 * (label % 2)
        PIL.Image.fromarray(image.astype(np.uint8)).save(os.path.join(folder, f'{i:04d}.png'))
        labels.append([f'{i:04d}.png', label])
    if with_labels:
        with open(os.path.join(folder, 'dataset.json'), 'w') as f:
            json.dump(dict(labels=labels), f)
    return str(folder)


def tiny_fx(config='E'):
    torch.manual_seed(0)
    return networks_cifar_edm2.CifarPrecond(img_resolution=8, img_channels=3, config=config, n_channels=32,
                                            ch_mults=[1, 1], is_attn=[False, True], dropout=0, n_blocks=2)


@pytest.fixture(scope='module')
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp('probe')
    persistence.save_pickle(dict(ema=tiny_fx()), root / 'net.pkl')
    return dict(net=str(root / 'net.pkl'), train=write_split(root / 'train', 48), test=write_split(root / 'test', 20, seed=1),
                root=root)


def run_cli(*args):
    import fid  # here, not at the top: the 2-process test's workers import this module and need no CLI
    return CliRunner().invoke(fid.main, ['probe', *map(str, args)])


def test_cli_probe_writes_one_json_line(splits):
    metrics_file = splits['root'] / 'metrics.jsonl'
    result = run_cli('--net', splits['net'], '--data', splits['train'], '--test-data', splits['test'], '--block=out_4',
                     '--epochs=2', '--batch=16', '--workers=0', '--device=cpu', '--metrics-file', metrics_file)
    assert result.exit_code == 0, result.output
    record = json.loads(metrics_file.read_text().splitlines()[-1])
    assert record['metric'] == 'probe_acc' and 0 <= record['value'] <= 100 and f'probe_acc = {record["value"]:g}' in result.output
    assert (record['t'], record['block'], record['num_test']) == (4, 'out_4', 20)
    assert record['sigma'] == pytest.approx(REFERENCE_SIGMAS[4], rel=1e-12)


def test_cli_probe_grid_covers_every_level_and_block(splits):
    result = run_cli('--net', splits['net'], '--data', splits['train'], '--test-data', splits['test'], '--grid',
                     '--epochs=1', '--batch=24', '--workers=0', '--device=cpu')
    assert result.exit_code == 0, result.output
    for t in (3, 4, 5):
        for k in range(1, 6):  # 2 blocks at 4x4, the up-sampling block, 2 blocks at 8x8
            assert f't={t},out_{k}:' in result.output
    assert 'out_6' not in result.output


def test_probe_separates_a_trivially_separable_dataset(splits):
    # Brightness decides the class: the pooled features of any reasonable net separate it.
    net = tiny_fx('C')
    train = ImageFolderDataset(splits['train'], use_labels=True)
    test = ImageFolderDataset(splits['test'], use_labels=True)
    cfg = probe.ProbeConfig(block='out_5', epochs=15, batch_size=8, lr=1e-2, workers=0)
    result = probe.run_probe(net, train, test, cfg, torch.device('cpu'))
    assert result['probe_acc'] == 100.0


@pytest.mark.parametrize('kind', ['edm-ddpmpp', 'edm-adm', 'edm2'])
def test_probe_reads_our_edm_and_edm2_networks(kind):
    torch.manual_seed(0)
    common = dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                  attn_resolutions=[4])
    if kind == 'edm2':
        net = networks_edm2.Precond(channels_per_head=8, logvar_channels=8, **common)
    else:
        model = dict(model_type='SongUNet') if kind == 'edm-ddpmpp' else dict(model_type='DhariwalUNet')
        net = networks.EDMPrecond(**model, **common)
    # Per level from the bottom: num_blocks + 1 skip-joining blocks, an up-sampling block between levels.
    assert len(probe.decoder_blocks(net)) == 5
    feats = probe.make_feature_fn(net.eval(), {4: probe.reference_sigma(4)})(torch.rand([2, 3, 8, 8]), 4)
    assert list(feats) == [f'out_{k}' for k in range(1, 6)]
    assert all(v.dtype == torch.float32 and v.ndim == 2 and v.shape[0] == 2 and v.isfinite().all() for v in feats.values())

#----------------------------------------------------------------------------
# Bad input: one line, exit code 1.

def test_cli_errors_are_one_line(splits):
    root = splits['root']
    unlabelled = write_split(root / 'unlabelled', 4, with_labels=False)
    three = write_split(root / 'three', 6, labels_of=lambda i: i % 3)
    base = ['--net', splits['net'], '--data', splits['train'], '--workers=0', '--device=cpu', '--epochs=1']
    cases = [
        (['--test-data', unlabelled], f'--test-data={unlabelled} has no class labels'),
        (['--test-data', three], f'--test-data={three} has 3 classes but --data={splits["train"]} has 2'),
        (['--test-data', splits['test']], '--block=out_6 is not a decoder block of this network; it has out_1, out_2'),
    ]
    for extra, message in cases:
        result = run_cli(*base, *extra)
        assert result.exit_code == 1 and message in result.output, result.output
        assert result.output.strip().count('\n') == 0, result.output
    torch.save({}, root / 'model_1999.pth')
    result = run_cli('--net', root / 'model_1999.pth', '--data', splits['train'], '--test-data', splits['test'])
    assert result.exit_code == 1 and '--reference-config' in result.output


def test_label_count_must_match_a_conditional_network(splits):
    net = networks_edm2.Precond(img_resolution=8, img_channels=3, label_dim=10, model_channels=16, channel_mult=[1],
                                num_blocks=1, attn_resolutions=[], logvar_channels=8)
    data = ImageFolderDataset(splits['train'], use_labels=True)
    with pytest.raises(ValueError, match='--test-data=t has 2 classes but --net is conditional on 10'):
        probe.check_labels(data, data, net, 'd', 't')

#----------------------------------------------------------------------------
# torchrun: 2 gloo processes.

def _worker(rank, port, net, train_dir, test_dir, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group('gloo', rank=rank, world_size=2)
    try:
        train = ImageFolderDataset(train_dir, use_labels=True)
        test = ImageFolderDataset(test_dir, use_labels=True)
        cfg = probe.ProbeConfig(block='out_4', epochs=2, batch_size=8, workers=0)
        result = probe.run_probe(net, train, test, cfg, torch.device('cpu'))
        # Different batches per rank, gradients averaged: the classifiers stay identical.
        heads = probe.make_heads({(4, 'out_1'): 8}, 3, seed=0, device=torch.device('cpu'))
        gen = torch.Generator().manual_seed(rank)
        batches = lambda epoch: [(torch.randn([4, 8], generator=gen), torch.tensor([0, 1, 2, rank]))]  # noqa: E731
        probe.fit_classifiers(heads, batches, lambda x, t: {'out_1': x}, [(4, 'out_1')], epochs=3, lr=0.1)
        torch.save(dict(result=result, head=heads['t4_out_1'].weight.detach()), os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_agree_and_score_every_test_image_once(splits, tmp_path):
    test_dir = write_split(tmp_path / 'test_odd', 7, seed=2)  # 7 images on 2 ranks: one padded repeat
    mp.spawn(_worker, args=(free_port(), tiny_fx(), splits['train'], test_dir, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=False) for r in range(2))
    assert r0['result'] == r1['result'] and r0['result']['num_test'] == 7
    assert torch.equal(r0['head'], r1['head'])
    assert not torch.equal(r0['head'], probe.make_heads({(4, 'out_1'): 8}, 3, seed=0, device=torch.device('cpu'))['t4_out_1'].weight)
