"""Shared fixtures: locations of the read-only reference facts and real data."""

import pathlib
import socket

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'
SPEC = SHARED / 'spec'
ASSETS = SHARED / 'assets'


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for torch.distributed rendezvous."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


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
