"""Tests for the 2D autoguidance toy example (training/toy.py, toy_example.py)."""

import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from torch_utils import persistence
from training import toy

#----------------------------------------------------------------------------
# Ground truth.

@pytest.mark.parametrize('classes,sigma,half_width', [('A', 0.05, 2.5), ('AB', 0.05, 2.5), ('B', 0.5, 5.0)])
def test_gt_density_integrates_to_one(classes, sigma, half_width):
    steps = 301
    axis = torch.linspace(-half_width, half_width, steps)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing='xy'), dim=-1)
    cell = float(axis[1] - axis[0]) ** 2
    total = float(toy.gt(classes).pdf(grid, sigma).sum()) * cell
    assert abs(total - 1) < 5e-3

def test_gt_score_is_gradient_of_log_density():
    target = toy.gt('A')
    gen = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.0, 0.003, 0.03, 0.3, 3.0]).repeat_interleave(40)
    x = target.sample(len(sigma), sigma, generator=gen)
    x[:20] += 0.05 * torch.randn(20, 2, generator=gen)    # also points off the data at sigma = 0
    x64 = x.double().requires_grad_(True)
    model64 = toy.GaussianMixture(target.phi.double().numpy(), target.mu.double().numpy(), target.Sigma.double().numpy()).double()
    grad = torch.autograd.grad(model64.logp(x64, sigma.double()).sum(), x64)[0]
    score = target.score(x, sigma).double()
    scale = grad.norm(dim=-1, keepdim=True) + 1
    assert ((score - grad) / scale).abs().max() < 1e-3

def test_gt_sample_moments_match_mixture():
    target = toy.gt('AB')
    sigma = 0.2
    x = target.sample(1 << 17, sigma, generator=torch.Generator().manual_seed(1)).double()
    phi, mu, Sigma = target.phi.double(), target.mu.double(), target.Sigma.double()
    mean = phi @ mu
    cov = (phi[:, None, None] * (Sigma + mu[:, :, None] * mu[:, None, :])).sum(0) - torch.outer(mean, mean) + sigma ** 2 * torch.eye(2)
    assert torch.allclose(x.mean(0), mean, atol=1e-2)
    assert torch.allclose(torch.cov(x.t()), cov, atol=1e-2)

def test_gt_layout_is_fixed():
    a, b = toy.gt('A'), toy.gt('B')
    assert len(a.phi) == len(b.phi) == toy.COMPS_PER_BRANCH * (2 ** toy.TREE_DEPTH - 1)
    assert len(toy.gt('AB').phi) == 2 * len(a.phi)
    assert (a.mu.mean(0) > 0).all() and (b.mu.mean(0) < 0).all()   # A grows up-right, B down-left
    with pytest.raises(ValueError, match='choose A, B or AB'):
        toy.gt('C')

#----------------------------------------------------------------------------
# Model, training, sampling.

def test_toy_model_state_dict_and_pickle_roundtrip(tmp_path):
    net = toy.ToyModel(num_layers=2, hidden_dim=8)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes == {'layers.0.weight': (8, 4), 'layers.2.weight': (8, 8), 'layers.4.weight': (8, 8), 'gain': ()}
    with torch.no_grad():
        net.gain.fill_(0.7)
    path = tmp_path / 'net.pkl'
    toy.save_snapshot(net, str(path))
    loaded = toy.load_model(str(path))
    assert type(loaded) is toy.ToyModel and loaded.init_kwargs == dict(num_layers=2, hidden_dim=8)
    x, sigma = torch.randn(16, 2), torch.rand(16) + 0.1
    assert torch.equal(loaded.logp(x, sigma), net.eval().logp(x, sigma))

