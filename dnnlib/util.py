"""EasyDict, URL/cache handling, name lookup, formatting and CLI error helpers."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import functools
import hashlib
import importlib
import io
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from typing import Any, Callable, Iterable, Iterator

#----------------------------------------------------------------------------
# Containers.

class EasyDict(dict):
    """Dict whose items can also be read and written as attributes (reference dnnlib.EasyDict)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]

#----------------------------------------------------------------------------
# User-facing errors.

class UserError(Exception):
    """Bad input from the user: the message says what is wrong and how to fix it."""

USER_ERRORS = (UserError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError)

class LazyModule:
    """A module imported on first attribute use, so that a script's --help and option errors do not wait for torch."""

    def __init__(self, name: str):
        object.__setattr__(self, '_name', name)

    def __getattr__(self, attr: str):
        import importlib
        return getattr(importlib.import_module(self._name), attr)

    def __setattr__(self, attr: str, value) -> None:
        import importlib
        setattr(importlib.import_module(self._name), attr, value)

def require(module: str, purpose: str, pip: str | None = None):
    """Import an optional or --no-deps-skipped package, or raise one UserError line naming the pip command."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f'{purpose} needs the {module.split(".")[0]} package: pip install {pip or module}') from None

def cli_errors(fn: Callable) -> Callable:
    """Turn user errors raised below a click command into one clean line and exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import click
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            raise click.ClickException(str(err)) from None
    return wrapper

#----------------------------------------------------------------------------
# File-system faults: one line that names the path and the cause.

class WriteError(UserError):
    """A file or folder could not be written (disk full, read-only file system, a file in the way, ...)."""

_WRITE_CAUSES = {
    errno.ENOSPC:       'no space left on device',
    errno.EDQUOT:       'disk quota exceeded',
    errno.EROFS:        'read-only file system',
    errno.EACCES:       'permission denied',
    errno.EPERM:        'operation not permitted',
    errno.EEXIST:       'a file is in the way (expected a folder)',
    errno.ENOTDIR:      'a file is in the way (expected a folder)',
    errno.EISDIR:       'a folder is in the way (expected a file)',
    errno.ENAMETOOLONG: 'file name too long',
    errno.EFBIG:        'file too large for this file system',
    errno.EIO:          'input/output error (failing disk or network file system?)',
}

def _torch_writer_failure(err: BaseException) -> bool:
    """torch.save's zip writer reports a failed write as RuntimeError('... unexpected pos ...')."""
    text = str(err)
    return isinstance(err, RuntimeError) and ('unexpected pos' in text or 'PytorchStreamWriter failed' in text
                                              or 'file write failed' in text)

def write_error(err: BaseException, path: str | os.PathLike) -> WriteError | None:
    """WriteError('CAUSE while writing PATH') for a file-system error (also torch's writer failures); else None."""
    for cause in (err, err.__cause__, err.__context__):
        if isinstance(cause, OSError) and cause.errno in _WRITE_CAUSES:
            return WriteError(f'{_WRITE_CAUSES[cause.errno]} while writing {os.fspath(path)}')
    if _torch_writer_failure(err):
        folder = os.path.dirname(os.path.abspath(path))
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < (64 << 20):
                return WriteError(f'no space left on device while writing {os.fspath(path)}')
        return WriteError(f'write failed while writing {os.fspath(path)} (torch: {text_line(err)})')
    return None

def text_line(err: BaseException, limit: int = 200) -> str:
    """First line of an exception's message, at most `limit` characters."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line if len(line) <= limit else line[:limit - 3] + '...'

@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn file-system errors raised inside the block into one WriteError that names `path`."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        mapped = write_error(err, path) if not isinstance(err, UserError) else None
        if mapped is None:
            raise
        raise mapped from None

#----------------------------------------------------------------------------
# Atomic writes: nothing a user made is ever half-written.

# Temporary names: atomic_write's mkstemp adds 8 characters, pid-named writers the pid.
_TEMP_SUFFIX = r'\.(?:[a-z0-9_]{8}|\d+)\.tmp'

@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = 'wb') -> Iterator[io.IOBase]:
    """Yield a file object for a temporary sibling of `path`, renamed over `path` on success."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    with writing(path):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.', suffix='.tmp')
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

