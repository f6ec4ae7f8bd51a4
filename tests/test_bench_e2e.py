"""Tests of `python -m bench --mode=e2e`: tiny CPU rows end to end, failures, and the arithmetic of rates and ratios."""

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from bench import e2e, e2e_inputs, e2e_measure, e2e_rows, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_cpu_rows_end_to_end(tmp_path):
    out = tmp_path / 'e2e.json'
    proc = subprocess.run([sys.executable, '-m', 'bench', '--mode=e2e', '--device=cpu', '--rows=train-fp32,gen-fp32',
                           f'--workdir={tmp_path / "work"}', f'--out={out}', '--time-limit=200'],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    meta = data['meta']
    assert meta['mode'] == 'e2e' and meta['device'] == 'cpu' and meta['size'] == 'tiny'
    assert meta['rows'] == ['train-fp32', 'gen-fp32'] and meta['time_limit_s'] == 200 and meta['torch']
    assert meta['command'].startswith('python -m bench --mode=e2e --device=cpu --rows=train-fp32,gen-fp32 ')
    assert meta['date'] and len(meta['load_average']) == 3 and 'git_commit' in meta  # None outside a git checkout
    train, gen = data['results']
    for record in (train, gen):
        assert record['ok'] and 'error' not in record, record
        assert record['images_per_s'] > 0 and record['startup_s'] > 0 and record['wall_s'] > record['startup_s']
        assert record['peak_mem_kind'] == 'rss_tree' and record['peak_mem_mb'] > 50  # a Python process with torch
        assert record['vs_fp32'] == 1.0  # each is its group's fp32 row
    assert train['command'].startswith('python train.py ') and '--arch=ddpmpp --cond=1' in train['command']
    assert train['vs_ref'] is None  # train-fp16 did not run
    assert train['startup_kind'] == 'first_status_line' and len(train['ticks']) == 4  # tick 0 (batch 8), then per 16
    assert train['images_per_s'] == pytest.approx(e2e_measure.steady_train_rate(train['ticks']))
    assert train['startup_fixed_s'] == pytest.approx(train['startup_s'] - 8 / train['images_per_s'])  # first tick: one batch of 8
    assert gen['startup_fixed_s'] == pytest.approx(gen['startup_s'] - 4 / gen['images_per_s'])  # first batch: 4 images
    assert gen['command'].startswith('python -m bench.reference_kernels generate.py --network=') and gen['vs_ref'] == 1.0
    assert gen['startup_kind'] == 'first_image' and gen['images'] == 8 and gen['batch'] == 4
    assert f'--network={tmp_path / "work" / "runs" / "train-fp32"}/network-snapshot-' in gen['command']  # reused
    assert 'python train.py' in proc.stdout and str(out) in proc.stdout  # the table names each command


def test_tiny_cpu_edm2_guided_rows_end_to_end(tmp_path):
    out, work = tmp_path / 'e2e.json', tmp_path / 'work'
    proc = subprocess.run([sys.executable, '-m', 'bench', '--mode=e2e', '--device=cpu', '--rows=edm2-gen-*',
                           f'--workdir={work}', f'--out={out}', '--time-limit=200'],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = json.loads(out.read_text())['results']
    assert [r['row'] for r in records] == ['edm2-gen-ref', 'edm2-gen-ours', 'edm2-gen-fast', 'edm2-gen-fast-batched']
    for record in records:
        assert record['ok'] and 'error' not in record, record
        assert record['images_per_s'] > 0 and record['images'] == 8 and record['batch'] == 4
        assert record['vs_ref'] > 0 and record['vs_fp32'] is None  # the group has no fp32 row
    ref, ours, fast, batched = records
    assert ref['vs_ref'] == 1.0 and ref['script'] == 'generate_images.py' and 'compile_cache' not in ref
    assert ours['command'].startswith('python generate.py --net=') and 'compile_cache' not in ours
    assert ref['command'].startswith('python -m bench.reference_kernels generate_images.py --net=')
    assert fast['command'].startswith(f'TORCHINDUCTOR_CACHE_DIR={work}/compile-cache/edm2-gen-fast python generate.py --net=')
    same = ' --guidance=1.4 --outdir={} --seeds=0-7 --batch=4 --steps=4 --device=cpu'
    assert same.format(work / 'runs' / 'edm2-gen-ref') in ref['command'] and fast['command'].endswith(' --fast')
    assert ours['command'].endswith(same.format(work / 'runs' / 'edm2-gen-ours'))
    assert batched['command'].endswith(' --fast --batched-guidance')
    # The made pickles decode with the bench's VAE: 8 PNGs per row, 8x the 64x64 latents.
    import PIL.Image
    for record in records:
        pngs = sorted((work / 'runs' / record['row']).glob('*.png'))
        assert len(pngs) == 8 and all(PIL.Image.open(p).size == (512, 512) for p in pngs)
    from torch_utils import persistence
    from training.guidance import same_architecture
    net, gnet = [persistence.load_pickle(e2e_inputs.Workspace(str(work), 'tiny', 'cpu', None, None).path(key))
                 for key in ('edm2_net', 'edm2_gnet')]  # found in the work folder, not made again
    assert net['encoder'].vae_name == gnet['encoder'].init_kwargs['vae_name'] == str(work / 'vae-tiny')
    assert (net['ema'].img_resolution, net['ema'].label_dim) == (gnet['ema'].img_resolution, gnet['ema'].label_dim) == (64, 1000)
    assert not same_architecture(net['ema'], gnet['ema'])  # S and XS: batched guidance overlaps them, as at full size


def test_failed_and_killed_rows_are_recorded_with_one_line(tmp_path):
    ws = e2e_inputs.Workspace(str(tmp_path), 'tiny', 'cpu', images=16, vae=None)
    bad = e2e.run_row(e2e_rows.Row('bad', 'train', ('--compile', '--lr=-1')), ws, time_limit_s=120, gpu=None, env={})
    assert not bad['ok'] and bad['error'].startswith('exit code 2: Error: ') and '--lr' in bad['error'] and '\n' not in bad['error']
    assert bad['compile_cache'] == 'cold' and bad['command'].startswith(f'TORCHINDUCTOR_CACHE_DIR={tmp_path}/compile-cache/bad python train.py ')
    slow = e2e.run_row(e2e_rows.Row('slow', 'train', ('--duration=1M',)), ws, time_limit_s=1, gpu=None, env={})
    assert not slow['ok'] and slow['error'] == 'killed after the time limit of 1 s' and slow['wall_s'] < 60
    good = _record('good', 'train', 5.0, 100.0, ref=True, fp32=True)
    records = e2e.add_ratios([bad, slow, good])
    assert bad['vs_ref'] is None and good['vs_ref'] == 1.0
    table = e2e.format_table(records).splitlines()
    assert table[2].startswith('bad') and ' failed ' in table[2] and table[3].strip().startswith('error: exit code 2')
    assert table[5].strip() == 'error: killed after the time limit of 1 s'
    markdown = e2e.format_table(records, markdown=True).splitlines()
    assert markdown[2].startswith('| bad | failed |') and markdown[2].endswith(' failed: ' + bad['error'] + ' |')


def _record(name, group, ips, mem, ref=False, fp32=False, ok=True):
    return dict(row=name, group=group, ref=ref, fp32=fp32, ok=ok, images_per_s=ips, peak_mem_mb=mem, startup_s=1.0,
                command=f'python x.py --{name}', **({} if ok else dict(error='boom')))


def test_ratios_are_taken_within_each_group():
    records = e2e.add_ratios([
        _record('fp16', 'train', 1600.0, 4000.0, ref=True), _record('fp32', 'train', 800.0, 8000.0, fp32=True),
        _record('fast', 'train', 2400.0, 3000.0), _record('gen', 'generate', 80.0, 500.0, ref=True, fp32=True),
        _record('gen-bf16', 'generate', 100.0, 400.0), _record('broken', 'generate', None, None, ok=False)])
    fp16, fp32, fast, gen, bf16, broken = records
    assert (fp16['vs_ref'], fp16['vs_fp32']) == (1.0, 2.0) and (fp32['vs_ref'], fp32['vs_fp32']) == (0.5, 1.0)
    assert fast['vs_ref'] == 1.5 and fast['vs_fp32'] == 3.0 and fast['mem_vs_ref'] == 0.75
    assert bf16['vs_ref'] == bf16['vs_fp32'] == 1.25 and gen['vs_ref'] == 1.0
    assert broken['vs_ref'] is None and broken['vs_fp32'] is None
    # Without its reference row in the run, a group has no ref ratio; a failed reference counts as absent.
    alone = e2e.add_ratios([_record('fp16', 'train', None, None, ref=True, ok=False), _record('fp32', 'train', 800.0, 1.0, fp32=True)])
    assert alone[1]['vs_ref'] is None and alone[1]['vs_fp32'] == 1.0
    table = e2e.format_table(records, markdown=True).splitlines()
    assert table[0] == '| ' + ' | '.join(e2e.TABLE_HEAD) + ' |'
    assert table[4] == '| fast | 2400.0 | 1.0 | 3000 | 1.50x | 3.00x | `python x.py --fast` |'


def test_steady_rates_leave_out_the_start():
    ticks = [dict(timestamp=100.0, kimg=1.0), dict(timestamp=102.0, kimg=2.0), dict(timestamp=104.0, kimg=3.0)]
    assert e2e_measure.steady_train_rate(ticks) == 500.0  # 2000 images in 4 s after the first tick
    with pytest.raises(RuntimeError, match='1 status tick'):
        e2e_measure.steady_train_rate(ticks[:1])
    mtimes = [10.0] * 4 + [12.0] * 4 + [14.0] * 4  # three batches of 4
    assert e2e_measure.steady_image_rate(mtimes, 4) == 2.0  # 8 images in the 4 s after the first batch
    with pytest.raises(RuntimeError, match='more than one batch'):
        e2e_measure.steady_image_rate(mtimes[:4], 4)
    segments = [(1.0, 'CPU threads: 1'), (2.0, '  0%|          | 0/8 [00:00<?, ?batch/s]'),
                (3.0, ' 25%|##        | 2/8 [00:01<00:03, 2.00batch/s]'), (5.0, '100%|##########| 8/8 [00:03<00:00, 2.7batch/s]'),
                (5.1, '100%|##########| 8/8 [00:03<00:00, 2.7batch/s]')]
    points = e2e_measure.progress_points(segments)
    assert [(t, n, total, unit) for t, n, total, unit in points] == [(2.0, 0, 8, 'batch'), (3.0, 2, 8, 'batch'), (5.0, 8, 8, 'batch')]
    rate, first, images_before = e2e_measure.steady_progress_rate(points, images_per_unit=10, num_images=75)
    assert first == 3.0 and images_before == 20 and rate == (75 - 20) / 2.0  # the last batch is partial: 75, not 80
    assert e2e_measure.fixed_startup(first, images_before, rate) == pytest.approx(3.0 - 20 / 27.5)
    with pytest.raises(RuntimeError, match='too little to time'):  # all counts shown at once: no rate
        e2e_measure.steady_progress_rate([(3.0, 2, 8, 'batch'), (3.01, 8, 8, 'batch')], 10, None)


def test_row_selection_and_option_errors(tmp_path):
    assert [r.name for r in e2e.select_rows('gen-fp32,train-fp1*')] == ['train-fp16', 'train-fp16-ours', 'train-fp16-compile', 'gen-fp32']
    assert e2e.select_rows(None) == e2e_rows.ROWS
    assert e2e_inputs.flag_value(['--batch=8', '--batch', '16'], '--batch') == '16'
    names = [r.name for r in e2e_rows.ROWS]
    assert len(set(names)) == len(names) and all(r.group in e2e_rows.GROUPS for r in e2e_rows.ROWS)
    for group in e2e_rows.GROUPS:  # one reference row per group, one fp32 row except where the reference is fp16 only
        assert sum(r.ref for r in e2e_rows.ROWS if r.group == group) == 1
        assert sum(r.fp32 for r in e2e_rows.ROWS if r.group == group) == (group != 'edm2-gen')
    # A reference row runs on the reference's layers (bench.reference_kernels), which a compiling row could not
    assert not [r.name for r in e2e_rows.ROWS if r.ref and set(r.args) & set(e2e_rows.COMPILE_FLAGS)]
    runner = CliRunner()
    out = str(tmp_path / 'x.json')
    result = runner.invoke(run.main, ['--mode=e2e', '--device=cpu', '--rows=train-fp32,nope*', f'--out={out}'])
    assert result.exit_code == 2 and 'nope* matches no row' in result.output and 'train-fp16' in result.output
    result = runner.invoke(run.main, ['--device=cpu', '--rows=train-fp32', f'--out={out}'])
    assert result.exit_code == 2 and '--rows only apply to --mode=e2e' in result.output
    result = runner.invoke(run.main, ['--mode=e2e', '--device=cpu', '--tasks=train', '--reps=2', f'--out={out}'])
    assert result.exit_code == 2 and '--tasks, --reps only apply to --mode=steps' in result.output
    assert not os.path.exists(out)


def test_gpu_memory_is_read_for_the_gpu_the_scripts_see(monkeypatch):
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '3,GPU-abc')
    assert e2e_measure.physical_gpu(None) == '3' and e2e_measure.physical_gpu(1) == 'GPU-abc'
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES')
    assert e2e_measure.physical_gpu(None) == '0' and e2e_measure.physical_gpu(2) == '2'
    monkeypatch.setenv('PATH', '')  # no nvidia-smi: the peak is unknown, not zero
    poller = e2e_measure.MemoryPoller(os.getpid(), '0', interval_s=0.1)
    assert poller.kind == 'unavailable' and poller.stop() is None


def test_made_inputs_are_what_the_scripts_read(tmp_path):
    from training import dataset, metrics
    latents = dataset.ImageFolderDataset(path=e2e_inputs.make_latent_dataset(str(tmp_path / 'latents.zip'), 3, 8),
                                         use_labels=True)
    image, label = latents[2]
    assert len(latents) == 3 and image.shape == (8, 8, 8) and image.dtype == 'float32' and latents.label_dim == 1000
    assert (image[4:] > 0).all() and label.argmax() == 999  # std channels positive; labels 0, 500, 999
    ref = metrics.load_stats(e2e_inputs.make_fid_ref(str(tmp_path / 'ref.npz'), dim=16))
    assert ref['fid']['mu'].shape == (16,) and (ref['fid']['sigma'] == np.eye(16)).all()
    assert sorted(os.listdir(tmp_path)) == ['latents.zip', 'ref.npz']  # no temporary files left


def test_cuda_memory_paths_with_a_stand_in_nvidia_smi(tmp_path, monkeypatch):
    # The GPU branches on a CPU machine: nvidia-smi is a script printing the number in used.txt.
    used = tmp_path / 'used.txt'
    used.write_text('1000\n')
    tool = tmp_path / 'nvidia-smi'
    tool.write_text(f'#!/bin/sh\ncat {used}\n')
    tool.chmod(0o755)
    monkeypatch.setenv('PATH', f'{tmp_path}:{os.environ["PATH"]}')
    poller = e2e_measure.MemoryPoller(os.getpid(), '0', interval_s=0.02)
    used.write_text('3500\n')
    time.sleep(0.5)
    used.write_text('1200\n')
    time.sleep(0.2)
    assert poller.kind == 'nvidia_smi_delta' and poller.stop() == 2500  # above the level before the start
    # train.py on CUDA: its own peak (max over ticks) is the row's figure; EDM2 stats lines hold plain means.
    lines = [dict(timestamp=10.0 + 2 * i, **{'Progress/kimg': 1.0 + i, 'Timing/sec_per_kimg': 1.5 + i,
                                             'Resources/peak_gpu_mem_gb': [2.0, 3.0, 2.5][i]}) for i in range(3)]
    (tmp_path / 'stats.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines))
    run_info = dict(stdout=[(4.0, 'Training ...'), (12.5, 'Status: kimg 1.0 ...')], peak_mem_mb=4000.0,
                    peak_mem_kind='nvidia_smi_delta')
    result = e2e_measure.measure_train(run_info, str(tmp_path), on_cuda=True)
    assert result['images_per_s'] == 500.0 and result['startup_s'] == 12.5 and result['startup_fixed_s'] == 10.5
    assert result['peak_mem_mb'] == 3 * 1024 and result['peak_mem_kind'] == 'torch_max_allocated'
    assert result['peak_mem_polled_mb'] == 4000.0 and result['images_per_s_train_only'] == 1e3 / 3.0  # median of 2.5, 3.5


def test_output_segments_are_timed_by_their_first_byte():
    read_fd, write_fd = os.pipe()
    sink, start = [], time.time()
    reader = threading.Thread(target=e2e_measure._read_segments, args=(os.fdopen(read_fd, 'rb'), sink, start))
    reader.start()
    for piece in (b'\r 0/2 [', b'00:00]', b'\rbar 1/2', b'\rbar 2/2', b'\nStatus: kimg 1', b'.0\nDone'):
        os.write(write_fd, piece)
        time.sleep(0.15)
    os.close(write_fd)
    reader.join(10)
    assert [text for _, text in sink] == [' 0/2 [00:00]', 'bar 1/2', 'bar 2/2', 'Status: kimg 1.0', 'Done']
    times = [t for t, _ in sink]
    steps = [round((t - times[0]) / 0.15) for t in times]
    assert steps == [0, 2, 3, 4, 5]  # each from the write of its first byte, not from the next line's


def test_compiling_rows_get_their_own_cold_or_warm_cache(tmp_path):
    ws = e2e_inputs.Workspace(str(tmp_path), 'tiny', 'cpu', images=None, vae=None)
    assert ws.compile_cache(e2e_rows.Row('eager', 'train', ('--bf16=1',))) is None
    cold = e2e_rows.Row('c', 'train', ('--compile',))
    path, state = ws.compile_cache(cold)
    assert path == str(tmp_path / 'compile-cache' / 'c') and state == 'cold'
    rerun = e2e_rows.Row('c-rerun', 'train', ('--compile',), warm_from='c')
    assert ws.compile_cache(rerun) == (path, 'cold (c left no cache)')
    os.makedirs(os.path.join(path, 'fxgraph'))
    assert ws.compile_cache(rerun) == (path, 'warm from c')
    assert ws.compile_cache(cold) == (path, 'cold') and not os.path.exists(os.path.join(path, 'fxgraph'))  # emptied
    names = [r.name for r in e2e_rows.ROWS]
    for row in e2e_rows.ROWS:  # a rerun follows the row it reruns, with the same command
        if row.warm_from is not None:
            first = e2e_rows.ROWS[names.index(row.warm_from)]
            assert names.index(row.warm_from) < names.index(row.name) and (first.group, first.args) == (row.group, row.args)


def test_compiling_rows_carry_a_compile_report(tmp_path):
    """A row that compiles runs under bench.compile_report; its record says what the start-up compiled and why a
    cache missed, while its command stays the user's. TORCH_COMPILE_DISABLE keeps the CPU from compiling."""
    ws = e2e_inputs.Workspace(str(tmp_path), 'tiny', 'cpu', images=16, vae=None)
    (tmp_path / 'compile-reports').mkdir()
    (tmp_path / 'compile-reports' / 'gen-compiled.json').write_text('{"left": "by an earlier run"}')
    row = e2e_rows.Row('gen-compiled', 'generate', ('--compile',))
    record = e2e.run_row(row, ws, time_limit_s=200, gpu=None, env=dict(TORCH_COMPILE_DISABLE='1'))
    assert record['ok'], record
    assert record['command'].startswith(f'TORCH_COMPILE_DISABLE=1 TORCHINDUCTOR_CACHE_DIR={tmp_path}/compile-cache/gen-compiled '
                                        'python generate.py ')
    report = record['compile_report']
    assert report['process_s'] > 0 and report['bypass_reasons'] == [] and report['dynamo_s'] == 0.0
    plain = e2e.run_row(e2e_rows.Row('gen-plain', 'generate', ()), ws, time_limit_s=200, gpu=None, env={})
    assert plain['ok'] and 'compile_report' not in plain


def test_reference_kernels_wrapper_runs_the_script_on_the_reference_layers(tmp_path):
    """python -m bench.reference_kernels SCRIPT: the script runs as __main__ with its arguments, on einsum attention
    and convolution resampling."""
    script = tmp_path / 'script.py'
    script.write_text('import sys\nfrom training import networks\n'
                      'print(__name__, sys.argv[1:], networks.get_attention_impl(), networks.get_resample_impl(),\n'
                      '      networks._backend["weights"])\n')
    proc = subprocess.run([sys.executable, '-m', 'bench.reference_kernels', str(script), '--x=1'],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ['__main__', "['--x=1']", 'reference', 'reference', 'reference']
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, check=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.stdout.split()[-3:] == ['auto', 'auto', 'auto']  # our layers without the wrapper