def test_reference_style_pickle_loads_without_running_its_code(tmp_path, monkeypatch):
    net = toy.ToyModel(num_layers=1, hidden_dim=8)
    for cls in (toy.ToyModel, toy.MPLinear, toy.MPSiLU):   # as in reference pickles whose source we must not run
        monkeypatch.setattr(cls, '_orig_module_src', 'raise RuntimeError("embedded source was executed")')
    path = tmp_path / 'ref.pkl'
    persistence.save_pickle(net, path)
    assert b'embedded source was executed' in path.read_bytes()
    loaded = toy.load_model(str(path))
    x = torch.randn(8, 2)
    assert torch.equal(loaded.score(x, 0.5), net.eval().score(x, 0.5))

def test_tiny_training_lowers_loss():
    res = toy.do_train(hidden_dim=16, num_layers=2, batch_size=256, total_iter=80, viz_iter=None, progress=False)
    assert np.isfinite(res.loss).all()
    assert res.loss[-20:].mean() < 0.8 * res.loss[:20].mean()

def test_guiding_with_itself_equals_no_guidance():
    torch.manual_seed(0)
    net = toy.ToyModel(hidden_dim=8).eval()
    with torch.no_grad():
        net.gain.fill_(1.0)
    x_init = toy.initial_samples(64, 5, seed=1, device=torch.device('cpu'))
    plain = toy.do_sample(net, x_init, num_steps=8)
    assert torch.equal(toy.do_sample(net, x_init, guidance=3, gnet=net, num_steps=8), plain)
    assert plain.shape == (9, 64, 2) and torch.isfinite(plain).all()

def test_gt_sampler_stays_on_support():
    x_init = toy.initial_samples(512, 5, seed=1, device=torch.device('cpu'))
    samples = toy.do_sample(toy.gt('A'), x_init)[-1]
    stats = toy.sample_stats(samples, toy.support_threshold())
    assert stats.outside < 0.05

#----------------------------------------------------------------------------
# Command line.

def _run(args):
    import toy_example
    result = CliRunner().invoke(toy_example.cmdline, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output

def test_cli_train_plot_measure(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.setitem(toy.DEFAULT_MODELS, 'net', dict(classes='A', num_layers=1, hidden_dim=8, total_iter=3))
    out = _run(['train', '--outdir', str(tmp_path / 'run'), '--iters', '4', '--batch', '32', '--dim', '8', '--layers', '1',
        '--snap', '2', '--viz', 'false', '--device', 'cpu'])
    assert 'Done.' in out and sorted(os.listdir(tmp_path / 'run')) == ['iter0002.pkl', 'iter0004.pkl']
    gnet = str(tmp_path / 'run' / 'iter0002.pkl')
    out = _run(['plot', '--gnet', gnet, '--samples', '32', '--grid', '16', '--save', str(tmp_path / 'fig.png'),
        '--train-batch', '32', '--device', 'cpu'])
    assert 'training the default net model clsA-layers01-dim8' in out
    assert (tmp_path / 'fig.png').stat().st_size > 0
    assert (tmp_path / 'cache' / 'toy_example' / 'clsA-layers01-dim8' / 'iter0003.pkl').is_file()
    out = _run(['measure', '--gnet', gnet, '--ucond', gnet, '--samples', '32', '--device', 'cpu'])
    assert 'training' not in out   # the cached default is reused
    assert all(name in out for name in ['no guidance', 'classifier-free guidance', 'autoguidance'])

def test_cli_rejects_bad_input(tmp_path):
    import toy_example
    result = CliRunner().invoke(toy_example.cmdline, ['train', '--cls', 'C'])
    assert result.exit_code == 2 and "'C' is not one of" in result.output
    bad = tmp_path / 'bad.pkl'
    bad.write_bytes(b'not a pickle')
    result = CliRunner().invoke(toy_example.cmdline, ['measure', '--net', str(bad), '--device', 'cpu'])
    assert result.exit_code == 1 and 'Error' in result.output and 'Traceback' not in result.output
    persistence.save_pickle(dict(net=None), tmp_path / 'dict.pkl')
    result = CliRunner().invoke(toy_example.cmdline, ['measure', '--net', str(tmp_path / 'dict.pkl'), '--device', 'cpu'])
    assert result.exit_code == 1 and 'not a toy model' in result.output
