"""Power function EMA and post-hoc reconstruction: reference parity and reconstruction properties."""

import ast
import os

import numpy as np
import pytest
import torch

from tests.phema_tiny_net import PhemaTinyNet, write_run
from torch_utils import persistence
from training import phema

FN_CASES = ['exp_to_std', 'std_to_exp', 'power_function_response', 'power_function_correlation',
            'power_function_beta', 'solve_posthoc_coefficients']

#----------------------------------------------------------------------------
# Helpers.

def _decode(arg):
    """Spec calls store numpy arguments as {'np': nested list}."""
    return np.array(arg['np']) if isinstance(arg, dict) and set(arg) == {'np'} else arg


def _flat(net):
    return torch.cat([p.detach().float().flatten() for p in net.parameters()])


def _run_to_end(rec):
    """Drain a reconstruction; return the outputs of every batch."""
    outs = []
    for step in rec:
        outs += step.out
    return outs


def _spec_recon_cases(spec_dir):
    """{case name: (arguments, expected output file names)} from the '## phema.recon.*' lines."""
    cases = {}
    for line in (spec_dir / 'phema_files.txt').read_text().splitlines():
        if line.startswith('## phema.recon.'):
            head, names = line[len('## phema.recon.'):].split(' -> ')
            name, args = head.split(': ', 1)
            cases[name] = (ast.literal_eval(args), ast.literal_eval(names))
    return cases


@pytest.fixture(scope='module')
def spec_run(tmp_path_factory):
    """The run described in phema_files.txt: batch 256, a snapshot every 1024 img up to 5 kimg, stds 0.050/0.100."""
    run_dir = tmp_path_factory.mktemp('spec_run')
    write_run(run_dir, num_snapshots=5)
    return run_dir

#----------------------------------------------------------------------------
# Reference parity.

@pytest.mark.parametrize('fn_name', FN_CASES)
def test_profile_functions_match_reference(spec_dir, fn_name):
    case = torch.load(spec_dir / 'phema' / f'phema.fn.{fn_name}.pt', weights_only=False)
    fn = getattr(phema, fn_name)
    for call, expected in zip(case['case']['calls'], case['tensors']['out'], strict=True):
        args = [_decode(a) for a in call.get('args', [])]
        kwargs = {k: _decode(v) for k, v in call.get('kwargs', {}).items()}
        got = torch.as_tensor(np.asarray(fn(*args, **kwargs)))
        assert got.shape == expected.shape and got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_power_function_ema_matches_reference_walk(spec_dir):
    case = torch.load(spec_dir / 'phema' / 'ema.power.2stds.pt', weights_only=False)
    info, tensors = case['case'], case['tensors']

    class WalkNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.zeros([]))
            self.register_buffer('counter', torch.zeros([3]))
            self.lin1 = torch.nn.Linear(5, 4)
            self.lin2 = torch.nn.Linear(4, 2, bias=False)

    net = WalkNet()
    net.load_state_dict(tensors['init'])
    ema = phema.PowerFunctionEMA(net, **info['ctor_kwargs'])
    batch_size = info['batch_size']
    for step in range(1, len(tensors['deltas']['gain']) + 1):
        with torch.no_grad():
            for name, param in net.named_parameters():
                param += tensors['deltas'][name][step - 1]
            net.counter += 1
        ema.update(cur_nimg=step * batch_size, batch_size=batch_size)
        if str(step) in tensors['rec']:
            expected = tensors['rec'][str(step)]
            got = ema.get()
            assert [suffix for _net, suffix in got] == expected['suffixes']
            for (ema_net, _suffix), state in zip(got, expected['sds'], strict=True):
                for key, value in ema_net.state_dict().items():
                    torch.testing.assert_close(value, state[key], rtol=0, atol=1e-7)
    for ours, ref in zip(ema.state_dict()['emas'], tensors['final_state'], strict=True):
        for key in ref:
            torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=1e-7)


def test_list_input_pickles_matches_reference(spec_dir, tmp_path):
    lines = (spec_dir / 'phema_files.txt').read_text().splitlines()
    names = [line for line in lines if line.startswith('network-snapshot-')]
    listing_at = lines.index('## list_input_pickles(in_dir) ->')
    expected = [ast.literal_eval(line) for line in lines[listing_at + 1:] if line.startswith('[')]
    for name in names + ['notes.txt', 'training-state-0001024.pt']:
        (tmp_path / name).touch()
    got = [[os.path.basename(p.path), p.nimg, p.std] for p in phema.list_input_pickles(tmp_path)]
    assert got == expected


