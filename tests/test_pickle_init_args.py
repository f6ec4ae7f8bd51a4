"""Submodules record their constructor arguments as the reference does (keyword vs positional,
value types), so that our snapshot pickles carry the same init_args/init_kwargs and globals."""

import collections
import io
import json
import pickle
from pathlib import Path

import pytest
import torch

import dnnlib
from torch_utils import persistence

FIXTURE = Path(__file__).parent / 'fixtures' / 'pickle_init' / 'reference_init_args.json'
SKIPPED = {'EDMLoss', 'EDM2Loss', 'AugmentPipe', 'StandardRGBEncoder'}


def _describe(value):
    return [type(value).__module__ + '.' + type(value).__name__, repr(value)]


def recorded_init_args(data: bytes, globals_seen: set | None = None) -> list:
    """[class, args, kwargs] of every persistent object in a pickle, read without running its code."""
    found = []
    globals_seen = set() if globals_seen is None else globals_seen

    def record(meta):
        state = meta['state']
        found.append([meta['class_name'], [_describe(a) for a in state['_init_args']],
                      {k: _describe(v) for k, v in sorted(state['_init_kwargs'].items())}])
        return None

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            globals_seen.add(f'{module}.{name}'.replace('numpy.core.', 'numpy._core.'))  # numpy 1.x spelling
            if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
                return record
            if (module, name) == ('torch.storage', '_load_from_bytes'):
                return lambda b: torch.load(io.BytesIO(b), weights_only=True)
            return super().find_class(module, name)

    Recorder(io.BytesIO(data)).load()
    return [r for r in found if r[0] not in SKIPPED]


@pytest.mark.parametrize('name', ['edm-snapshot', 'edm2-snapshot'])
def test_submodules_record_init_args_like_the_reference(name):
    ref = json.loads(FIXTURE.read_text())[name]
    kwargs = {k: (float('inf') if v == float('inf') else v) for k, v in ref['ema_kwargs'].items()}
    net = persistence.find_class(ref['ema_class'])(**kwargs)
    container = dict if name == 'edm-snapshot' else dnnlib.EasyDict  # as the reference training loops write them
    globals_seen = set()
    ours = recorded_init_args(pickle.dumps(container(ema=net)), globals_seen)
    assert globals_seen == set(ref['globals'])  # e.g. EDM's numpy scalars (skip_scale, init_weight) as in the reference
    key = lambda r: json.dumps(r, sort_keys=True)
    want = collections.Counter(key(r) for r in ref['modules'])
    got = collections.Counter(key(r) for r in ours)
    assert got == want, f'only in ours: {list((got - want).elements())[:3]}; only in the reference: {list((want - got).elements())[:3]}'
