"""reconstruct_phema.py on a tiny training run: reference file names, outputs, plot and bad input."""

import ast
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

import reconstruct_phema
from tests.phema_tiny_net import write_run
from torch_utils import persistence
from training import phema


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """Snapshots as in phema_files.txt (kimg 0..5, stds 0.050/0.100) plus files that are not snapshots."""
    path = tmp_path_factory.mktemp('run')
    write_run(path, num_snapshots=5)
    (path / 'training-state-0005120.pt').write_bytes(b'')
    (path / 'log.txt').write_text('')
    return path


def _invoke(*args):
    result = CliRunner().invoke(reconstruct_phema.cmdline, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def _assert_one_line_error(result, message, exit_code=1):
    assert result.exit_code == exit_code, result.output
    assert 'Traceback' not in result.output
    assert message in result.output.strip().splitlines()[-1], result.output


def _cli_cases(spec_dir):
    for line in (spec_dir / 'phema_files.txt').read_text().splitlines():
        if line.startswith('## phema.recon.cli'):
            head, names = line[len('## phema.recon.'):].split(' -> ')
            name, args = head.split(': ', 1)
            yield name, ast.literal_eval(args), ast.literal_eval(names)


def test_cli_writes_reference_file_names(spec_dir, run_dir, tmp_path):
    cases = list(_cli_cases(spec_dir))
    assert len(cases) == 3
    for name, args, expected in cases:
        out_dir = tmp_path / name
        result = _invoke('--indir', run_dir, '--outdir', out_dir, *args)
        assert result.exit_code == 0, result.output
        assert sorted(os.listdir(out_dir)) == expected


def test_cli_output_is_the_library_reconstruction(run_dir, tmp_path):
    result = _invoke('--indir', run_dir, '--outdir', tmp_path, '--outstd=0.080,0.150', '--outkimg=4',
        '--batch=1', '--plot', tmp_path / 'profiles.png')
    assert result.exit_code == 0, result.output
    assert (tmp_path / 'profiles.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    in_pkls = phema.list_input_pickles(run_dir)
    outs = [step.out for step in phema.reconstruct_phema(in_pkls, [0.08, 0.15], out_nimg=4096, verbose=False) if step.out]
    for out in outs[0]:
        saved = persistence.load_pickle(tmp_path / f'phema-0000004-{out.std:.3f}.pkl')
        assert set(saved) == {'encoder', 'dataset_kwargs', 'loss_fn', 'ema'}
        for a, b in zip(saved.ema.state_dict().values(), out.net.state_dict().values(), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_cli_outputs_in_the_input_folder_are_not_inputs(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    result = _invoke('--indir', tmp_path, '--outdir', tmp_path, '--outstd=0.080', '--outkimg=4')
    assert result.exit_code == 0 and 'Loading 8 input pickles' in result.output, result.output
    mtime = os.path.getmtime(tmp_path / 'phema-0000004-0.080.pkl')
    result = _invoke('--indir', tmp_path, '--outdir', tmp_path, '--outstd=0.080,0.090', '--outkimg=4', '--skip')
    assert result.exit_code == 0 and 'Loading 8 input pickles' in result.output, result.output
    assert 'Reconstructing 1 output pickles' in result.output
    assert os.path.getmtime(tmp_path / 'phema-0000004-0.080.pkl') == mtime
    assert (tmp_path / 'phema-0000004-0.090.pkl').is_file()


def test_cli_trust_pickle_runs_embedded_code(run_dir, tmp_path):
    result = _invoke('--indir', run_dir, '--outdir', tmp_path, '--outstd=0.100', '--trust-pickle')
    assert result.exit_code == 0, result.output
    trusted = persistence.load_pickle(tmp_path / 'phema-0000005-0.100.pkl').ema
    stored = persistence.load_pickle(run_dir / 'network-snapshot-0000005-0.100.pkl').ema
    torch.testing.assert_close(trusted.lin1.weight.float(), stored.lin1.weight.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize('outstd', ['0.3', '0', '0.01,...,0.05', 'abc'])
def test_cli_rejects_bad_outstd(run_dir, tmp_path, outstd):
    result = _invoke('--indir', run_dir, '--outdir', tmp_path / 'out', f'--outstd={outstd}')
    _assert_one_line_error(result, "Invalid value for '--outstd'", exit_code=2)
    assert not (tmp_path / 'out').exists()


def test_cli_rejects_missing_or_mismatched_inputs(run_dir, tmp_path):
    (tmp_path / 'empty').mkdir()
    result = _invoke('--indir', tmp_path / 'empty', '--outdir', tmp_path / 'out', '--outstd=0.1')
    _assert_one_line_error(result, 'No input snapshots found in --indir=')
    result = _invoke('--indir', tmp_path / 'nowhere', '--outdir', tmp_path / 'out', '--outstd=0.1')
    _assert_one_line_error(result, 'Input directory does not exist')
    result = _invoke('--indir', run_dir, '--outdir', tmp_path / 'out', '--outstd=0.1', '--outkimg=7')
    _assert_one_line_error(result, 'Reconstruction time 7 kimg matches no input pickle')
    assert not (tmp_path / 'out').exists()


def test_cli_rejects_mixed_architectures(tmp_path):
    write_run(tmp_path / 'run', num_snapshots=2)
    write_run(tmp_path / 'run', num_snapshots=2, stds=(0.150,), hidden=6)
    result = _invoke('--indir', tmp_path / 'run', '--outdir', tmp_path / 'out', '--outstd=0.08,0.12', '--batch=1')
    _assert_one_line_error(result, 'has a different network architecture than')
    assert not (tmp_path / 'out').exists() or os.listdir(tmp_path / 'out') == []


def test_cli_rejects_unreadable_pickle(tmp_path):
    write_run(tmp_path / 'run', num_snapshots=3)
    (tmp_path / 'run' / 'network-snapshot-0000002-0.050.pkl').write_bytes(b'this is not a pickle')
    result = _invoke('--indir', tmp_path / 'run', '--outdir', tmp_path / 'out', '--outstd=0.08')
    _assert_one_line_error(result, 'network-snapshot-0000002-0.050.pkl')
    assert 'not a readable network pickle' in result.output
    assert not (tmp_path / 'out').exists() or os.listdir(tmp_path / 'out') == []


def test_cli_reads_and_writes_reference_edm2_snapshots(spec_dir, tmp_path):
    # Two copies of one reference snapshot: any reconstruction is an affine combination of equal nets.
    for std in ['0.050', '0.100']:
        shutil.copy(spec_dir / 'pickles' / 'edm2-snapshot.pkl', tmp_path / f'network-snapshot-0001024-{std}.pkl')
    result = _invoke('--indir', tmp_path, '--outdir', tmp_path / 'out', '--outstd=0.070')
    assert result.exit_code == 0, result.output
    ours = persistence.load_pickle(tmp_path / 'out' / 'phema-0001024-0.070.pkl')
    ref = persistence.load_pickle(spec_dir / 'pickles' / 'edm2-snapshot.pkl')
    assert set(ours) == set(ref) and type(ours.ema) is type(ref.ema)
    ours_state, ref_state = ours.ema.state_dict(), ref.ema.state_dict()
    assert list(ours_state) == list(ref_state)
    for key, value in ref_state.items():
        assert ours_state[key].dtype == value.dtype # float16, as EDM2 stores snapshots.
        torch.testing.assert_close(ours_state[key].float(), value.float(), rtol=1e-3, atol=1e-3)
