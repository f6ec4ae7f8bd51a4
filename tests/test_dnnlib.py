"""dnnlib: EasyDict, open_url against a real local HTTP server, atomic writes, parsing."""

import http.server
import socket
import threading
import time

import pytest

import dnnlib
from dnnlib import util

PAYLOAD = b'edm-test-payload' * 1000


class _Handler(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):
        type(self).hits += 1
        if self.path == '/data.bin':
            self.send_response(200)
            self.send_header('Content-Length', str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == '/truncated.bin':
            self.send_response(200)
            self.send_header('Content-Length', str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:100])
            self.wfile.flush()
            self.close_connection = True
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Handler.hits = 0
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    return tmp_path / 'cache'


def test_easydict():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d['b'] == 2 and d.a == 1
    del d.a
    with pytest.raises(AttributeError):
        d.a


def test_open_url_miss_then_hit(server, cache_dir):
    with util.open_url(f'{server}/data.bin') as f:
        assert f.read() == PAYLOAD
    assert _Handler.hits == 1
    cached = list((cache_dir / 'downloads').iterdir())
    assert len(cached) == 1 and cached[0].read_bytes() == PAYLOAD
    with util.open_url(f'{server}/data.bin') as f:
        assert f.read() == PAYLOAD
    assert _Handler.hits == 1  # second open served from the cache


def test_open_url_no_cache(server, cache_dir):
    with util.open_url(f'{server}/data.bin', cache=False) as f:
        assert f.read() == PAYLOAD
    assert not (cache_dir / 'downloads').exists()


def test_open_url_404(server, cache_dir):
    with pytest.raises(util.UserError, match=r'HTTP 404.*place it at .*cache'):
        util.open_url(f'{server}/missing.bin')


def test_open_url_truncated_download_leaves_no_cache_file(server, cache_dir):
    with pytest.raises(util.UserError) as info:
        util.open_url(f'{server}/truncated.bin', num_attempts=1)
    assert 'truncated.bin' in str(info.value)
    assert not (cache_dir / 'downloads').exists() or not any((cache_dir / 'downloads').iterdir())


def test_open_url_unreachable_fails_fast_with_cache_path(cache_dir):
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on this port now
    url = f'http://127.0.0.1:{port}/weights.pkl'
    start = time.time()
    with pytest.raises(util.UserError) as info:
        util.open_url(url)
    assert time.time() - start < 10
    message = str(info.value)
    assert url in message and util.url_cache_path(url) in message


def test_open_url_file_and_path(tmp_path):
    path = tmp_path / 'x.bin'
    path.write_bytes(b'abc')
    with util.open_url(str(path)) as f:
        assert f.read() == b'abc'
    with util.open_url(path.as_uri()) as f:
        assert f.read() == b'abc'
    with pytest.raises(FileNotFoundError, match='nope'):
        util.open_url(str(tmp_path / 'nope'))


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / 'out.txt'
    path.write_text('old')
    with pytest.raises(RuntimeError):
        with util.atomic_write(path, 'w') as f:
            f.write('half')
            raise RuntimeError('crash')
    assert path.read_text() == 'old'
    assert [p.name for p in tmp_path.iterdir()] == ['out.txt']


def test_parse_int_list():
    assert util.parse_int_list('0-3,7') == [0, 1, 2, 3, 7]
    with pytest.raises(ValueError, match='x'):
        util.parse_int_list('1,x')
    with pytest.raises(ValueError, match='empty'):
        util.parse_int_list('5-2')


def test_names_and_format():
    assert util.get_obj_by_name('dnnlib.util.EasyDict') is dnnlib.EasyDict
    assert util.construct_class_by_name(class_name='dnnlib.EasyDict', a=1).a == 1
    assert util.format_time(3725) == '1h 02m 05s'
    assert util.format_time(5) == '5s'


def test_atomic_write_gives_normal_permissions(tmp_path):
    import os
    path = tmp_path / 'perm.txt'
    with util.atomic_write(path, 'w') as f:
        f.write('x')
    reference = tmp_path / 'plain.txt'
    reference.write_text('x')
    assert (os.stat(path).st_mode & 0o777) == (os.stat(reference).st_mode & 0o777)


def test_prefetch_makes_the_next_item_in_a_thread_while_the_caller_works():
    """dnnlib.util.prefetch: the same items in order, the next one made on another thread while the caller still
    holds the current one, an error raised to the caller after the items before it, and an early stop."""
    started = [threading.Event() for _ in range(4)]
    made = []

    def items(fail_at=None):
        for i in range(4):
            started[i].set()
            if i == fail_at:
                raise ValueError(f'cannot read item {i}')
            made.append(threading.current_thread().name)
            yield i
    got = []
    for item in util.prefetch(items(), name='test-reader'):
        if item < 3:  # the next item is being made while this one is in the caller's hands
            assert started[item + 1].wait(timeout=10)
        got.append(item)
    assert got == [0, 1, 2, 3] and all(name.startswith('test-reader') for name in made)
    got = []
    with pytest.raises(ValueError, match='cannot read item 2'):
        for item in util.prefetch(items(fail_at=2)):
            got.append(item)
    assert got == [0, 1]
    stream = util.prefetch(items())
    assert next(stream) == 0
    stream.close()  # waits for the item being made, then stops the thread
    assert list(util.prefetch([])) == []
