"""Every fenced block marked ```bash runnable in README.md and docs/*.md runs as written, in order, in a fresh
folder that holds the repository's files (so a guide cannot rot). Blocks of later guides may use what earlier
ones made (training.md makes runs/tiny, which sampling.md samples).

`python SCRIPT.py ...` and `python -m training.plots ...` lines run the script's click command in this process
(the same code as the script's __main__, without a new interpreter importing torch for each line); `VAR=value`
lines set shell variables; any other line runs in bash."""

import importlib
import os
import re
import shlex
import subprocess

import click
from click.testing import CliRunner

from tests.conftest import ROOT

# Guides in the order a reader follows them; any other file with runnable blocks runs after these.
ORDER = ['README.md', 'docs/datasets.md', 'docs/training.md', 'docs/sampling.md', 'docs/phema.md', 'docs/metrics.md']
FENCE = re.compile(r'^```bash runnable\n(.*?)^```', re.M | re.S)


def runnable_blocks() -> list[tuple[str, str]]:
    """(file, block) for every ```bash runnable block, in reading order."""
    files = ORDER + sorted(f'docs/{name}' for name in os.listdir(ROOT / 'docs')
                           if name.endswith('.md') and f'docs/{name}' not in ORDER)
    return [(name, block) for name in files if (ROOT / name).is_file()
            for block in FENCE.findall((ROOT / name).read_text())]


def test_guides_mark_their_cpu_commands_runnable():
    marked = {name for name, _ in runnable_blocks()}
    assert {'docs/training.md', 'docs/sampling.md', 'docs/phema.md'} <= marked


def commands(block: str) -> list[str]:
    """The block's command lines: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r'\\\n\s*', ' ', block)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith('#')]


def script_command(words: list[str]) -> click.Command | None:
    """The click command that `python X.py` / `python -m module` runs, or None for other commands."""
    if words[:2] == ['python', '-m'] and len(words) > 2:
        module = words[2]
    elif words[0] == 'python' and len(words) > 1 and re.fullmatch(r'\w+\.py', words[1]):
        module = words[1][:-3]
    else:
        return None
    sys_module = importlib.import_module(module)
    return next(v for v in vars(sys_module).values() if isinstance(v, click.Command) and
                (isinstance(v, click.Group) or getattr(v.callback, '__module__', None) == module))


def run_line(line: str, variables: dict) -> tuple[int, str]:
    """Run one command line in the current folder; (exit code, output)."""
    m = re.fullmatch(r'\s*([A-Z_]+)=(\S+)\s*(#.*)?', line)
    if m:
        variables[m.group(1)] = m.group(2)
        return 0, ''
    words = shlex.split(os.path.expandvars(line), comments=True)
    command = script_command(words)
    if command is None:
        proc = subprocess.run(['bash', '-euo', 'pipefail', '-c', line], capture_output=True, text=True)
        return proc.returncode, proc.stdout + proc.stderr
    args = words[3:] if words[1] == '-m' else words[2:]
    result = CliRunner().invoke(command, args)
    return result.exit_code, result.output + (repr(result.exception) if result.exception else '')


def test_runnable_blocks_run_as_written(tmp_path, monkeypatch):
    for entry in os.listdir(ROOT):  # the repository's files, and a clean place for what the guides write
        if not entry.startswith('.') and entry not in ('runs', 'out', 'datasets'):
            os.symlink(ROOT / entry, tmp_path / entry)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    from torch_utils import distributed as dist
    monkeypatch.setattr(dist, 'install_signal_handlers', lambda: None)  # train.py's SIGTERM handler stays out of pytest
    # dataset_tool forks a Pool; forked from this long-lived, multithreaded pytest process (not the fresh process a
    # user's command is), a worker once hung on a lock another thread held. The guide's commands convert in-process here.
    from training import dataset_convert
    monkeypatch.setattr(dataset_convert, 'default_workers', lambda: 1)
    variables = {}
    for name, block in runnable_blocks():
        for line in commands(block):
            with monkeypatch.context() as env:
                for key, value in variables.items():
                    env.setenv(key, value)
                code, output = run_line(line, variables)
            assert code == 0, f'{name}: {line}\n{output[-3000:]}'
    assert (tmp_path / 'runs' / 'tiny' / 'curves.png').is_file() and (tmp_path / 'out' / 'grid.png').is_file()
    assert (tmp_path / 'out' / 'phema' / 'profiles.png').is_file()
