"""Shared fixtures: the reference facts kept in tests/fixtures/ and real CIFAR-10 images from quickstart/."""

import functools
import io
import json
import pathlib
import socket
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPEC = pathlib.Path(__file__).resolve().parent / 'fixtures' / 'spec'
CIFAR_MINI = ROOT / 'quickstart' / 'cifar10-mini.zip'


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for torch.distributed rendezvous."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture
def spec_dir() -> pathlib.Path:
    """Reference facts recorded from the reference code (tests/fixtures/spec/README.md)."""
    assert SPEC.is_dir(), f'reference facts missing at {SPEC}: the clone is incomplete'
    return SPEC


@functools.lru_cache(maxsize=1)
def cifar_mini() -> tuple[np.ndarray, np.ndarray]:
    """The 1,000 CIFAR-10 training images shipped with the quickstart: uint8 [N, 32, 32, 3] and int labels [N]."""
    with zipfile.ZipFile(CIFAR_MINI) as archive:
        labels = dict(json.loads(archive.read('dataset.json'))['labels'])
        names = sorted(labels)
        images = np.stack([np.asarray(PIL.Image.open(io.BytesIO(archive.read(name))).convert('RGB')) for name in names])
    images.setflags(write=False)
    return images, np.asarray([labels[name] for name in names])


def cifar_batch(start: int, count: int, label: str = 'training batch') -> dict:
    """Images [start, start + count) of cifar_mini() as one batch of the official CIFAR-10 python pickles."""
    images, labels = cifar_mini()
    assert start + count <= len(images), f'cifar10-mini.zip has {len(images)} images'
    data = images[start:start + count].transpose(0, 3, 1, 2).reshape(count, 3072)
    return {'batch_label': label, 'labels': labels[start:start + count].tolist(), 'data': np.ascontiguousarray(data)}


@pytest.fixture(scope='module')
def one_thread():
    """Tiny tensors: one torch thread avoids oversubscription when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
