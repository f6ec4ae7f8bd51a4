"""Tests of the benchmark harness (python -m bench): end-to-end smoke run, JSON layout, timing helpers."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from bench import run, timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANT_KEYS = {'median_s', 'times_s', 'images_per_s', 'peak_mem_mb', 'peak_mem_kind'}


def test_quick_cpu_run_writes_complete_json(tmp_path):
    out = tmp_path / 'results.json'
    proc = subprocess.run([sys.executable, '-m', 'bench', '--device', 'cpu', '--size', 'tiny', '--reps', '1', '--quick',
                           '--out', str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    meta = data['meta']
    assert meta['device'] == 'cpu' and meta['size'] == 'quick' and meta['reps'] == 1 and meta['statistic'] == 'median'
    assert set(meta['variants']) == {'reference', 'fast'} and meta['peak_tflops']['fp32'] > 0
    records = {(r['task'], r['config']): r for r in data['results']}
    assert [task for task, _ in records] == ['train'] * 4 + ['sample'] * 3 + ['fid', 'encode']
    assert {c for t, c in records if t == 'train'} == {'ddpmpp-cifar10', 'adm-imagenet64', 'edm2-xs', 'edm2-s'}
    for (task, config), record in records.items():
        if 'skipped' in record:  # only the FID detector may be unavailable
            assert task == 'fid', record
            continue
        assert set(record['variants']) == {'reference', 'fast'}
        for result in record['variants'].values():
            assert VARIANT_KEYS <= set(result) and len(result['times_s']) == 1 and result['images_per_s'] > 0
            assert result['peak_mem_kind'] == 'rss_delta' and result['peak_mem_mb'] >= 0
        assert record['speedup'] == pytest.approx(record['variants']['fast']['images_per_s'] / record['variants']['reference']['images_per_s'])
        if task in ('train', 'sample'):
            assert record['flops_per_call'] > 0 and all(0 < v['mfu'] for v in record['variants'].values())
    guided = next(r for (t, c), r in records.items() if c.endswith('guided'))
    assert guided['variants']['fast']['batched_guidance'] and not guided['variants']['reference']['batched_guidance']
    assert 'speedup' in proc.stdout and str(out) in proc.stdout


def test_bad_options_are_reported_cleanly(tmp_path):
    runner = CliRunner()
    result = runner.invoke(run.main, ['--device', 'cpu', '--tasks', 'train,render', '--out', str(tmp_path / 'x.json')])
    assert result.exit_code == 2 and 'render not known' in result.output and 'train, sample, fid, encode' in result.output
    result = runner.invoke(run.main, ['--device', 'tpu', '--out', str(tmp_path / 'x.json')])
    assert result.exit_code == 1 and 'Error:' in result.output and '--device' in result.output
    assert not (tmp_path / 'x.json').exists()


def test_time_call_reports_median_of_synchronised_reps():
    calls = []
    result = timing.time_call(lambda: calls.append(time.sleep(0.002 * (len(calls) + 1))), torch.device('cpu'), warmup=2, reps=3)
    assert len(calls) == 5 and len(result['times_s']) == 3
    assert result['median_s'] == sorted(result['times_s'])[1] and result['median_s'] >= 0.008
    with pytest.raises(ValueError, match='reps'):
        timing.time_call(lambda: None, torch.device('cpu'), reps=0)


def test_peak_memory_sees_a_large_cpu_allocation():
    with timing.peak_memory(torch.device('cpu')) as memory:
        block = torch.ones(64, 2**20)  # 256 MiB, touched
        time.sleep(0.05)
        del block
    assert memory['peak_mem_kind'] == 'rss_delta' and 200 < memory['peak_mem_mb'] < 1000


def test_table_lists_ratios_and_skips():
    variant = dict(images_per_s=10.0, peak_mem_mb=100.0, mfu=0.25)
    record = run.add_ratios(dict(task='train', config='x', batch=4,
                                 variants=dict(reference=dict(variant), fast=dict(variant, images_per_s=30.0, peak_mem_mb=50.0))))
    assert record['speedup'] == 3 and record['mem_ratio'] == 0.5
    table = run.format_table([record, dict(task='fid', config='inception-v3', skipped='no detector')])
    assert '3.00x' in table and '25.0%' in table and 'skipped: no detector' in table


def test_detector_timing_counts_warmup_and_images():
    from bench import metrics_bench
    from training import detectors
    calls = []

    class Stub(detectors.Detector):
        def __call__(self, images):
            calls.append(tuple(images.shape))
            return torch.zeros(images.shape[0], 4)

    rec = metrics_bench.time_detector(Stub('stub', 4), num=10, batch=4, resolution=8, device=torch.device('cpu'), warmup=2)
    assert calls == [(4, 3, 8, 8)] * 5 # 2 untimed + ceil(10 / 4) timed batches
    assert rec['images'] == 12 and len(rec['warmup_s']) == 2 and rec['images_per_s'] > 0


def test_sweep_train_times_each_variant_on_cpu():
    """bench/sweep_train.py: one record per variant, train and sample tasks, and bad variants refused."""
    import click
    from bench import sweep_train
    assert sweep_train.parse_variant('bf16+cl+full+einsum') == dict(precision='bf16', cl=True, compile='full',
                                                                    adam='fused', attention='reference',
                                                                    resample='auto', inductor_mode=None, nhwc=False)
    assert sweep_train.parse_variant('bf16+full')['attention'] == 'auto'  # as train.py runs it
    assert sweep_train.parse_variant('bf16+full+convresample')['resample'] == 'reference'
    assert sweep_train.parse_variant('bf16+sdpa')['attention'] == 'sdpa'
    assert sweep_train.parse_variant('bf16+full+cudagraphs')['inductor_mode'] == 'reduce-overhead'
    assert sweep_train.parse_variant('bf16+full+nhwc')['nhwc']
    for bad in ('bf16+autotune', 'bf16+nhwc', 'bf16+full+nhwc+cudagraphs'):
        with pytest.raises(click.BadParameter, match='go with blocks or full'):
            sweep_train.parse_variant(bad)
    with pytest.raises(click.BadParameter, match='not both'):
        sweep_train.parse_variant('bf16+einsum+sdpa')
    with pytest.raises(click.BadParameter, match='precision must be one of'):
        sweep_train.parse_variant('fp8+cl')
    cpu = torch.device('cpu')
    records = {}
    for task in ('train', 'sample'):
        record = records[task] = sweep_train.run_one('ddpmpp-cifar10', 'quick', 2, 'bf16gn32+einsum+foreach+convresample', cpu, steps=1,
                                                     task=task, profile=(task == 'train'))
        assert record['task'] == task and record['images_per_s'] > 0 and len(record['times_s']) == 1
    profile = records['train']['profile']  # bench/kernels.py: where the step's time goes
    assert 'profile' not in records['sample'] and profile['launches'] > 0
    assert 0 < profile['busy_s'] <= profile['wall_s'] * 1.05 and profile['groups']['convolution'] > 0
    assert abs(sum(profile['groups'].values()) - profile['busy_s']) < 1e-6 and profile['top'][0]['s'] > 0



def test_sweep_train_runs_edm2_recipe_in_rounds_and_guided_sampler(monkeypatch):
    """bench/sweep_train.py --net edm2-s: EDM2's loss once per round of --batch-gpu, the power-function EMA, and
    sampling guided by an EDM2-XS network from float16 (snapshot-like) weights."""
    import click
    from bench import sweep_train
    from training import loss, phema, sampling
    calls = dict(loss=[], ema=[], sampler=[])
    edm2_loss, ema_update, edm2_sampler = loss.EDM2Loss.__call__, phema.PowerFunctionEMA.update, sampling.edm2_sampler
    monkeypatch.setattr(loss.EDM2Loss, '__call__', lambda self, **kw: calls['loss'].append(len(kw['images'])) or edm2_loss(self, **kw))
    monkeypatch.setattr(phema.PowerFunctionEMA, 'update', lambda self, **kw: calls['ema'].append(kw) or ema_update(self, **kw))

    def sampler(net, noise, labels, gnet=None, **kwargs):
        sizes = [sum(p.numel() for p in n.parameters()) for n in (gnet, net)]
        calls['sampler'].append((*sizes, next(net.parameters()).dtype, kwargs))
        return edm2_sampler(net, noise, labels, gnet=gnet, **kwargs)
    monkeypatch.setattr(sampling, 'edm2_sampler', sampler)
    cpu = torch.device('cpu')
    record = sweep_train.run_one('edm2-s', 'quick', 4, 'fp32', cpu, steps=1, task='train', batch_gpu=2)
    assert record['batch_gpu'] == 2 and record['images_per_s'] > 0
    assert calls['loss'] == [2, 2] * 4  # first step, a second one, a warm-up and the timed step: two rounds each
    assert [c['cur_nimg'] for c in calls['ema']] == [4, 8, 12, 16] and {c['batch_size'] for c in calls['ema']} == {4}
    with pytest.raises(click.BadParameter, match='multiple of --batch-gpu'):
        sweep_train.build_step('edm2-s', 'quick', 4, sweep_train.parse_variant('fp32'), cpu, batch_gpu=3)
    sweep_train.run_one('edm2-s', 'quick', 2, 'fp32', cpu, steps=1, task='sample')
    guide_size, main_size, dtype, kwargs = calls['sampler'][0]
    assert guide_size < main_size and dtype == torch.float16  # EDM2-XS guides EDM2-S
    assert kwargs == dict(num_steps=32, guidance=1.4)

def test_sync_report_counts_each_waiting_call_site_with_its_stack(tmp_path):
    """bench/sync_report.py: every synchronising call counted once per site, with our frames; other warnings pass."""
    script = tmp_path / 'script.py'
    script.write_text('import sys, warnings\n'
                      'def step():\n'
                      '    warnings.warn("called a synchronizing CUDA operation")\n'
                      'for _ in range(3):\n'
                      '    step()\n'
                      'warnings.warn("another warning")\n'
                      'print(sys.argv[1:])\n')
    out = tmp_path / 'syncs.json'
    proc = subprocess.run([sys.executable, '-m', 'bench.sync_report', f'--out={out}', str(script), '--x=1'],
                          check=True, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.stdout.strip() == "['--x=1']" and 'another warning' in proc.stderr
    report = json.loads(out.read_text())
    assert report['total'] == 3 and len(report['sites']) == 1 and report['sites'][0]['count'] == 3
    stack = report['sites'][0]['stack']
    assert [line.split(' ', 1)[0].rsplit(':', 1)[1] for line in stack] == ['5', '3'] and 'step()' in stack[0]


def test_compile_report_keeps_cache_bypass_reasons(tmp_path):
    """bench/compile_report.py: phases and counters of a compiled script, and why a graph missed a cache."""
    script = tmp_path / 'script.py'
    script.write_text('import logging, torch\n'
                      'torch.compile(torch.nn.Linear(4, 4), backend="aot_eager")(torch.randn(2, 4)).sum().backward()\n'
                      'logging.getLogger("torch._functorch._aot_autograd.autograd_cache").info(\n'
                      '    "Bypassing autograd cache due to: %s", "Unsupported call_function target x")\n'
                      'logging.getLogger("torch._inductor.codecache").info("FX graph cache hit")\n')
    out = tmp_path / 'report.json'
    subprocess.run([sys.executable, '-m', 'bench.compile_report', f'--out={out}', str(script)], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    report = json.loads(out.read_text())
    assert report['bypass_reasons'] == ['Bypassing autograd cache due to: Unsupported call_function target x']
    assert report['counters']['frames']['ok'] == 1 and report['process_s'] > 0 and report['phases_s']


def test_sweep_encode_runs_each_variant_and_keeps_the_latents():
    """bench/sweep_encode.py: records per variant, bad variants refused, and the candidate switches (group norm in
    bf16, channels-last, one image per call) give the latents of the plain variant of their precision."""
    import click
    from bench import sweep_encode
    assert sweep_encode.parse_variant('bf16+gn+cl') == dict(precision='bf16', b1=False, cl=True, gn=True, autotune=False,
                                                             compile=False)
    for bad, message in (('fp32+gn', 'goes with bf16'), ('fp8', 'precision must be one of'), ('bf16+x', 'switches from')):
        with pytest.raises(click.BadParameter, match=message):
            sweep_encode.parse_variant(bad)
    cpu = torch.device('cpu')
    latents = {text: sweep_encode.build_encode('quick', sweep_encode.parse_variant(text), cpu)[0]()
               for text in ('fp32', 'fp32+b1+cl', 'bf16', 'bf16+gn')}
    assert latents['fp32'].shape == (2, 8, 4, 4)
    torch.testing.assert_close(latents['fp32+b1+cl'], latents['fp32'], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(latents['bf16+gn'].float(), latents['fp32'], rtol=0.1, atol=0.1)
    norm, x = torch.nn.GroupNorm(4, 8).eval(), torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
        expected = norm(x)
        assert sweep_encode.group_norm_in_input_dtype(torch.nn.Sequential(norm, torch.nn.GroupNorm(2, 8))) == 2
        seen = []
        group_norm = torch.nn.functional.group_norm
        with torch.autocast('cpu', dtype=torch.bfloat16), pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.nn.functional, 'group_norm',
                          lambda x, *args: seen.append((torch.is_autocast_enabled('cpu'), x.dtype)) or group_norm(x, *args))
            out = norm(x.bfloat16())
    assert seen == [(False, torch.bfloat16)]  # autocast off around it: normalised in the input's dtype
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    record = sweep_encode.run_one('quick', 'bf16+gn', cpu, steps=1, profile=True)
    assert record['images'] == 2 and record['images_per_s'] > 0 and record['profile']['busy_s'] > 0
    pixels = {text: sweep_encode.build_decode('quick', sweep_encode.parse_variant(text), cpu)[0]()
              for text in ('fp32', 'fp32+b1+cl', 'bf16+gn+cl')}
    assert pixels['fp32'].shape == (2, 3, 32, 32) and pixels['fp32'].dtype == torch.uint8
    assert (pixels['fp32+b1+cl'].int() - pixels['fp32'].int()).abs().max() <= 1
    assert (pixels['bf16+gn+cl'].float() - pixels['fp32'].float()).abs().mean() < 4
    record = sweep_encode.run_one('quick', 'bf16', cpu, steps=1, task='decode')
    assert record['task'] == 'decode' and record['images'] == 2 and record['images_per_s'] > 0
