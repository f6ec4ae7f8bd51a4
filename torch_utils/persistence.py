"""Pickling of network objects in the reference format, with a safe loader.

Compatible with the reference `torch_utils.persistence` (format version 6): a decorated
class pickles as a call to `torch_utils.persistence._reconstruct_persistent_obj(meta)`,
where `meta` holds the source code of the class's module, the class name and the object
state, so that a pickle keeps working after the code that wrote it has changed.

Running that embedded source is the reference behaviour, and it executes whatever the
file's author put there. `load_pickle()` therefore defaults to a restricted unpickler that
rebuilds known classes as *this project's* implementation from their recorded constructor
arguments and tensors, and refuses everything else unless the caller passes `trust=True`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import inspect
import io
import json
import os
import pickle
import sys
import types
import uuid
import zipfile
from collections import OrderedDict
from typing import Any, Callable

import dnnlib
from dnnlib.util import UserError

#----------------------------------------------------------------------------

_version = 6                    # Format version of the reference persistence module.
_decorators = set()             # Every class made persistent.
_import_hooks = []              # Functions applied to `meta` before reconstruction.
_module_to_src_dict = dict()    # {module: src}
_src_to_module_dict = dict()    # {src: module}
_registry = dict()              # {class_name: decorated class}, used by the safe loader.

# Modules that define the persistent classes of this project; the safe loader imports
# them to fill its registry. A module that does not exist (yet) is skipped.
KNOWN_MODULES = [
    'training.networks',
    'training.networks_edm2',
    'training.networks_cifar_edm2',
    'training.preconditioning',
    'training.loss',
    'training.augment',
    'training.encoders',
    'training.training_loop',
    'training.toy',
    'toy_example',
]

class UntrustedPickleError(UserError):
    """The pickle needs code execution or classes that this project does not know."""

class CorruptPickleError(UserError):
    """The file is not a readable pickle."""

#----------------------------------------------------------------------------
# The decorator.

def persistent_class(orig_class: type) -> type:
    """Make a class pickle itself together with the source of its module (reference format)."""
    assert isinstance(orig_class, type)
    if is_persistent(orig_class):
        return orig_class
    assert orig_class.__module__ in sys.modules
    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_to_src(orig_module)

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            record = getattr(self, '_record_init_args', True)
            self._init_args = copy.deepcopy(args) if record else None
            self._init_kwargs = copy.deepcopy(kwargs) if record else None
            _check_pickleable(self._init_args)
            _check_pickleable(self._init_kwargs)

        @property
        def init_args(self):
            assert self._init_args is not None
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            assert self._init_kwargs is not None
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type='class', version=_version, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    Decorator.__doc__ = orig_class.__doc__
    _decorators.add(Decorator)
    if not orig_module.__name__.startswith('_imported_module_'):
        _register(Decorator)
    return Decorator

def _register(cls: type) -> None:
    """Record a project class for the safe loader; class names must be unique."""
    name = cls.__name__
    other = _registry.get(name)
    if other is not None and other.__module__ != cls.__module__:
        raise RuntimeError(f'persistent class name {name} is defined twice: in {other.__module__} and in {cls.__module__}')
    _registry[name] = cls

def is_persistent(obj: Any) -> bool:
    """True for a persistent class or an instance of one."""
    try:
        if obj in _decorators:
            return True
    except TypeError:
        pass
    return type(obj) in _decorators

def import_hook(hook: Callable[[dnnlib.EasyDict], dnnlib.EasyDict]) -> None:
    """Register a function that may rewrite `meta` (e.g. patch old source) before reconstruction."""
    assert callable(hook)
    _import_hooks.append(hook)

#----------------------------------------------------------------------------
# Reconstruction: the trusted (reference) path executes the embedded module source.

def _apply_hooks(meta: dict) -> dnnlib.EasyDict:
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state) if isinstance(meta.state, dict) else meta.state
    for hook in _import_hooks:
        meta = hook(meta)
        assert meta is not None
    if meta.version != _version:
        raise CorruptPickleError(f'persistent object format version {meta.version} is not supported (expected {_version})')
    if meta.type != 'class':
        raise CorruptPickleError(f'persistent object type {meta.type!r} is not supported')
    return meta

def _reconstruct_persistent_obj(meta: dict) -> Any:
    """Rebuild a persistent object by executing its embedded module source (reference behaviour)."""
    meta = _apply_hooks(meta)
    module = _src_to_module(meta.module_src)
    orig_class = module.__dict__[meta.class_name]
    decorator_class = persistent_class(orig_class)
    obj = decorator_class.__new__(decorator_class)
    setstate = getattr(obj, '__setstate__', None)
    if callable(setstate):
        setstate(meta.state)
    else:
        obj.__dict__.update(meta.state)
    return obj

def _module_to_src(module: types.ModuleType) -> str:
    src = _module_to_src_dict.get(module, None)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
    return src

def _src_to_module(src: str) -> types.ModuleType:
    module = _src_to_module_dict.get(src, None)
    if module is None:
        module_name = '_imported_module_' + uuid.uuid4().hex
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
        exec(src, module.__dict__)  # noqa: S102 -- the trusted path, by the caller's choice
    return module

def _check_pickleable(obj: Any) -> None:
    """Init args must pickle without the classes of the project (reference restriction)."""
    def recurse(obj):
        if isinstance(obj, (list, tuple, set)):
            return [recurse(x) for x in obj]
        if isinstance(obj, dict):
            return [[recurse(x), recurse(y)] for x, y in obj.items()]
        if isinstance(obj, (str, int, float, bool, bytes, bytearray)) or obj is None:
            return None
        if f'{type(obj).__module__}.{type(obj).__name__}' in ('numpy.ndarray', 'torch.Tensor', 'torch.nn.parameter.Parameter'):
            return None
        if is_persistent(obj):
            return None
        return obj
    with io.BytesIO() as f:
        pickle.dump(recurse(obj), f)

#----------------------------------------------------------------------------
# The safe path: known classes become our implementation, nothing else is allowed.

def _safe_load_from_bytes(b: bytes) -> Any:
    import torch
    return torch.load(io.BytesIO(b), weights_only=True)

def _allowed_global(module: str, name: str) -> Any | None:
    """Return the object for an allowed (data-only) global, else None."""
    import numpy as np
    import torch
    if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
        return _safe_reconstruct
    if (module, name) == ('torch.storage', '_load_from_bytes'):
        return _safe_load_from_bytes
    if module == 'torch._utils' and name.startswith('_rebuild_') and name not in ('_rebuild_wrapper_subclass',):
        return getattr(torch._utils, name)
    if module == 'torch' and (isinstance(getattr(torch, name, None), torch.dtype) or name.endswith('Storage') or name in ('Size', 'device')):
        return getattr(torch, name)
    if module == 'torch.nn.modules.container' and name in ('ModuleDict', 'ModuleList', 'Sequential', 'ParameterDict', 'ParameterList'):
        return getattr(torch.nn.modules.container, name)
    if module.startswith('torch.nn.modules.') and name in ('Identity', 'SiLU', 'ReLU', 'GELU', 'Dropout', 'Linear', 'Conv2d', 'GroupNorm', 'LayerNorm'):
        return getattr(importlib.import_module(module), name)
    if module == 'torch.nn.parameter' and name == 'Parameter':
        return torch.nn.Parameter
    if module in ('numpy.core.multiarray', 'numpy._core.multiarray') and name in ('scalar', '_reconstruct'):
        return getattr(importlib.import_module(module), name)
    if module == 'numpy' and name in ('dtype', 'ndarray'):
        return getattr(np, name)
    if module.startswith('numpy.dtypes') and name.endswith('DType'):
        return getattr(importlib.import_module(module), name)
    if (module, name) in (('collections', 'OrderedDict'), ('builtins', 'set'), ('builtins', 'frozenset'),
                          ('builtins', 'slice'), ('builtins', 'complex'), ('_codecs', 'encode')):
        return getattr(importlib.import_module(module), name)
    if (module, name) in (('dnnlib.util', 'EasyDict'), ('dnnlib', 'EasyDict')):
        return dnnlib.EasyDict
    return None

class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_global(module, name)
        if obj is None:
            raise UntrustedPickleError(
                f'the pickle refers to {module}.{name}, which the safe loader does not allow. '
                f'If you trust the source of this file, load it with --trust-pickle (trust=True): that runs code stored in it')
        return obj

def known_classes() -> dict[str, type]:
    """All persistent classes of this project, by class name (imports KNOWN_MODULES)."""
    for name in KNOWN_MODULES:
        _import_known_module(name)
    return _registry

def find_class(class_name: str) -> type | None:
    """Our class of that name, importing KNOWN_MODULES one by one only until it is found."""
    for name in [None] + KNOWN_MODULES:
        if class_name in _registry:
            return _registry[class_name]
        if name is not None:
            _import_known_module(name)
    return None

def _import_known_module(name: str) -> None:
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name and not name.startswith(str(err.name) + '.'):
            raise

def _safe_reconstruct(meta: dict) -> Any:
    """Rebuild a persistent object as our class of the same name; never run `module_src`."""
    meta = _apply_hooks(meta)
    cls = find_class(meta.class_name)
    if cls is None:
        raise UntrustedPickleError(
            f'the pickle holds an object of class {meta.class_name!r}, which this project does not implement. '
            f'If you trust the source of this file, load it with --trust-pickle (trust=True): that runs code stored in it')
    return rebuild(cls, meta.state)

def rebuild(cls: type, state: dict) -> Any:
    """Construct `cls` from the recorded init args, then adopt the stored tensors and submodules."""
    import torch
    state = dict(state)
    init_args, init_kwargs = state.get('_init_args'), state.get('_init_kwargs')
    if init_args is None or init_kwargs is None:
        obj = cls.__new__(cls)
        obj.__setstate__(state) if hasattr(obj, '__setstate__') else obj.__dict__.update(state)
        return obj
    obj = cls(*init_args, **init_kwargs)
    if isinstance(obj, torch.nn.Module):
        for field in ('_parameters', '_buffers', '_modules'):
            ours, theirs = getattr(obj, field), state.get(field, OrderedDict())
            if set(ours) != set(theirs):
                raise UntrustedPickleError(
                    f'stored {cls.__name__} does not match this project\'s implementation: {field[1:]} '
                    f'{sorted(set(theirs) - set(ours))} only in the file, {sorted(set(ours) - set(theirs))} only here. '
                    f'Load it with --trust-pickle to use the code stored in the file')
            for key, value in theirs.items():
                ours[key] = value
        obj.training = state.get('training', obj.training)
    return obj

#----------------------------------------------------------------------------
# Public load/save.

def load_pickle(source: Any, trust: bool = False) -> Any:
    """Load a reference-format pickle from a path, URL or binary file; safe unless `trust`."""
    if isinstance(source, (str, os.PathLike)):
        with dnnlib.util.open_url(source) as f:
            return _load(f, trust, name=os.fspath(source))
    return _load(source, trust, name=getattr(source, 'name', '<file>'))

def _load(f: Any, trust: bool, name: str) -> Any:
    try:
        if trust:
            return pickle.load(f)
        return _SafeUnpickler(f).load()
    except UserError as err:
        raise type(err)(f'{name}: {err}') from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, KeyError,
            TypeError, ValueError, RuntimeError, UnicodeDecodeError) as err:
        detail = f'{type(err).__name__}: {err}'
        if trust:
            raise CorruptPickleError(f'{name}: cannot load the pickle ({detail}); the file is corrupt, truncated, or its embedded code fails here') from None
        raise CorruptPickleError(f'{name}: not a readable network pickle ({detail}); is the file truncated or of another format?') from None

class _SafeProtocol2Unpickler(_SafeUnpickler):
    """The safe unpickler for torch.save's protocol-2 pickles, which name builtins as in Python 2 (__builtin__.set)."""
    def find_class(self, module: str, name: str) -> Any:
        import _compat_pickle  # Python 2 names only (__builtin__, copy_reg, ...): no Python 3 module is renamed
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        return super().find_class(module, name)

