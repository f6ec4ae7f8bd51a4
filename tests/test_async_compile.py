"""train.py --compile-async (training/async_compile.py): train eagerly while a child process compiles, then switch."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import train
from training import async_compile, presets, speed
from training import training_loop as tl
from tests.test_train import cifar_mini, train as run_training, write_dataset


@pytest.fixture
def tiny_data(tmp_path):
    images, labels = cifar_mini()
    small = images[:32].reshape(32, 8, 4, 8, 4, 3).mean(axis=(2, 4)).astype(np.uint8)
    return write_dataset(tmp_path / 'data', small, labels[:32])


@pytest.fixture
def waiting_poll(monkeypatch):
    """poll() waits for the child, so the run switches after its second step whatever the machine's speed."""
    poll = async_compile.AsyncCompile.poll
    monkeypatch.setattr(async_compile.AsyncCompile, 'poll', lambda self: self.process.wait() is None or poll(self))


def _log(run_dir) -> str:
    return (run_dir / 'log.txt').read_text()


def test_the_run_compiles_from_the_cache_the_child_filled(tmp_path, tiny_data, waiting_poll, monkeypatch):
    """The first status line comes from an eager step; after the child, the run's own compile is a cache hit."""
    if speed.compiler_missing('cpu'):
        pytest.skip(f'inductor needs a C++ compiler here: {speed.compiler_missing("cpu")}')
    from torch._dynamo.utils import counters
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path / 'inductor'))
    torch._dynamo.reset()
    counters.clear()
    result = run_training(tmp_path / 'run', 'tiny-edm', data=tiny_data, total_nimg=48, batch_size=16, status_nimg=16,
                          snapshot_nimg=None, compile=True, compile_async=True)
    assert result.cur_nimg == 48
    log = _log(tmp_path / 'run')
    started, switched = log.index('Compiling the network in a background process'), log.index('switching to the compiled')
    assert started < log.index('Status:') < switched  # the first status line did not wait for the compile
    assert counters['aot_autograd'].get('autograd_cache_hit') == 1, dict(counters['aot_autograd'])
    assert counters['inductor'].get('fxgraph_cache_hit') == 2, dict(counters['inductor'])  # forward and backward


def test_a_failed_child_leaves_the_compile_to_the_run(tmp_path, tiny_data, waiting_poll, monkeypatch):
    monkeypatch.setattr(speed, 'DEFAULT_BACKEND', 'aot_eager')
    monkeypatch.setattr(speed, 'compiler_missing', lambda device_type: None)
    make_job = async_compile.make_job
    monkeypatch.setattr(async_compile, 'make_job', lambda *a: dict(make_job(*a), backend='no-such-backend'))
    compiled = []
    compile_for_training = tl.compile_for_training
    monkeypatch.setattr(tl, 'compile_for_training', lambda net, device: compiled.append(net) or compile_for_training(net, device))
    result = run_training(tmp_path / 'run', 'tiny-edm', data=tiny_data, total_nimg=48, batch_size=16, status_nimg=16,
                          snapshot_nimg=None, compile=True, compile_async=True)
    assert result.cur_nimg == 48 and len(compiled) == 1
    warning = next(line for line in _log(tmp_path / 'run').splitlines() if line.startswith('--compile-async:'))
    assert 'exited with code 1' in warning and 'no-such-backend' in warning and warning.endswith('compiling in this process instead')


def _ctx(world=1, **overrides):
    cfg = presets.build_config('tiny-edm', **overrides)
    return dnnlib.EasyDict(cfg=cfg, world=world)


def test_compile_async_needs_compile_and_one_process(caplog):
    assert tl._compiles_async(_ctx(compile=True, compile_async=True))
    assert not tl._compiles_async(_ctx(compile=True))
    assert not tl._compiles_async(_ctx(compile=True, compile_async=True, first_step=True))
    with caplog.at_level('WARNING', logger='edm.training'):
        assert not tl._compiles_async(_ctx(world=2, compile=True, compile_async=True))
        assert not tl._compiles_async(_ctx(compile_async=True))
    assert 'one process' in caplog.text and 'does nothing without --compile' in caplog.text


def test_the_child_starts_only_with_room_beside_the_run(monkeypatch):
    cuda = torch.device('cuda')
    monkeypatch.setattr(torch.cuda, 'max_memory_reserved', lambda device: 30 << 30)
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device: (20 << 30, 141 << 30))
    assert async_compile.room_for_child(cuda) == ('20.0 GB of GPU memory free, a compile process beside this run '
                                                  'needs about 32.0 GB')
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device: (100 << 30, 141 << 30))
    assert async_compile.room_for_child(cuda) is None
    assert async_compile.room_for_child(torch.device('cpu')) is None


def test_train_py_takes_compile_async(tmp_path, tiny_data):
    result = CliRunner().invoke(train.main, ['--preset=tiny-edm', f'--data={tiny_data}', f'--outdir={tmp_path / "runs"}',
                                             '--fast', '--compile-async=1', '-n'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.output.split('Training config:', 1)[1].rsplit('Dry run', 1)[0])
    assert cfg['compile_async'] is True and cfg['compile'] is True