class BackgroundWrites:
    """Runs one batch of writes at a time in a background thread while the caller computes the next batch.

    At most one batch waits for the thread; an error in it is raised by the next submit() or by close().
    Leaving the `with` block waits for the last batch, also when the loop stopped with an exception.
    """

    def __init__(self, name: str = 'writer'):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending = None

    def submit(self, fn: Callable, *args) -> None:
        """Wait for the previous batch (raising its error), then start fn(*args) in the thread."""
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        """Wait for the queued batch; raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> BackgroundWrites:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

_END = object()

def prefetch(iterable: Iterable, name: str = 'reader') -> Iterator:
    """The items of `iterable`, each next one made in a background thread while the caller works on the current
    (one item ahead). An error in making an item is raised where the caller would have met it."""
    items = iter(iterable)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) as pool:
        pending = pool.submit(next, items, _END)
        while (item := pending.result()) is not _END:
            pending = pool.submit(next, items, _END)
            yield item

def remove_stale_temp_files(folder: str | os.PathLike, targets: str = r'.+', min_age_s: float = 0) -> list[str]:
    """Delete the temporary files that interrupted atomic writes of files named like the regex `targets`
    left in `folder`; `min_age_s` spares ones that another process may be writing right now."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    pattern, now = re.compile(f'(?:{targets}){_TEMP_SUFFIX}'), time.time()
    with os.scandir(folder) as entries:
        for entry in entries:
            if not pattern.fullmatch(entry.name):
                continue
            with contextlib.suppress(OSError):  # gone already, or not ours to delete: leave it
                if entry.is_file(follow_symlinks=False) and now - entry.stat().st_mtime >= min_age_s:
                    os.remove(entry.path)
                    removed.append(entry.path)
    return removed

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

#----------------------------------------------------------------------------
# Formatting and parsing.

def format_time(seconds: float) -> str:
    """Human-readable duration, e.g. '1h 02m 03s' (reference dnnlib.util.format_time)."""
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 60 * 60:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 24 * 60 * 60:
        return f'{s // 3600}h {(s // 60) % 60:02d}m {s % 60:02d}s'
    return f'{s // 86400}d {(s // 3600) % 24:02d}h {(s // 60) % 60:02d}m'

def parse_int_list(spec: str | list[int] | None) -> list[int]:
    """Parse '0-63,100' or '1,2,5-7' into a list of ints; raise ValueError naming the bad part."""
    if spec is None:
        return []
    if isinstance(spec, (list, tuple)):
        return [int(x) for x in spec]
    result = []
    for part in str(spec).split(','):
        part = part.strip()
        m = re.fullmatch(r'(-?\d+)\s*-\s*(-?\d+)', part) or re.fullmatch(r'(-?\d+)', part)
        if m is None:
            raise ValueError(f'cannot parse {part!r} in {spec!r}: expected a comma-separated list of integers or ranges, e.g. 0-63,100')
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.lastindex == 2 else lo
        if hi < lo:
            raise ValueError(f'range {part!r} in {spec!r} is empty: write it as LOW-HIGH with LOW <= HIGH')
        result.extend(range(lo, hi + 1))
    return result

#----------------------------------------------------------------------------
# Looking up Python objects by name (reference configs store class names).

def get_module_from_obj_name(obj_name: str) -> tuple[Any, str]:
    """Split 'pkg.mod.attr.sub' into the longest importable module and the rest."""
    parts = obj_name.split('.')
    for i in range(len(parts), 0, -1):
        module_name = '.'.join(parts[:i])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name) and not err.name.startswith(module_name):
                raise
            continue
        try:
            get_obj_from_module(module, '.'.join(parts[i:]))
        except AttributeError:
            continue
        return module, '.'.join(parts[i:])
    raise ValueError(f'cannot find {obj_name!r}: no importable module defines it')

def get_obj_from_module(module: Any, obj_name: str) -> Any:
    """Resolve a dotted attribute path inside a module."""
    obj = module
    for part in filter(None, obj_name.split('.')):
        obj = getattr(obj, part)
    return obj

def get_obj_by_name(name: str) -> Any:
    """Find a Python object by its fully qualified name."""
    module, obj_name = get_module_from_obj_name(name)
    return get_obj_from_module(module, obj_name)

def call_func_by_name(*args, func_name: str, **kwargs) -> Any:
    """Call a function given by its fully qualified name."""
    func = get_obj_by_name(func_name)
    if not callable(func):
        raise ValueError(f'{func_name!r} is not callable')
    return func(*args, **kwargs)

def construct_class_by_name(*args, class_name: str, **kwargs) -> Any:
    """Instantiate a class given by its fully qualified name."""
    return call_func_by_name(*args, func_name=class_name, **kwargs)

def get_top_level_function_name(obj: Any) -> str:
    """Fully qualified name of a top-level function."""
    module = obj.__module__
    if module == '__main__':
        module = os.path.splitext(os.path.basename(sys.modules[module].__file__))[0]
    return module + '.' + obj.__name__