class _SafePickleModule:
    """The `pickle_module` torch.load needs, unpickling through the safe loader (no embedded code runs)."""
    Unpickler = _SafeProtocol2Unpickler
    __name__ = 'torch_utils.persistence._SafePickleModule'

    @staticmethod
    def load(f, **kwargs):
        return _SafeProtocol2Unpickler(f, **kwargs).load()

def load_file(source: Any, trust: bool = False) -> Any:
    """A reference-format pickle or a torch.save file (e.g. the STF fork's training-state-*.pt), safe unless `trust`."""
    import torch
    if isinstance(source, (str, os.PathLike)):
        with dnnlib.util.open_url(source) as f:
            return load_file(f, trust=trust) if _is_zip(f) else _load(f, trust, name=os.fspath(source))
    if not _is_zip(source):
        return _load(source, trust, name=getattr(source, 'name', '<file>'))
    name = getattr(source, 'name', '<file>')
    try:
        return torch.load(source, map_location='cpu', weights_only=False, pickle_module=pickle if trust else _SafePickleModule)
    except UserError as err:
        raise type(err)(f'{name}: {err}') from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CorruptPickleError(f'{name}: not a readable torch checkpoint ({type(err).__name__}: {err}); is the file truncated?') from None

def _is_zip(f: Any) -> bool:
    """torch.save's zip container starts with the local file header 'PK\\x03\\x04'; pickles do not."""
    pos = f.tell()
    head = f.read(4)
    f.seek(pos)
    return head == b'PK\x03\x04'

