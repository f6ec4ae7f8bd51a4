"""The STF fork's evaluation workflow: generate.py reads its training states (torch.save .pt and
pickle .pkl holding ema, net, optimizer_state, step) through the safe loader, reads our own
training states, and with --outdir=RUN and no --network samples every training state of the run
into RUN/ckpt_<kimg>/<seed//1000>/<seed>.png within --ckpt/--end_ckpt."""

import glob
import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generate
import train
from tests.test_train import write_dataset
from torch_utils import distributed as dist
from torch_utils import persistence
from training import sampling

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A tiny EDM run (8x8, 32 images) in RUN, plus the fork's two training-state formats at kimg 5 and 7."""
    root = tmp_path_factory.mktemp('stf')
    rng = np.random.default_rng(0)
    data = write_dataset(root / 'data', rng.integers(0, 256, [32, 8, 8, 3], dtype=np.uint8))
    handlers = dist.install_signal_handlers
    dist.install_signal_handlers = lambda: None
    try:
        result = CliRunner().invoke(train.main, ['--preset=tiny-edm', f'--data={data}', f'--outdir={root}', '--name=run',
                                                 '--batch=16', '--duration=0.000032', '--status=16'], catch_exceptions=False)
    finally:
        dist.install_signal_handlers = handlers
    assert result.exit_code == 0, result.output
    run = root / 'run'
    ema, _ = sampling.load_network(str(run / 'network-snapshot-000000.pkl'))
    state = dict(optimizer_state=torch.optim.Adam(ema.parameters()).state_dict(), step=5000, ema=ema, net=ema)
    # The fork's files embed module source; make it raise, so any code execution fails the test.
    saved = {cls: cls._orig_module_src for cls in persistence._decorators}
    for cls in saved:
        cls._orig_module_src = "raise RuntimeError('embedded module source was executed')"
    try:
        torch.save(state, run / 'training-state-000005.pt')
        with open(run / 'training-state-000007.pkl', 'wb') as f:
            pickle.dump(dict(state, step=7000), f)
    finally:
        for cls, src in saved.items():
            cls._orig_module_src = src
    return run


def _forward(net):
    x = torch.linspace(-1, 1, 3 * 8 * 8).reshape(1, 3, 8, 8)
    return net(x, torch.tensor([1.0]))


def test_fork_and_own_training_states_load_safely(run_dir):
    reference = _forward(sampling.load_network(str(run_dir / 'network-snapshot-000000.pkl'))[0])
    for name in ['training-state-000005.pt', 'training-state-000007.pkl', 'training-state-000000.pt']:
        net, encoder = sampling.load_network(str(run_dir / name))
        assert encoder is None and torch.equal(_forward(net), reference), name
    with pytest.raises(Exception, match='embedded module source was executed'):
        sampling.load_network(str(run_dir / 'training-state-000005.pt'), trust=True)  # only --trust-pickle runs it


def test_generate_samples_every_training_state_of_the_run(run_dir):
    args = [f'--outdir={run_dir}', '--seeds=0-1', '--steps=2', '--device=cpu']
    result = CliRunner().invoke(generate.main, args + ['--ckpt=1', '--end_ckpt=5'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(os.path.relpath(p, run_dir) for p in glob.glob(str(run_dir / 'ckpt_*' / '*' / '*.png'))) == \
        ['ckpt_000005/000000/000000.png', 'ckpt_000005/000000/000001.png']
    result = CliRunner().invoke(generate.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(run_dir / 'ckpt_000000' / '000000')) == ['000000.png', '000001.png']
    assert sorted(d for d in os.listdir(run_dir) if d.startswith('ckpt_')) == ['ckpt_000000', 'ckpt_000005', 'ckpt_000007']
    # Same network, same seeds: the fork's two formats give the same images.
    for seed in ('000000.png', '000001.png'):
        a, b = (np.asarray(__import__('PIL.Image').Image.open(run_dir / f'ckpt_00000{k}' / '000000' / seed)) for k in (5, 7))
        assert np.array_equal(a, b)
    result = CliRunner().invoke(generate.main, [f'--outdir={run_dir / "ckpt_000000"}', '--seeds=0-1'])
    assert result.exit_code != 0 and 'holds no training-state-*.pt' in result.output
