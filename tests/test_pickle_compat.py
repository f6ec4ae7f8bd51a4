"""Our pickles must load in the reference code, which executes the embedded module source.

The reference repositories have `torch_utils.persistence`, `torch_utils.misc` and `dnnlib`, but
not this project's other modules (EDM2's has no `training/networks.py`, EDM's no
`training/preconditioning.py`). So the source of every module that defines persistent classes
must run with only those available at import time.
"""

import builtins
import importlib
import inspect
import sys
import types

import pytest

from torch_utils import persistence

ALLOWED_TOP_LEVEL = ('torch', 'numpy', 'np', 'torch_utils.persistence', 'torch_utils.misc', 'torch_utils',
                     'dnnlib', 'dnnlib.util', 'collections', 'functools', 'copy', 'os', 're', 'warnings',
                     'typing', 'math', 'contextlib', 'dataclasses', 'importlib', 'socket', 'urllib', 'numbers',
                     '__future__', 'abc', 'scipy', 'PIL', 'json', 'io', 'sys', 'enum', 'itertools')


def _exec_as_reference_would(src: str, module_name: str) -> dict:
    real_import = builtins.__import__
    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and not any(name == a or name.startswith(a + '.') for a in ALLOWED_TOP_LEVEL):
            raise ImportError(f'{module_name}: the module source imports {name!r} at load time, '
                              f'which the reference code does not have')
        return real_import(name, globals, locals, fromlist, level)
    module = types.ModuleType('_imported_module_compat_test')
    module.__dict__['__builtins__'] = dict(vars(builtins), __import__=guarded_import)
    sys.modules[module.__name__] = module
    persistence._module_to_src_dict[module] = src  # as the reference loader does before exec
    try:
        exec(compile(src, module_name, 'exec'), module.__dict__)
    finally:
        del sys.modules[module.__name__]
        del persistence._module_to_src_dict[module]
    return module.__dict__


@pytest.mark.parametrize('module_name', [m for m in persistence.KNOWN_MODULES if m != 'toy_example'])
def test_module_source_runs_without_project_imports(module_name):
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        pytest.fail(f'{module_name} is listed in persistence.KNOWN_MODULES but does not exist')
    persistent = [v for v in vars(module).values() if isinstance(v, type) and persistence.is_persistent(v) and v.__module__ == module_name]
    if not persistent:
        return  # re-exports only: never named as module_src
    namespace = _exec_as_reference_would(inspect.getsource(module), module_name)
    for cls in persistent:
        assert cls.__name__ in namespace
