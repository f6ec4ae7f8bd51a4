"""Reference-format pickles: round trips, the safe loader, refusals, safetensors export."""

import pathlib
import pickle

import pytest
import torch

import dnnlib
from torch_utils import persistence
from tests.persistence_fixtures import TinyNet, TinyWrapper


def _make_net():
    torch.manual_seed(0)
    net = TinyWrapper(channels=4)
    with torch.no_grad():
        net.inner.offset.fill_(0.25)
    return net.eval()


def test_pickle_embeds_reference_meta(tmp_path):
    net = _make_net()
    path = tmp_path / 'net.pkl'
    persistence.save_pickle({'ema': net}, path)
    raw = path.read_bytes()
    assert b'torch_utils.persistence' in raw and b'_reconstruct_persistent_obj' in raw
    assert b'class TinyWrapper' in raw  # module source is embedded
    reduced = net.__reduce__()
    meta = reduced[1][0]
    assert meta['version'] == 6 and meta['type'] == 'class' and meta['class_name'] == 'TinyWrapper'
    assert meta['state']['_init_kwargs'] == {'channels': 4}


@pytest.mark.parametrize('trust', [False, True])
def test_round_trip_exact(tmp_path, trust):
    net = _make_net()
    path = tmp_path / 'net.pkl'
    persistence.save_pickle({'ema': net, 'dataset_kwargs': dnnlib.EasyDict(path='x')}, path)
    data = persistence.load_pickle(path, trust=trust)
    x = torch.randn(3, 4)
    assert torch.equal(data['ema'](x), net(x))
    assert data['dataset_kwargs'].path == 'x'
    assert not data['ema'].training
    for (k1, v1), (k2, v2) in zip(net.state_dict().items(), data['ema'].state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    if not trust:  # the safe path gives back our own class, not one built from embedded source
        assert type(data['ema']) is TinyWrapper and type(data['ema'].inner) is TinyNet


def test_safe_load_keeps_stored_dtype(tmp_path):
    net = _make_net().to(torch.float16)
    path = tmp_path / 'net16.pkl'
    persistence.save_pickle(net, path)
    loaded = persistence.load_pickle(path)
    assert all(p.dtype == torch.float16 for p in loaded.parameters())


class _Evil:
    """Pickles as a persistent object whose embedded source writes a marker file."""

    def __init__(self, marker, class_name):
        self.marker, self.class_name = marker, class_name

    def __reduce__(self):
        src = f'open({str(self.marker)!r}, "w").write("ran")\nclass {self.class_name}:\n    pass\n'
        meta = dict(type='class', version=6, module_src=src, class_name=self.class_name, state={})
        return (persistence._reconstruct_persistent_obj, (meta,))


class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f'touch {self.marker}',))


def test_unknown_class_is_refused_without_running_code(tmp_path):
    marker = tmp_path / 'ran.txt'
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps({'ema': _Evil(marker, 'EvilNet')}))
    with pytest.raises(persistence.UntrustedPickleError, match='EvilNet.*--trust-pickle'):
        persistence.load_pickle(path)
    assert not marker.exists()


def test_known_class_name_never_runs_embedded_source(tmp_path):
    marker = tmp_path / 'ran.txt'
    path = tmp_path / 'evil2.pkl'
    path.write_bytes(pickle.dumps(_Evil(marker, 'TinyNet')))
    obj = persistence.load_pickle(path)  # state has no init kwargs: rebuilt from state alone
    assert isinstance(obj, TinyNet)
    assert not marker.exists()


def test_arbitrary_global_is_refused(tmp_path):
    marker = tmp_path / 'ran.txt'
    path = tmp_path / 'sys.pkl'
    path.write_bytes(pickle.dumps(_SystemCall(marker)))
    with pytest.raises(persistence.UntrustedPickleError, match='posix.system|os.system|nt.system'):
        persistence.load_pickle(path)
    assert not marker.exists()


def test_trust_runs_embedded_source(tmp_path):
    marker = tmp_path / 'ran.txt'
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps(_Evil(marker, 'EvilNet')))
    persistence.load_pickle(path, trust=True)
    assert marker.read_text() == 'ran'


@pytest.mark.parametrize('content', [b'', b'not a pickle at all', None])
def test_corrupt_or_truncated_pickle_is_one_clear_error(tmp_path, content):
    path = tmp_path / 'bad.pkl'
    if content is None:
        persistence.save_pickle({'ema': _make_net()}, path)
        content = path.read_bytes()[: len(path.read_bytes()) // 2]
    path.write_bytes(content)
    with pytest.raises(persistence.CorruptPickleError, match='bad.pkl'):
        persistence.load_pickle(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pkl'):
        persistence.load_pickle(tmp_path / 'nope.pkl')


def test_mismatched_state_is_refused(tmp_path):
    net = _make_net()
    reduced = net.inner.__reduce__()
    meta = reduced[1][0]
    meta['state']['_parameters'] = dict(meta['state']['_parameters'])
    meta['state']['_buffers'] = {}
    class _Raw:
        def __reduce__(self):
            return (persistence._reconstruct_persistent_obj, (meta,))
    path = tmp_path / 'mismatch.pkl'
    path.write_bytes(pickle.dumps(_Raw()))
    with pytest.raises(persistence.UntrustedPickleError, match='offset'):
        persistence.load_pickle(path)


def test_safetensors_export_round_trip(tmp_path):
    net = _make_net()
    st, js = persistence.export_safetensors(net, tmp_path / 'net')
    assert pathlib.Path(st).is_file() and pathlib.Path(js).is_file()
    loaded = persistence.import_safetensors(tmp_path / 'net.safetensors')
    x = torch.randn(2, 4)
    assert torch.equal(loaded.eval()(x), net(x))


def test_import_hook_rewrites_meta(tmp_path):
    seen = []
    def hook(meta):
        seen.append(meta.class_name)
        return meta
    persistence.import_hook(hook)
    try:
        persistence.save_pickle(_make_net(), tmp_path / 'n.pkl')
        persistence.load_pickle(tmp_path / 'n.pkl')
    finally:
        persistence._import_hooks.remove(hook)
    assert 'TinyWrapper' in seen and 'TinyNet' in seen
