"""Dockerfile and environment.yml list the same dependencies as pyproject.toml."""

import re
import sys

import pytest

from tests.conftest import ROOT

tomllib = pytest.importorskip('tomllib') if sys.version_info >= (3, 11) else pytest.importorskip('tomli')


def _name(requirement: str) -> str:
    name = re.split(r'[<>=!~\s\[]', requirement.strip(), maxsplit=1)[0].lower()
    return {'pytorch': 'torch', 'pillow': 'pillow'}.get(name, name)


def _pyproject_deps() -> set:
    with open(ROOT / 'pyproject.toml', 'rb') as f:
        return {_name(d) for d in tomllib.load(f)['project']['dependencies']}


def test_environment_yml_matches_pyproject():
    deps = set()
    text = (ROOT / 'environment.yml').read_text()
    for line in text[text.index('dependencies:'):].splitlines():
        m = re.match(r'\s+- ([A-Za-z][\w.-]*)', line)
        if m and m.group(1) not in ('python', 'pip'):
            deps.add(_name(m.group(1)))
    assert deps == _pyproject_deps()


def test_dockerfile_matches_pyproject():
    text = (ROOT / 'Dockerfile').read_text()
    base = re.search(r'^FROM (\S+)', text, re.M).group(1)
    assert base.startswith('pytorch/pytorch:') and 'cuda' in base  # torch comes from the CUDA base image
    install = re.search(r'pip install --no-cache-dir ([^&\\]+)', text).group(1)
    assert {_name(d) for d in install.split()} | {'torch'} == _pyproject_deps()


def test_version_string_matches_pyproject():
    import training
    with open(ROOT / 'pyproject.toml', 'rb') as f:
        assert tomllib.load(f)['project']['version'] == training.__version__
    assert f'## {training.__version__}' in (ROOT / 'CHANGELOG.md').read_text()


def test_dockerfile_copies_what_the_scripts_need():
    # quickstart.py reads quickstart/cifar10-mini.zip; `python -m bench` needs bench/.
    copied = set(re.findall(r'^COPY (\S+) ', (ROOT / 'Dockerfile').read_text(), re.M))
    assert {'dnnlib', 'torch_utils', 'training', 'bench', 'quickstart', '*.py'} <= copied


def test_python_and_torch_floors_agree():
    # diffusers (the SD VAE) needs torch >= 2.6 (torch.accelerator); `X | None` annotations need Python 3.10.
    with open(ROOT / 'pyproject.toml', 'rb') as f:
        project = tomllib.load(f)['project']
    torch_floor = next(d for d in project['dependencies'] if _name(d) == 'torch').split('>=')[1]
    env = (ROOT / 'environment.yml').read_text()
    assert project['requires-python'] == '>=3.10' and '- python>=3.10' in env
    assert torch_floor == '2.6' and f'- pytorch>={torch_floor}' in env and '- pytorch\n' not in env.split('dependencies:')[0]
    base = re.search(r'^FROM pytorch/pytorch:(\d+)\.(\d+)', (ROOT / 'Dockerfile').read_text(), re.M)
    assert (int(base.group(1)), int(base.group(2))) >= tuple(int(v) for v in torch_floor.split('.'))
