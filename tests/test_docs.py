"""docs/*-help.txt must match the scripts' current --help (regenerate with docs/make_help.py)."""

import importlib.util

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location('make_help', ROOT / 'docs' / 'make_help.py')
make_help = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_help)


def test_help_files_are_current():
    for script in make_help.SCRIPTS:
        path = ROOT / 'docs' / f'{script}-help.txt'
        assert path.is_file(), f'{path.name} is missing: run python docs/make_help.py'
        assert path.read_text() == make_help.help_text(script), f'{path.name} is stale: run python docs/make_help.py'
