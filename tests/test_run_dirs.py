"""Run folders per reference: EDM's numbered folders (and rerun-to-resume of an unfinished one),
EDM2's --outdir, the STF fork's --name with --stf=0|1; tiny runs on random 8x8 images."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

import train
from tests.test_train import write_dataset
from torch_utils import distributed as dist

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


@pytest.fixture(scope='module')
def tiny8(tmp_path_factory):
    rng = np.random.default_rng(0)
    return write_dataset(tmp_path_factory.mktemp('tiny8') / 'tiny8', rng.integers(0, 256, [32, 8, 8, 3], dtype=np.uint8))


def run(*args):
    result = CliRunner().invoke(train.main, ['--batch=16', '--status=16', *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def folders(path):
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))


def test_edm_numbered_run_folders_and_rerun_resumes(tiny8, tmp_path, monkeypatch):
    monkeypatch.setattr(dist, 'install_signal_handlers', lambda: None)
    base = ['--preset=tiny-edm', f'--data={tiny8}', f'--outdir={tmp_path}']
    name = 'tiny8-uncond-ddpmpp-edm-gpus1-batch16-fp32'
    run(*base, '--duration=0.000016')
    assert folders(tmp_path) == [f'00000-{name}']
    # A longer --duration continues the unfinished run in its folder (rerun-to-resume) ...
    result = run(*base, '--duration=0.000032')
    assert folders(tmp_path) == [f'00000-{name}'] and 'Resuming from' in result.output
    assert os.path.isfile(tmp_path / f'00000-{name}' / 'training-state-000000.pt')
    # ... a finished one is left alone and a new numbered folder starts, as in EDM; so do other options.
    run(*base, '--duration=0.000032')
    run(*base, '--duration=0.000032', '--lr=0.005')
    assert folders(tmp_path) == [f'0000{i}-{name}' for i in range(3)]
    stored = [json.loads((tmp_path / f'0000{i}-{name}' / 'run_config.json').read_text())['lr'] for i in range(3)]
    assert stored == [0.002, 0.002, 0.005]
    # --nosubdir: --outdir itself is the run folder.
    run(*base, '--duration=0.000016', '--nosubdir')
    assert os.path.isfile(tmp_path / 'training-state-000000.pt') and len(folders(tmp_path)) == 3
    # An --outdir holding training states is a run folder: rerunning without --nosubdir continues it.
    result = run(*base, '--duration=0.000032')
    assert 'is itself a run folder' in result.output and 'Resuming from' in result.output and len(folders(tmp_path)) == 3


def test_edm2_outdir_is_the_run_folder(tiny8, tmp_path, monkeypatch):
    monkeypatch.setattr(dist, 'install_signal_handlers', lambda: None)
    run('--preset=tiny-edm2', f'--data={tiny8}', f'--outdir={tmp_path}', '--duration=16')  # EDM2 presets count a plain --duration in images
    assert os.path.isfile(tmp_path / 'training-state-0000000.pt') and folders(tmp_path) == []


def test_stf_fork_command_line(tiny8, tmp_path, monkeypatch):
    # Newbeeer/stf: --outdir=training-runs --name exp_name --cond=0 --arch=ncsnpp --stf=1 (--stf takes 0|1).
    monkeypatch.setattr(dist, 'install_signal_handlers', lambda: None)
    run('--preset=tiny-edm', f'--data={tiny8}', f'--outdir={tmp_path}', '--name', 'exp_name', '--cond=0',
        '--arch=ncsnpp', '--stf=1', '--rbatch', '24', '--duration=0.000016')
    assert folders(tmp_path) == ['exp_name']
    cfg = json.loads((tmp_path / 'exp_name' / 'run_config.json').read_text())
    assert (cfg['stf'], cfg['rbatch'], cfg['arch'], cfg['cond']) == (True, 24, 'ncsnpp', False)
    assert os.path.isfile(tmp_path / 'exp_name' / 'training-state-000000.pt')
    dry = lambda *args: json.loads(run('-n', *args).output.split('Training config:', 1)[1].rsplit('Dry run', 1)[0])
    assert (dry('--stf=1')['stf'], dry('--stf=1')['rbatch']) == (True, 4096)  # the fork's --rbatch default
    assert dry('--stf')['stf'] is True and dry('--stf=0')['stf'] is False and dry('--stf', '--no-stf')['stf'] is False