def save_pickle(obj: Any, path: str | os.PathLike) -> None:
    """Write `obj` as a reference-format pickle, atomically."""
    with dnnlib.util.atomic_write(path) as f:
        pickle.dump(obj, f)

#----------------------------------------------------------------------------
# torch.save files (training states): tensors and plain data, read without running code.

def _numpy_scalar_globals() -> list:
    """The numpy globals a pickled numpy float needs (states written before lr was stored as a float)."""
    import numpy as np
    names = [('numpy._core.multiarray', 'scalar'), ('numpy.core.multiarray', 'scalar'), ('numpy', 'dtype'),
             ('numpy.dtypes', 'Float64DType'), ('numpy.dtypes', 'Float32DType')]
    found = []
    for module, name in names:
        with contextlib.suppress(ImportError, AttributeError):
            found.append(_allowed_global(module, name))
    return [obj for obj in found if obj is not None and obj is not np.ndarray]

class _SafeTorchUnpickler(_SafeUnpickler):
    def find_class(self, module: str, name: str) -> Any:
        return super().find_class('builtins' if module == '__builtin__' else module, name)  # torch.save: protocol 2

def load_torch_file(path: str | os.PathLike, trust: bool = False, what: str = 'training state') -> Any:
    """Read a torch.save file without running code from it (torch weights_only, then our safe unpickler
    for embedded network objects); refuse anything else unless `trust`. Errors are one line naming the file."""
    import torch
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f'{path} is a folder; expected a {what} file (training-state-*.pt)')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such {what} file')
    if not zipfile.is_zipfile(path):
        size = os.path.getsize(path)
        raise CorruptPickleError(f'{path}: not a {what} ({size} bytes, not a complete file written by torch.save: '
                                 f'truncated, or another format); delete it or point --resume at another file')
    try:
        if trust:
            return torch.load(path, map_location='cpu', weights_only=False)
        try:
            with torch.serialization.safe_globals(_numpy_scalar_globals()):
                return torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError as err:
            if 'Unsupported global' not in str(err):
                raise
        safe_pickle = types.SimpleNamespace(Unpickler=_SafeTorchUnpickler, load=None, __name__='pickle')
        return torch.load(path, map_location='cpu', weights_only=False, pickle_module=safe_pickle)
    except UntrustedPickleError as err:
        raise UntrustedPickleError(f'{path}: refused to load this {what}: {str(err).split(". If you trust")[0]}; '
                                   f'if you trust the file, rerun with --trust-pickle (that runs code stored in it)') from None
    except UserError as err:
        raise type(err)(f'{path}: {err}') from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, KeyError, TypeError,
            ValueError, RuntimeError, UnicodeDecodeError, zipfile.BadZipFile) as err:
        raise CorruptPickleError(f'{path}: not a readable {what} ({type(err).__name__}: '
                                 f'{dnnlib.util.text_line(err, 120)}); the file is corrupt or truncated') from None