def test_reconstruction_file_names_match_reference(spec_dir, spec_run, tmp_path):
    cases = _spec_recon_cases(spec_dir)
    assert {'func', 'func_kimg3_batch2'} <= set(cases)
    in_pkls = phema.list_input_pickles(spec_run)
    for name in ['func', 'func_kimg3_batch2']:
        args, expected = cases[name]
        out_dir = tmp_path / name
        rec = phema.reconstruct_phema(in_pkls, out_dir=str(out_dir), verbose=False, **args)
        num_inputs = 2 * (rec.out_nimg // 1024) # Two stds per snapshot; the 0 kimg ones are left out.
        assert len(rec) == -(-len(args['out_std']) // args['max_batch_size']) * num_inputs
        assert len(_run_to_end(rec)) == len(expected)
        assert sorted(os.listdir(out_dir)) == expected

#----------------------------------------------------------------------------
# Trackers.

def test_traditional_ema_follows_halflife_and_rampup():
    net = torch.nn.Linear(3, 2)
    start = _flat(net).clone()
    ema = phema.TraditionalEMA(net, halflife_Mimg=0.001, rampup_ratio=None)
    with torch.no_grad():
        for param in net.parameters():
            param.fill_(1.0)
    for step in range(1, 11):
        ema.update(cur_nimg=step * 100, batch_size=100)
    expected = 1 + (start - 1) * 0.5 ** (1000 / 1000) # Ten batches of 100 img = one half-life of 1000 img.
    torch.testing.assert_close(_flat(ema.get()), expected)
    # With ramp-up, the half-life at 1000 img is 0.5 * 1000 img: one step of 500 img halves the gap.
    ramped = phema.TraditionalEMA(net, halflife_Mimg=1.0, rampup_ratio=0.5)
    ramped.ema.load_state_dict({k: torch.zeros_like(v) for k, v in net.state_dict().items()})
    ramped.update(cur_nimg=1000, batch_size=500)
    torch.testing.assert_close(_flat(ramped.get()), torch.full_like(start, 0.5))


def test_power_function_ema_resumes_exactly_from_state_dict():
    torch.manual_seed(1)
    steps = [torch.randn(p.shape) for p in PhemaTinyNet().parameters()]

    def train(ema, net, first, last):
        for i in range(first, last):
            with torch.no_grad():
                for param, delta in zip(net.parameters(), steps):
                    param += delta * (1 + i % 3)
            ema.update(cur_nimg=(i + 1) * 8, batch_size=8)

    torch.manual_seed(0)
    net_a = PhemaTinyNet()
    ema_a = phema.PowerFunctionEMA(net_a, stds=[0.05, 0.1, 0.2])
    train(ema_a, net_a, 0, 12)
    torch.manual_seed(0)
    net_b = PhemaTinyNet()
    ema_b = phema.PowerFunctionEMA(net_b, stds=[0.05, 0.1, 0.2])
    train(ema_b, net_b, 0, 6)
    state = ema_b.state_dict()
    net_c = PhemaTinyNet()
    net_c.load_state_dict(net_b.state_dict())
    ema_c = phema.PowerFunctionEMA(net_c, stds=[0.05, 0.1, 0.2])
    ema_c.load_state_dict(state)
    train(ema_c, net_c, 6, 12)
    for (a, suffix_a), (c, suffix_c) in zip(ema_a.get(), ema_c.get(), strict=True):
        assert suffix_a == suffix_c
        assert torch.equal(_flat(a), _flat(c))
    ema_c.reset()
    assert all(torch.equal(_flat(e), _flat(net_c)) for e, _ in ema_c.get())

#----------------------------------------------------------------------------
# Reconstruction.

def test_reconstructing_a_stored_profile_gives_it_back(spec_run):
    in_pkls = phema.list_input_pickles(spec_run)
    outs = _run_to_end(phema.reconstruct_phema(in_pkls, out_std=[0.05, 0.1], verbose=False))
    for out in outs:
        stored = persistence.load_pickle(spec_run / f'network-snapshot-0000005-{out.std:.3f}.pkl')
        assert out.net.lin1.weight.dtype == torch.float16 # Same precision as the inputs.
        torch.testing.assert_close(_flat(out.net), _flat(stored.ema), rtol=1e-3, atol=1e-3)
        assert torch.equal(out.net.counter, stored.ema.counter) # Buffers come from the latest input.
        assert out.pkl_data['dataset_kwargs'] == stored.dataset_kwargs


def test_unstored_profile_matches_directly_tracked_ema(tmp_path):
    direct = write_run(tmp_path, num_snapshots=16, track_stds=(0.075, 0.150))
    in_pkls = phema.list_input_pickles(tmp_path)
    outs = _run_to_end(phema.reconstruct_phema(in_pkls, out_std=[0.075, 0.150], max_batch_size=1, verbose=False))
    nearest = persistence.load_pickle(tmp_path / 'network-snapshot-0000016-0.100.pkl').ema
    for out in outs:
        target = _flat(direct[out.std])
        error = (_flat(out.net) - target).norm()
        baseline = (_flat(nearest) - target).norm() # What using the nearest stored profile would give.
        assert error < 0.05 * baseline, (out.std, error, baseline)


def test_reconstruction_does_not_depend_on_batching(spec_run):
    in_pkls = phema.list_input_pickles(spec_run)
    one_pass = _run_to_end(phema.reconstruct_phema(in_pkls, out_std=[0.03, 0.08, 0.15], verbose=False))
    rec = phema.reconstruct_phema(in_pkls, out_std=[0.03, 0.08, 0.15], max_batch_size=2, verbose=False)
    assert len(rec) == 2 * 10 # Two batches, each reading the 10 inputs once.
    three_passes = _run_to_end(rec)
    for a, b in zip(one_pass, three_passes, strict=True):
        assert a.std == b.std
        torch.testing.assert_close(_flat(a.net), _flat(b.net), rtol=0, atol=1e-3)


def test_reconstruction_rejects_bad_inputs(spec_run, tmp_path):
    in_pkls = phema.list_input_pickles(spec_run)
    with pytest.raises(ValueError, match='matches no input pickle'):
        phema.reconstruct_phema(in_pkls, out_std=0.1, out_nimg=10240, verbose=False)
    with pytest.raises(ValueError, match=r'\(0, 0.289\)'):
        phema.reconstruct_phema(in_pkls, out_std=0.3, verbose=False)
    with pytest.raises(ValueError, match='No input pickles found'):
        phema.reconstruct_phema([], out_std=0.1, verbose=False)
    with pytest.raises(ValueError, match='share training time and std'):
        phema.reconstruct_phema(in_pkls + in_pkls[-1:], out_std=0.1, verbose=False)
    with pytest.raises(ValueError, match='must be preceded by at least two floats'):
        phema.parse_std_list('0.01,...,0.05')
    assert np.allclose(phema.parse_std_list('0.010,0.015,...,0.250'), np.arange(10, 251, 5) / 1000)


def test_snapshot_index_overrides_names_only_where_consistent(tmp_path):
    for name in ('net-0000001-0.050.pkl', 'net-0000002-0.050.pkl', 'net-0000003-0.050.pkl'):
        (tmp_path / name).write_bytes(b'')
    phema.record_snapshots(tmp_path, ['net-0000001-0.050.pkl'], 1536)
    phema.record_snapshots(tmp_path, ['net-0000002-0.050.pkl', 'net-0000003-0.050.pkl'], 2560)
    # 2560 images do not match kimg 3 (a renamed file): the name wins there.
    assert [p.nimg for p in phema.list_input_pickles(tmp_path)] == [1536, 2560, 3072]
    (tmp_path / phema.SNAPSHOT_INDEX).write_text('{"net-0000001-0.050.pkl": "many"}')
    with pytest.raises(ValueError, match='unreadable snapshot index .* delete it'):
        phema.list_input_pickles(tmp_path)
    with pytest.warns(UserWarning, match='starting a new index'): # training keeps going
        phema.record_snapshots(tmp_path, ['net-0000003-0.050.pkl'], 3500)
    assert [p.nimg for p in phema.list_input_pickles(tmp_path)] == [1024, 2048, 3500]
