"""Write docs/<script>-help.txt from the click commands of every top-level script.

    python docs/make_help.py          # rewrite the files
    python docs/make_help.py --check  # exit 1 if any file is stale (tests/test_docs.py)
"""

from __future__ import annotations

import importlib
import pathlib
import sys

import click
from click.testing import CliRunner

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ['train', 'generate', 'fid', 'dataset_tool', 'reconstruct_phema', 'toy_example',
           'example', 'generate_images', 'calculate_metrics', 'count_flops', 'train_edm2']


def find_command(module) -> click.Command:
    """The click command object a script runs."""
    commands = [v for v in vars(module).values() if isinstance(v, click.Command) and getattr(v, 'callback', None)
                and v.callback.__module__ == module.__name__ or isinstance(v, click.Group)]
    groups = [c for c in commands if isinstance(c, click.Group)]
    return (groups or commands)[0]


def help_text(script: str) -> str:
    """`--help` of the script and of each of its subcommands, as users see it (80 columns)."""
    module = importlib.import_module(script)
    command = find_command(module)
    runner = CliRunner()
    parts = []
    subcommands = sorted(command.commands) if isinstance(command, click.Group) else []
    for args in [[]] + [[name] for name in subcommands]:
        result = runner.invoke(command, args + ['--help'], prog_name=f'python {script}.py', terminal_width=80)
        assert result.exit_code == 0, result.output
        title = ' '.join([f'python {script}.py'] + args + ['--help'])
        parts.append(f'$ {title}\n\n{result.output.rstrip()}\n')
    return '\n'.join(parts)


def main(check: bool) -> int:
    sys.path.insert(0, str(ROOT))
    stale = []
    for script in SCRIPTS:
        path = ROOT / 'docs' / f'{script}-help.txt'
        text = help_text(script)
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f'stale: {", ".join(stale)}; run python docs/make_help.py', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main(check='--check' in sys.argv[1:]))
