"""torch_utils: sampler resume, device choice, training stats, and a real 2-process gloo run."""

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port
from torch_utils import distributed, misc, training_stats


@pytest.mark.parametrize('window_size', [0.5, None])
def test_infinite_sampler_resume_equality(window_size):
    data = range(17)
    full = misc.InfiniteSampler(data, seed=3, window_size=window_size)
    it = iter(full)
    first = [next(it) for _ in range(60)]
    resumed = iter(misc.InfiniteSampler(data, seed=3, window_size=window_size, start_idx=25))
    assert [next(resumed) for _ in range(35)] == first[25:]
    again = iter(misc.InfiniteSampler(data, seed=3, window_size=window_size))
    assert [next(again) for _ in range(60)] == first
    assert sorted(first[:17]) == list(range(17)) or window_size is not None


def test_infinite_sampler_splits_ranks():
    data = range(10)
    whole = iter(misc.InfiniteSampler(data, seed=1, window_size=None))
    seq = [next(whole) for _ in range(20)]
    parts = [iter(misc.InfiniteSampler(data, seed=1, window_size=None, rank=r, num_replicas=2)) for r in range(2)]
    assert [next(parts[0]) for _ in range(10)] == seq[0::2]
    assert [next(parts[1]) for _ in range(10)] == seq[1::2]


def test_choose_device():
    assert misc.choose_device('cpu') == torch.device('cpu')
    assert misc.choose_device('auto').type in ('cpu', 'cuda', 'mps')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='--device=cuda.*--device=cpu'):
            misc.choose_device('cuda')
    with pytest.raises(ValueError, match='choose auto'):
        misc.choose_device('tpu')


def test_device_for_rank_gives_cuda_an_index(monkeypatch):
    # torch.cuda.set_device() refuses a bare 'cuda'; every rank needs its own index, already
    # before init() (the world size then comes from torchrun's environment).
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    assert distributed.device_for_rank(torch.device('cuda')) == torch.device('cuda', 0)
    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setenv('LOCAL_RANK', '3')
    assert distributed.device_for_rank(torch.device('cuda')) == torch.device('cuda', 3)
    assert distributed.device_for_rank(torch.device('cuda', 1)) == torch.device('cuda', 1)
    assert distributed.device_for_rank(torch.device('cpu')) == torch.device('cpu')


def test_copy_params_and_buffers_and_constant():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    misc.copy_params_and_buffers(a, b, require_all=True)
    assert torch.equal(a.weight, b.weight)
    with pytest.raises(ValueError, match='shape'):
        misc.copy_params_and_buffers(torch.nn.Linear(3, 4), b)
    c = misc.constant([1, 2], dtype=torch.float32)
    assert c is misc.constant([1, 2], dtype=torch.float32)
    with pytest.raises(AssertionError):
        misc.assert_shape(torch.zeros(2, 3), [2, 4])


def test_training_stats_single_process():
    collector = training_stats.Collector(regex='Test/.*')
    training_stats.report('Test/a', torch.tensor([1.0, 2.0, 3.0]))
    training_stats.report('Test/a', 4.0)
    collector.update()
    assert collector.num('Test/a') == 4
    assert collector.mean('Test/a') == pytest.approx(2.5)
    assert collector.std('Test/a') == pytest.approx(np.std([1, 2, 3, 4]))
    collector.update()
    assert collector.num('Test/a') == 4  # keep_previous: no new data keeps the last interval
    fresh = training_stats.Collector(regex='Test/.*', keep_previous=False)
    training_stats.report('Test/a', 5.0)
    fresh.update()
    assert fresh.num('Test/a') == 1 and fresh.mean('Test/a') == 5.0
    fresh.update()
    assert fresh.num('Test/a') == 0


def _worker(rank, world_size, port, results):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    distributed.init(torch.device('cpu'))
    assert distributed.get_rank() == rank and distributed.get_world_size() == world_size
    collector = training_stats.Collector(regex='Loss/.*')
    training_stats.report('Loss/loss', torch.full([2], float(rank + 1)))
    training_stats.report0('Loss/only0', 7.0)
    collector.update()
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 3)
    misc.check_ddp_consistency(net)
    consistent = True
    with torch.no_grad():
        net.weight[0, 0] += rank
    try:
        misc.check_ddp_consistency(net)
    except AssertionError:
        consistent = False
    results[rank] = (collector.num('Loss/loss'), collector.mean('Loss/loss'), collector.num('Loss/only0'), consistent,
                     distributed.all_reduce_any(rank == 1))
    distributed.shutdown()


def test_two_process_gloo_reduces_stats_and_checks_consistency():
    port = free_port()
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, port, results), nprocs=2, join=True)
    for rank in range(2):
        num, mean, num0, consistent, any_flag = results[rank]
        assert num == 4 and mean == pytest.approx(1.5)
        assert num0 == 1
        assert consistent is (rank == 0)  # rank 1 changed a weight: detected on rank 1
        assert any_flag is True
