"""The tensors of a TorchScript archive (torch.jit.save), read without running any of its code.

A TorchScript archive is a zip file: `<name>/data.pkl` pickles the module tree (one object per module,
its attributes in a dict), `<name>/data/<key>` hold the raw storages, and `<name>/code/` holds the
TorchScript source that torch.jit.load would compile. This reader unpickles data.pkl with a restricted
unpickler that builds plain objects and tensors only, never imports or calls anything the file names,
and ignores code/ entirely, so a published weights file (e.g. NVIDIA's vgg16.pt) can be read as safely
as torch.load(weights_only=True) reads a state_dict.
"""

import pickle
import zipfile

import torch

# Storage classes a TorchScript archive names -> element dtype.
_STORAGE_DTYPES = {
    'FloatStorage': torch.float32, 'DoubleStorage': torch.float64, 'HalfStorage': torch.float16,
    'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
    'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8, 'BoolStorage': torch.bool,
}


class ArchiveError(ValueError):
    """Not a TorchScript archive this reader understands; the message says why, as a phrase."""


class _ScriptObject:
    """Stand-in for one scripted module (or other TorchScript object): only its attributes are kept."""

    class_name = ''

    def __setstate__(self, state):
        self.attributes = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """torch._utils._rebuild_tensor_v2 on our flat storage tensor (requires_grad, hooks, metadata dropped); tensors
    that share a storage share memory, as with torch.load; as_strided refuses views past the storage's end."""
    return storage.as_strided(tuple(size), tuple(stride), storage_offset)


def _identity(value, *unused):
    return value


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only TorchScript object classes, tensor rebuilding and OrderedDict; anything else is refused."""

    def __init__(self, file, read_storage):
        super().__init__(file)
        self.read_storage = read_storage

    def find_class(self, module, name):
        if module == '__torch__' or module.startswith('__torch__.'):
            return type(name, (_ScriptObject,), dict(class_name=f'{module}.{name}'))
        if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor'):
            return _rebuild_tensor
        if module == 'torch' and name in _STORAGE_DTYPES:
            return name
        if module == 'collections' and name == 'OrderedDict':
            return dict
        if module == 'torch.jit._pickle' and (name.startswith('build_') or name == 'restore_type_tag'):
            return _identity
        raise ArchiveError(f'data.pkl refers to {module}.{name}, which a weights file does not need; refused')

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage' and pid[1] in _STORAGE_DTYPES):
            raise ArchiveError(f'unknown storage reference {pid!r:.80}')
        _, storage_type, key, _location, numel = pid
        return self.read_storage(str(key), _STORAGE_DTYPES[storage_type], int(numel))


def _flatten(obj, prefix: str, out: dict) -> None:
    for name, value in getattr(obj, 'attributes', {}).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _flatten(value, f'{prefix}{name}.', out)


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor attribute of the archived module tree, by dotted name (the module's state_dict keys)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ArchiveError(f'not a TorchScript archive ({err})') from None
    with archive:
        names = set(archive.namelist())
        roots = [name[:-len('/data.pkl')] for name in names if name.endswith('/data.pkl') and name.count('/') == 1]
        if len(roots) != 1:
            raise ArchiveError('a zip file without the one <name>/data.pkl of a TorchScript archive')
        root = roots[0]
        byteorder = archive.read(f'{root}/byteorder').decode().strip() if f'{root}/byteorder' in names else 'little'
        if byteorder != 'little':
            raise ArchiveError(f'{byteorder}-endian tensors; only little-endian archives are supported')

        def read_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
            entry = f'{root}/data/{key}'
            if entry not in names:
                raise ArchiveError(f'storage {entry} is missing')
            raw = bytearray(archive.read(entry))
            itemsize = torch.empty([], dtype=dtype).element_size()
            if len(raw) < numel * itemsize:
                raise ArchiveError(f'storage {entry} holds {len(raw)} bytes, fewer than {numel} x {itemsize}')
            return torch.frombuffer(raw, dtype=dtype, count=numel) if numel else torch.empty([0], dtype=dtype)

        with archive.open(f'{root}/data.pkl') as f:
            try:
                top = _RestrictedUnpickler(f, read_storage).load()
            except ArchiveError:
                raise
            except (pickle.UnpicklingError, EOFError, TypeError, ValueError, RuntimeError) as err:
                raise ArchiveError(f'unreadable data.pkl ({type(err).__name__}: {err})') from None
    tensors = {}
    _flatten(top, '', tensors)
    return tensors
