"""Reliability and security (issue 17): training states run no code, preemption of the whole process
group, one-line errors for file-system faults, no stale temporary files, bad --resume files,
dataset_tool input checks, and reconstruct_phema's warning for snapshots of different runs."""

import dataclasses
import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import generate
import train
from dataset_tool import cmdline as dataset_tool
from torch_utils import distributed as dist
from torch_utils import persistence
from training import phema
from training import training_loop as tl
from training.presets import build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py

#----------------------------------------------------------------------------
# Helpers.


@pytest.fixture(scope='module')
def data8(tmp_path_factory):
    """32 random 8x8 RGB PNGs: a dataset that needs nothing from outside the repository."""
    folder = tmp_path_factory.mktemp('data8')
    rng = np.random.default_rng(0)
    for i in range(32):
        PIL.Image.fromarray(rng.integers(0, 256, [8, 8, 3], dtype=np.uint8)).save(folder / f'{i:05d}.png')
    return str(folder)


@pytest.fixture(scope='module')
def trained_state(data8, tmp_path_factory):
    """A run dir after 64 images of tiny-edm: (run_dir, path of its training state)."""
    run_dir = tmp_path_factory.mktemp('trained')
    tl.training_loop(build_config('tiny-edm', data=data8, total_nimg=64), str(run_dir), torch.device('cpu'))
    return run_dir, tl.find_latest_state(str(run_dir))


def error_line(result) -> str:
    """The one 'Error:' line of a failed click run; fails on tracebacks or extra error lines."""
    assert result.exit_code not in (0, None), result.output
    assert 'Traceback' not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(lines) == 1, result.output
    return lines[0]


