"""Shared fixtures: locations of the read-only reference facts and real data."""

import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'
SPEC = SHARED / 'spec'
ASSETS = SHARED / 'assets'


@pytest.fixture
def spec_dir() -> pathlib.Path:
    if not SPEC.is_dir():
        pytest.skip(f'reference facts not found at {SPEC}')
    return SPEC


@pytest.fixture
def cifar_dir() -> pathlib.Path:
    path = ASSETS / 'cifar-10-batches-py'
    if not path.is_dir():
        pytest.skip(f'CIFAR-10 batches not found at {path}')
    return path


@pytest.fixture(scope='module')
def one_thread():
    """Tiny tensors: one torch thread avoids oversubscription when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
