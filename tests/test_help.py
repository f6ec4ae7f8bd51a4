"""--help and option errors come back without importing torch (checked in a fresh interpreter, not timed);
train.py --help shows the default preset's values; the lists the help shows agree with the library's."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPTS = ['train.py', 'generate.py', 'fid.py', 'fid.py calc', 'dataset_tool.py', 'reconstruct_phema.py',
           'toy_example.py', 'toy_example.py train', 'quickstart.py']

PROBE = '''
import json, runpy, sys
sys.argv = {argv!r}
try:
    runpy.run_path({script!r}, run_name='__main__')
except SystemExit as exit:
    code = exit.code
print(json.dumps(dict(code=code, torch='torch' in sys.modules)))
'''


def run_script(*argv):
    """Run a script's main in a fresh interpreter; its exit code and whether torch got imported."""
    script = str(ROOT / argv[0])
    proc = subprocess.run([sys.executable, '-c', PROBE.format(argv=list(argv), script=script)], cwd=ROOT,
                          capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


@pytest.mark.parametrize('command', SCRIPTS)
def test_help_does_not_import_torch(command):
    result, output = run_script(*command.split(), '--help')
    assert result == dict(code=0, torch=False), output
    assert 'Usage:' in output


@pytest.mark.parametrize('argv,message', [
    (['train.py', '--lr=-1'], "Invalid value for '--lr'"),
    (['train.py', '--duration=2147483648', '-n'], 'over the 1e+12 limit'),
    (['generate.py', '--sampler=nope'], "Invalid value for '--sampler'"),
])
def test_option_errors_do_not_import_torch(argv, message):
    result, output = run_script(*argv)
    assert result['code'] != 0 and not result['torch'] and message in output, output


def test_train_help_shows_the_default_presets_values():
    from click.testing import CliRunner
    import train
    output = CliRunner().invoke(train.main, ['--help'], terminal_width=200).output
    for option, shown in [('--lr', '0.001'), ('--batch', '512'), ('--duration', '200'), ('--dropout', '0.13'),
                          ('--augment', '0.12'), ('--cres', '2,2,2'), ('--status', '50000'), ('--seed', '0')]:
        line = next(line for line in output.splitlines() if re.match(rf'\s+{option}[ ,]', line))
        assert f'[default: ({shown})' in line, line


def test_help_lists_agree_with_the_library():
    import fid
    from training import detectors, presets_generate, sampling
    assert presets_generate.SAMPLER_NAMES == tuple(sampling.SAMPLERS)
    import train
    from training import ddpm
    for name in ('BETA_SCHEDULES', 'MODEL_MEAN_TYPES', 'MODEL_VAR_TYPES', 'LOSS_TYPES'):
        assert getattr(train, name) == getattr(ddpm, name), name
    assert (fid.INCEPTION_ENV, fid.DINOV2_ENV, fid.VGG16_ENV) == (detectors.INCEPTION_ENV, detectors.DINOV2_ENV, detectors.VGG16_ENV)
    from training import metrics
    assert (fid.PR_DETECTORS, fid.PR_DTYPES) == (metrics.PR_DETECTORS, metrics.PR_DTYPES)
    assert fid.PR_DEFAULTS == dataclasses.asdict(metrics.PRConfig())


def test_dataset_tool_help_names_the_edm_form():
    result, output = run_script('dataset_tool.py', '--help')
    assert result['code'] == 0 and 'EDM form' in output and 'convert-edm' in output, output


def test_gitignore_covers_what_the_guides_write():
    import shutil
    assert shutil.which('git'), 'git is needed to check .gitignore'
    paths = ['datasets/mini-8x8/00000/img00000000.png', 'toy.png', 'bench/results/new-run.json', 'runs/tiny/log.txt',
             'quickstart-run/grid.png']
    proc = subprocess.run(['git', 'check-ignore', '--no-index', *paths], cwd=ROOT, capture_output=True, text=True)
    assert sorted(proc.stdout.split()) == sorted(paths), proc.stdout + proc.stderr