def run_train(*args):
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return CliRunner().invoke(train.main, ['--preset=tiny-edm', '--nosubdir'] + [str(a) for a in args])
    finally:
        dist.request_stop(False)
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class _Payload:
    """Unpickling this creates a marker file: stands for any code an attacker stores in a pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f'open({self.marker!r}, "w").close()',))

#----------------------------------------------------------------------------
# 1. Training states are read without running code from them.


def test_crafted_training_state_runs_no_code_unless_trusted(trained_state, data8, tmp_path):
    _, good = trained_state
    state = torch.load(good, weights_only=True)
    marker = tmp_path / 'pwned'
    state['extra'] = _Payload(marker)
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    crafted = run_dir / 'training-state-000000.pt'  # dropped into a shared run folder: picked up on rerun
    torch.save(state, crafted)
    line = error_line(run_train(f'--data={data8}', f'--outdir={run_dir}', '--duration=0.000096'))
    assert not marker.exists()
    assert str(crafted) in line and '--trust-pickle' in line and 'exec' in line, line
    result = run_train(f'--data={data8}', f'--outdir={run_dir}', '--duration=0.000096', '--trust-pickle')
    assert result.exit_code == 0, result.output
    assert marker.exists()  # the user's explicit choice
    assert torch.load(tl.find_latest_state(str(run_dir)), weights_only=True)['cur_nimg'] == 96


class Unknown(torch.nn.Module):
    """A module class the safe loader does not know."""


def test_transfer_names_the_opt_in_that_train_py_has(data8, tmp_path):
    with open(tmp_path / 'other.pkl', 'wb') as f:
        pickle.dump({'ema': Unknown()}, f)
    args = [f'--data={data8}', f'--transfer={tmp_path / "other.pkl"}', '--duration=0.000032']
    assert '--trust-pickle' in error_line(run_train(*args, f'--outdir={tmp_path / "a"}'))
    result = run_train(*args, f'--outdir={tmp_path / "b"}', '--trust-pickle')
    assert result.exit_code == 0, result.output


def test_training_states_load_with_weights_only(trained_state, tmp_path):
    _, path = trained_state
    state = torch.load(path, weights_only=True)  # nothing in a state needs unpickling code
    assert type(state['optimizer']['param_groups'][0]['lr']) is float
    # States written before lr was stored as a float hold a numpy scalar; those still load safely.
    state['optimizer']['param_groups'][0]['lr'] = np.float64(0.01)
    torch.save(state, tmp_path / 'old.pt')
    assert persistence.load_torch_file(tmp_path / 'old.pt')['optimizer']['param_groups'][0]['lr'] == 0.01


def test_reference_state_with_an_embedded_network_loads_through_the_safe_loader(tmp_path):
    # EDM's train.py saves training-state-*.pt as dict(net=<persistent module>, optimizer_state=...).
    net = _tiny_net()
    torch.save(dict(net=net, optimizer_state=torch.optim.Adam(net.parameters()).state_dict()), tmp_path / 'ref.pt')
    state = persistence.load_torch_file(tmp_path / 'ref.pt')
    assert type(state['net']).__module__ == 'training.preconditioning'  # our class, no embedded source run
    for a, b in zip(state['net'].parameters(), net.parameters()):
        assert torch.equal(a, b)

#----------------------------------------------------------------------------
# 2. Preemption: SIGTERM to the whole process group, DataLoader workers included.


def test_sigterm_to_process_group_with_workers_checkpoints_and_exits_0(data8, tmp_path):
    import psutil
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    cmd = [sys.executable, 'train.py', '--preset=tiny-edm', '--nosubdir', f'--data={data8}', f'--outdir={tmp_path}', '--workers=2',
           '--batch=16', '--duration=1', '--status=1M', '--snapshot=1M', '--checkpoint=1M']
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while 'Training from' not in ((tmp_path / 'log.txt').read_text() if (tmp_path / 'log.txt').exists() else ''):
            assert proc.poll() is None and time.time() < deadline, f'train.py did not start training (exit code {proc.poll()})'
            time.sleep(0.2)
        time.sleep(1.0)
        assert len(psutil.Process(proc.pid).children()) >= 2  # the workers are running
        os.killpg(proc.pid, signal.SIGTERM)  # as SLURM and `timeout` do
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output
    assert 'Traceback' not in output, output
    state = tl.find_latest_state(str(tmp_path))
    stopped_at = torch.load(state, weights_only=True)['cur_nimg']
    assert 0 < stopped_at < 10**6
    again = tl.training_loop(build_config('tiny-edm', data=data8, batch_size=16, total_nimg=stopped_at + 16),
                             str(tmp_path), torch.device('cpu'))
    assert again.cur_nimg == stopped_at + 16
    assert f'Resuming from "{state}"' in (tmp_path / 'log.txt').read_text()


def test_stop_with_a_dead_worker_still_checkpoints(data8, tmp_path, monkeypatch):
    # torch raises a dead worker from its SIGCHLD handler at any point of the main process; the run must
    # still save its state and stop cleanly.
    import psutil
    original, calls = tl.train_step, []
    def step_then_lose_a_worker(ctx):
        original(ctx)
        calls.append(ctx.cur_nimg)
        if len(calls) == 2:
            worker = psutil.Process(ctx.data_iter._workers[0].pid)
            worker.kill()
            worker.wait(10)
            time.sleep(0.2)  # let SIGCHLD arrive while the main process is busy
            dist.request_stop(True)
    monkeypatch.setattr(tl, 'train_step', step_then_lose_a_worker)
    try:
        result = tl.training_loop(build_config('tiny-edm', data=data8, batch_size=16, total_nimg=1024, workers=2,
                                               status_nimg=None, snapshot_nimg=None, checkpoint_nimg=None),
                                  str(tmp_path), torch.device('cpu'))
    finally:
        dist.request_stop(False)
    assert result.stopped and result.cur_nimg == 32
    assert torch.load(tl.find_latest_state(str(tmp_path)), weights_only=True)['cur_nimg'] == 32

@pytest.mark.parametrize('stop', [True, False])
def test_lost_worker_saves_the_state_before_the_step(data8, tmp_path, monkeypatch, stop):
    # When the next batch reveals a dead worker, nothing of the step has happened yet: the state saved
    # is the one before it; a stop request makes that a clean exit, else one error line.
    real_make_iterators = tl._make_iterators
    def failing_third_batch(ctx):
        real_make_iterators(ctx)
        real_iter = ctx.data_iter
        def batches():
            for _ in range(2):
                yield next(real_iter)
            dist.request_stop(stop)
            raise RuntimeError('DataLoader worker (pid(s) 12345) exited unexpectedly')
        ctx.data_iter = batches()
    monkeypatch.setattr(tl, '_make_iterators', failing_third_batch)
    cfg = build_config('tiny-edm', data=data8, batch_size=16, total_nimg=1024, status_nimg=None, checkpoint_nimg=None)
    try:
        if stop:
            result = tl.training_loop(cfg, str(tmp_path), torch.device('cpu'))
            assert result.stopped and result.cur_nimg == 32
        else:
            with pytest.raises(tl.DataLoaderWorkerError, match=r'^DataLoader worker \(pid\(s\) 12345\) exited unexpectedly; '
                                                               r'saved .*training-state-000000.pt; rerun the same command'):
                tl.training_loop(cfg, str(tmp_path), torch.device('cpu'))
    finally:
        dist.request_stop(False)
    assert torch.load(tl.find_latest_state(str(tmp_path)), weights_only=True)['cur_nimg'] == 32

#----------------------------------------------------------------------------
# 3. File-system faults: one line naming the path and the cause, exit code != 0.


@pytest.mark.parametrize('code,cause', [(errno.ENOSPC, 'no space left on device'), (errno.EROFS, 'read-only file system'),
                                        (errno.EACCES, 'permission denied'), (errno.ENOTDIR, 'a file is in the way')])
def test_write_error_names_path_and_cause(code, cause):
    err = dnnlib.util.write_error(OSError(code, os.strerror(code)), 'out/x.pt')
    assert str(err).startswith(cause) and str(err).endswith(' while writing out/x.pt'), str(err)
    assert isinstance(err, dnnlib.util.UserError) and '\n' not in str(err)
    assert dnnlib.util.write_error(ValueError('unrelated'), 'x') is None


def test_torch_writer_failure_on_a_full_disk_says_so(monkeypatch, tmp_path):
    # torch.save reports a failed write as '[enforce fail at inline_container.cc] unexpected pos', which never says "disk".
    err = RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')
    monkeypatch.setattr(dnnlib.util.shutil, 'disk_usage', lambda _p: type('U', (), dict(free=4096))())
    assert str(dnnlib.util.write_error(err, tmp_path / 's.pt')) == f'no space left on device while writing {tmp_path / "s.pt"}'


class _FullDisk:
    """os.fdopen stand-in: files whose writes fail with ENOSPC once `free` bytes are used up."""

    def __init__(self, free):
        self.free, self.real = free, os.fdopen

    def __call__(self, fd, *args, **kwargs):
        f, disk = self.real(fd, *args, **kwargs), self
        class File:
            def write(self, data):
                disk.free -= len(data)
                if disk.free < 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return f.write(data)
            def __getattr__(self, name):
                return getattr(f, name)
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                f.close()
        return File()


def test_train_on_a_full_disk_is_one_line_and_keeps_written_files(data8, trained_state, tmp_path, monkeypatch):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    _, state = trained_state
    (run_dir / 'training-state-000000.pt').write_bytes(open(state, 'rb').read())
    monkeypatch.setattr(os, 'fdopen', _FullDisk(free=20_000))  # the json files fit, a training state does not
    line = error_line(run_train(f'--data={data8}', f'--outdir={run_dir}', '--duration=0.000096'))
    monkeypatch.undo()
    assert 'no space left on device while writing' in line and str(run_dir) in line, line
    assert not [f for f in os.listdir(run_dir) if f.endswith('.tmp')]
    assert torch.load(run_dir / 'training-state-000000.pt', weights_only=True)['cur_nimg'] == 64  # still loadable
    json.loads((run_dir / 'run_config.json').read_text())
    # The training state itself: torch.save reports the failed write as 'unexpected pos'.
    monkeypatch.setattr(os, 'fdopen', _FullDisk(free=100_000))
    cfg = dataclasses.replace(build_config('tiny-edm', data=data8, total_nimg=96), snapshot_nimg=None)
    with pytest.raises(dnnlib.util.WriteError, match=r'^no space left on device while writing .*training-state-000000.pt$'):
        tl.training_loop(cfg, str(run_dir), torch.device('cpu'))
    monkeypatch.undo()
    assert torch.load(run_dir / 'training-state-000000.pt', weights_only=True)['cur_nimg'] == 64


def test_outdir_that_is_a_file(data8, tmp_path):
    (tmp_path / 'file').write_text('not a folder')
    line = error_line(run_train(f'--data={data8}', f'--outdir={tmp_path / "file"}', '--duration=0.000032'))
    assert f'a file is in the way (expected a folder) while writing {tmp_path / "file"}' in line, line
    net = dnnlib.util.EasyDict(ema=_tiny_net())
    persistence.save_pickle(net, tmp_path / 'net.pkl')
    result = CliRunner().invoke(generate.main, [f'--net={tmp_path / "net.pkl"}', f'--outdir={tmp_path / "file"}',
                                                '--seeds=0', '--steps=2', '--device=cpu'])
    assert f'while writing {tmp_path / "file"}' in error_line(result)


def test_read_only_generate_outdir_and_dataset_dest(data8, tmp_path, monkeypatch):
    persistence.save_pickle(dict(ema=_tiny_net()), tmp_path / 'net.pkl')
    real_makedirs = os.makedirs
    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / 'ro')):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_makedirs(path, *args, **kwargs)
    monkeypatch.setattr(os, 'makedirs', read_only)
    result = CliRunner().invoke(generate.main, [f'--net={tmp_path / "net.pkl"}', f'--outdir={tmp_path / "ro" / "imgs"}',
                                                '--seeds=0', '--steps=2', '--device=cpu'])
    assert f'read-only file system while writing {tmp_path / "ro" / "imgs"}' in error_line(result)
    result = CliRunner().invoke(dataset_tool, ['convert', f'--source={data8}', f'--dest={tmp_path / "ro" / "d.zip"}'])
    assert f'read-only file system while writing {tmp_path / "ro" / "d.zip"}' in error_line(result)


def test_dataset_tool_on_a_full_disk_leaves_no_temp_zip(data8, tmp_path, monkeypatch):
    real_writestr = zipfile.ZipFile.writestr
    def full(self, name, data, *args, **kwargs):
        if name.endswith('00020.png'):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_writestr(self, name, data, *args, **kwargs)
    def close_fails(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # closing writes the central directory
    monkeypatch.setattr(zipfile.ZipFile, 'writestr', full)
    monkeypatch.setattr(zipfile.ZipFile, 'close', close_fails)
    result = CliRunner().invoke(dataset_tool, ['convert', f'--source={data8}', f'--dest={tmp_path / "d.zip"}', '--workers=1'])
    monkeypatch.undo()
    assert f'no space left on device while writing {tmp_path / "d.zip"}' in error_line(result)
    assert os.listdir(tmp_path) == []


def _tiny_net():
    from training.networks import EDMPrecond
    return EDMPrecond(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=16, channel_mult=[1],
                      num_blocks=1, attn_resolutions=[]).eval().requires_grad_(False)

#----------------------------------------------------------------------------
# 4. Temporary files that kills left behind are removed on rerun.


def test_rerun_removes_stale_temp_files(data8, tmp_path):
    for name in ['training-state-000064.pt.k3j_x9a2.tmp', 'network-snapshot-000064.pkl.ab12cd34.tmp',
                 'training_options.json.0a1b2c3d.tmp']:
        (tmp_path / name).write_bytes(b'half-written')
    for name in ['notes.tmp', 'my.data.tmp', 'notes.txt.12345678.tmp']:
        (tmp_path / name).write_text('the user\'s own')
    tl.training_loop(build_config('tiny-edm', data=data8, total_nimg=32), str(tmp_path), torch.device('cpu'))
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith('.tmp')) == ['my.data.tmp', 'notes.tmp', 'notes.txt.12345678.tmp']
    assert 'Removed 3 temporary file(s)' in (tmp_path / 'log.txt').read_text()


def test_dataset_tool_removes_its_stale_temp_outputs(data8, tmp_path):
    (tmp_path / '.d.zip.x1y2z3w4.tmp').write_bytes(b'half a zip')
    (tmp_path / '.d.x1y2z3w4.tmp').mkdir()  # a folder output of another --dest: not ours
    (tmp_path / '.other.zip.x1y2z3w4.tmp').write_bytes(b'another --dest')
    result = CliRunner().invoke(dataset_tool, ['convert', f'--source={data8}', f'--dest={tmp_path / "d.zip"}'])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == ['.d.x1y2z3w4.tmp', '.other.zip.x1y2z3w4.tmp', 'd.zip']


def test_generate_removes_old_temp_pngs(tmp_path):
    from training import presets_generate, sampling
    for name, age in [('000000.png.abcd1234.tmp', 3600), ('000001.png.abcd1234.tmp', 0)]:
        (tmp_path / name).write_bytes(b'x')
        os.utime(tmp_path / name, (time.time() - age,) * 2)
    sampling._prepare_outputs(presets_generate.build_config(None, outdir=str(tmp_path), net='x.pkl'))
    assert os.listdir(tmp_path) == ['000001.png.abcd1234.tmp']  # young: maybe another generate.py writes it now

#----------------------------------------------------------------------------
# 5. Bad --resume files: one line naming the file and what is wrong.


@pytest.mark.parametrize('kind', ['random', 'truncated', 'architecture', 'not_a_state'])
def test_bad_resume_file_is_one_clear_line(kind, trained_state, data8, tmp_path):
    _, good = trained_state
    path = tmp_path / f'{kind}.pt'
    data = open(good, 'rb').read()
    if kind == 'random':
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == 'truncated':
        path.write_bytes(data[:len(data) // 2])
    elif kind == 'not_a_state':
        torch.save({'weights': torch.zeros(3)}, path)
    else:
        path.write_bytes(data)
    extra = ['--cbase=32'] if kind == 'architecture' else []
    line = error_line(run_train(f'--data={data8}', f'--outdir={tmp_path / "run"}', f'--resume={path}',
                                '--duration=0.000096', *extra))
    assert str(path) in line and len(line) < 1000, line
    expected = {'random': 'not a training state', 'truncated': 'truncated', 'not_a_state': 'format_version',
                'architecture': 'of other shape'}[kind]
    assert expected in line, line
    if kind == 'architecture':
        assert 'model_channels=16 in the file, 32 here' in line, line


def test_resume_with_other_ema_profiles_names_the_difference(data8, tmp_path):
    common = dict(data=data8, total_nimg=32, status_nimg=None, snapshot_nimg=None)
    tl.training_loop(build_config('tiny-edm2', **common, ema_stds=(0.05,)), str(tmp_path), torch.device('cpu'))
    with pytest.raises(ValueError, match=r'other options \(ema_stds: \[0.05\] -> \[0.05, 0.1\]\)'):
        tl.setup(build_config('tiny-edm2', **common, ema_stds=(0.05, 0.1)), str(tmp_path), torch.device('cpu'))
    # Past the option check (--allow-option-change), the state itself names the mismatch.
    with pytest.raises(ValueError, match=r'training-state-0000000.pt: .*1 EMA profiles in the file, 2 here'):
        tl.setup(build_config('tiny-edm2', **common, ema_stds=(0.05, 0.1), allow_option_change=True), str(tmp_path),
                 torch.device('cpu'))

#----------------------------------------------------------------------------
# 6. dataset_tool: bad input is an error, --dest is never overwritten without --force.


def test_dataset_tool_rejects_empty_sources_and_unknown_labels(data8, tmp_path):
    (tmp_path / 'empty').mkdir()
    line = error_line(CliRunner().invoke(dataset_tool, ['convert', f'--source={tmp_path / "empty"}', f'--dest={tmp_path / "o"}']))
    assert 'holds no images' in line and not (tmp_path / 'o').exists()
    line = error_line(CliRunner().invoke(dataset_tool, ['convert', f'--source={data8}', f'--dest={tmp_path / "o"}', '--max-images=0']))
    assert '--max-images=0' in line
    src = tmp_path / 'labelled'
    src.mkdir()
    names = sorted(os.listdir(data8))[:4]
    for name in names:
        (src / name).write_bytes(open(os.path.join(data8, name), 'rb').read())
    (src / 'dataset.json').write_text(json.dumps({'labels': [[n, 1] for n in names] + [['missing.png', 0]]}))
    line = error_line(CliRunner().invoke(dataset_tool, ['convert', f'--source={src}', f'--dest={tmp_path / "o"}']))
    assert 'missing.png' in line and 'labels 1 files that are not images of the source' in line


def test_dataset_tool_needs_force_to_replace_dest(data8, tmp_path):
    for dest in [tmp_path / 'd.zip', tmp_path / 'd']:
        args = ['convert', f'--source={data8}', f'--dest={dest}', '--max-images=4']
        assert CliRunner().invoke(dataset_tool, args).exit_code == 0
        assert '--force' in error_line(CliRunner().invoke(dataset_tool, args[:-1] + ['--max-images=2']))
        assert len(_names(dest)) == 5  # 4 images + dataset.json: untouched
        assert CliRunner().invoke(dataset_tool, args[:-1] + ['--max-images=2', '--force']).exit_code == 0
        assert len(_names(dest)) == 3
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'thesis.tex').write_text('precious')
    line = error_line(CliRunner().invoke(dataset_tool, ['convert', f'--source={data8}', f'--dest={tmp_path / "mine"}', '--force']))
    assert 'only dataset folders' in line and os.listdir(tmp_path / 'mine') == ['thesis.tex']
    assert [f for f in os.listdir(tmp_path) if f.endswith('.tmp')] == []


def _names(dest):
    if str(dest).endswith('.zip'):
        with zipfile.ZipFile(dest) as z:
            return [n for n in z.namelist() if not n.endswith('/')]
    return [os.path.join(r, f) for r, _d, fs in os.walk(dest) for f in fs]

#----------------------------------------------------------------------------
# 7. reconstruct_phema warns when the input snapshots come from different runs.


def test_reconstruct_warns_for_snapshots_of_different_runs(tmp_path):
    from training.networks_edm2 import Precond
    def snapshot(path, dropout, data):
        net = Precond(img_resolution=8, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1],
                      num_blocks=1, attn_resolutions=[], dropout=dropout)
        persistence.save_pickle(dict(ema=net, dataset_kwargs=dict(path=data), loss_fn=None, encoder=None), path)
    snapshot(tmp_path / 'network-snapshot-0000002-0.050.pkl', 0.0, 'a.zip')
    snapshot(tmp_path / 'network-snapshot-0000004-0.050.pkl', 0.0, 'a.zip')
    pkls = phema.list_input_pickles(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        list(phema.reconstruct_phema(pkls, out_std=0.05, verbose=False))  # one run: no warning
    snapshot(tmp_path / 'network-snapshot-0000006-0.050.pkl', 0.1, 'b.zip')
    pkls = phema.list_input_pickles(str(tmp_path))
    with pytest.warns(UserWarning) as record:
        list(phema.reconstruct_phema(pkls, out_std=0.05, verbose=False))
    text = ' '.join(str(w.message) for w in record)
    assert 'architecture (dropout: 0.0 vs 0.1)' in text and "dataset (path: 'a.zip' vs 'b.zip')" in text