#----------------------------------------------------------------------------
# Cache and URL handling.

def make_cache_dir_path(*paths: str) -> str:
    """Path inside the download cache: $DNNLIB_CACHE_DIR, else ~/.cache/dnnlib."""
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.path.join(os.environ['DNNLIB_CACHE_DIR'], *paths)
    return os.path.join(os.path.expanduser('~'), '.cache', 'dnnlib', *paths)

def is_url(obj: Any, allow_file_urls: bool = False) -> bool:
    """True for http(s):// (and file:// when allowed) URLs."""
    if not isinstance(obj, str) or '://' not in obj:
        return False
    if allow_file_urls and obj.startswith('file://'):
        return True
    res = urllib.parse.urlparse(obj)
    return res.scheme in ('http', 'https') and bool(res.netloc)

def url_cache_path(url: str, cache_dir: str | None = None) -> str:
    """Where open_url keeps (or expects) the cached copy of `url`."""
    cache_dir = cache_dir or make_cache_dir_path('downloads')
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    name = re.sub(r'[^0-9A-Za-z_.-]', '_', os.path.basename(urllib.parse.urlparse(url).path)) or 'download'
    return os.path.join(cache_dir, f'{url_md5}_{name}')

def _file_url_to_path(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    path = urllib.request.url2pathname(parsed.path) if parsed.path else ''
    return path if not parsed.netloc else os.path.join(parsed.netloc, path.lstrip('/'))

def open_url(url: str | os.PathLike, cache_dir: str | None = None, num_attempts: int = 2,
             verbose: bool = True, return_filename: bool = False, cache: bool = True, timeout: float = 10):
    """Open a local path, file:// URL or http(s) URL as a binary file; downloads are cached atomically."""
    url = os.fspath(url)
    if not is_url(url, allow_file_urls=True):
        if not os.path.exists(url):
            raise FileNotFoundError(f'{url}: no such file')
        if os.path.isdir(url):
            raise IsADirectoryError(f'{url} is a folder; expected a file')
        return url if return_filename else open(url, 'rb')
    if url.startswith('file://'):
        path = _file_url_to_path(url)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{url}: no such file ({path})')
        return path if return_filename else open(path, 'rb')
    cache_path = url_cache_path(url, cache_dir)
    if cache and os.path.isfile(cache_path):
        return cache_path if return_filename else open(cache_path, 'rb')
    if return_filename and not cache:
        raise ValueError('open_url: return_filename=True requires cache=True')
    data = _download(url, cache_path, num_attempts=num_attempts, verbose=verbose, timeout=timeout)
    if cache:
        with atomic_write(cache_path) as f:
            f.write(data)
        return cache_path if return_filename else open(cache_path, 'rb')
    return io.BytesIO(data)

def _download(url: str, cache_path: str, num_attempts: int, verbose: bool, timeout: float) -> bytes:
    """Fetch `url` fully, checking its length; raise one clear UserError on failure."""
    import requests
    hint = f'If this machine is offline, download the file elsewhere and place it at {cache_path}'
    last_error = None
    for _attempt in range(max(num_attempts, 1)):
        try:
            with requests.get(url, timeout=timeout, stream=True) as res:
                if res.status_code != 200:
                    raise UserError(f'cannot download {url}: HTTP {res.status_code} {res.reason}. {hint}')
                chunks = []
                for chunk in _iter_with_progress(res, url, verbose):
                    chunks.append(chunk)
                data = b''.join(chunks)
                expected = res.headers.get('Content-Length')
                if expected is not None and int(expected) != len(data):
                    raise UserError(f'download of {url} was truncated ({len(data)} of {expected} bytes). {hint}')
                return data
        except UserError:
            raise
        except requests.RequestException as err:
            last_error = err
    reason = type(last_error).__name__ if last_error is not None else 'unknown error'
    raise UserError(f'cannot download {url} ({reason}: the host is unreachable). {hint}')

def _iter_with_progress(res, url: str, verbose: bool) -> Iterator[bytes]:
    total = int(res.headers.get('Content-Length', 0)) or None
    bar = None
    if verbose and (total is None or total > (1 << 20)):
        from tqdm import tqdm
        bar = tqdm(total=total, unit='B', unit_scale=True, desc=f'Downloading {os.path.basename(url)}', leave=False)
    try:
        for chunk in res.iter_content(chunk_size=1 << 20):
            if bar is not None:
                bar.update(len(chunk))
            yield chunk
    finally:
        if bar is not None:
            bar.close()