#----------------------------------------------------------------------------
# Safetensors + JSON export, for sharing weights without pickles.

def _to_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if hasattr(value, 'item') and getattr(value, 'ndim', 1) == 0:
        return value.item()
    return value

def export_safetensors(net: Any, path: str | os.PathLike) -> tuple[str, str]:
    """Write `net`'s state_dict to PATH.safetensors and its class and init kwargs to PATH.json."""
    from safetensors.torch import save_file
    if not is_persistent(net):
        raise ValueError(f'{type(net).__name__} is not a persistent class of this project; cannot export its config')
    base = os.fspath(path)
    base = base[:-len('.safetensors')] if base.endswith('.safetensors') else base
    config = dict(class_name=type(net).__name__, init_args=_to_json(net.init_args), init_kwargs=_to_json(net.init_kwargs))
    tensors = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    tmp = f'{base}.safetensors.{os.getpid()}.tmp'
    save_file(tensors, tmp)
    os.replace(tmp, base + '.safetensors')
    with dnnlib.util.atomic_write(base + '.json', 'w') as f:
        json.dump(config, f, indent=2)
    return base + '.safetensors', base + '.json'

def import_safetensors(path: str | os.PathLike) -> Any:
    """Rebuild a network written by `export_safetensors`."""
    from safetensors.torch import load_file
    base = os.fspath(path)
    base = base[:-len('.safetensors')] if base.endswith('.safetensors') else base
    for suffix in ('.json', '.safetensors'):
        if not os.path.isfile(base + suffix):
            raise FileNotFoundError(f'{base + suffix}: no such file (export writes PATH.safetensors and PATH.json together)')
    with open(base + '.json') as f:
        config = json.load(f)
    cls = find_class(str(config.get('class_name')))
    if cls is None:
        raise ValueError(f'{base}.json names class {config.get("class_name")!r}, which this project does not implement')
    net = cls(*config.get('init_args', []), **config.get('init_kwargs', {}))
    net.load_state_dict(load_file(base + '.safetensors'))
    return net

def file_digest(path: str | os.PathLike) -> str:
    """SHA-1 of a file, for logging which pickle was loaded."""
    h = hashlib.sha1()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()
