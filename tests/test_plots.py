"""training.plots on the stats.jsonl of real tiny training runs (EDM and EDM2 formats) and on metrics lines
written by fid.py's own writer; bad input gives one clear error line."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import fid
from training import plots
from training import training_loop as tl
from training.presets import build_config


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Two tiny CPU training runs (EDM and EDM2 recipes), 4 status ticks each, on 32 random 8x8 images."""
    root = tmp_path_factory.mktemp('plots')
    data = root / 'data'
    data.mkdir()
    rnd = np.random.default_rng(0)
    for i in range(32):
        PIL.Image.fromarray(rnd.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(data / f'{i:05d}.png')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = {}
        for preset in ('tiny-edm', 'tiny-edm2'):
            cfg = build_config(preset, data=str(data), total_nimg=128, status_nimg=32, snapshot_nimg=128,
                               checkpoint_nimg=128)
            tl.training_loop(cfg, str(root / preset), torch.device('cpu'))
            result[preset] = str(root / preset)
    finally:
        torch.set_num_threads(threads)
    return result


def png_size(num_panels):
    return (round(plots.PANEL_SIZE_IN[0] * plots.DPI), round(plots.PANEL_SIZE_IN[1] * plots.DPI * num_panels))


@pytest.mark.parametrize('preset', ['tiny-edm', 'tiny-edm2'])
def test_plot_of_real_run(runs, preset):
    run_dir = runs[preset]
    series, warnings = plots.load_stats(run_dir)
    assert warnings == []
    assert series['kimg'] == pytest.approx([0.032, 0.064, 0.096, 0.128])  # EDM's tick 0 (after step 1) is the first
    assert all(np.isfinite(series['loss'])) and all(v > 0 for v in series['images_per_sec'])
    result = CliRunner().invoke(plots.main, [run_dir])
    assert result.exit_code == 0, result.output
    with PIL.Image.open(os.path.join(run_dir, 'stats.png')) as image:
        assert image.format == 'PNG' and image.size == png_size(2)
    assert not [name for name in os.listdir(run_dir) if name.endswith('.tmp')]


def test_metric_curves_by_snapshot_kimg(runs, tmp_path):
    metrics = str(tmp_path / 'fid.jsonl')
    for kimg, best in [(2048, 9.0), (1024, 12.0)]:
        for std in ('0.050', '0.100'):
            net = f'run/network-snapshot-{kimg:07d}-{std}.pkl'
            fid.report([{'fid': best + 1}, {'fid': best}, {'fid': best + 2}], dict(command='gen', net=net), metrics)
    curves, xlabel, warnings = plots.load_metrics(metrics)
    assert warnings == [] and xlabel.startswith('kimg')
    # The min of the repeats, sorted by kimg, one line per EMA length.
    assert curves == {'fid': {'EMA std 0.050': [(1024, 12.0), (2048, 9.0)], 'EMA std 0.100': [(1024, 12.0), (2048, 9.0)]}}
    out = str(tmp_path / 'curves.png')
    result = CliRunner().invoke(plots.main, [runs['tiny-edm'], f'--out={out}', f'--metrics={metrics}'])
    assert result.exit_code == 0, result.output
    with PIL.Image.open(out) as image:
        assert image.size == png_size(3)


def test_metrics_without_snapshot_use_line_order(tmp_path):
    metrics = str(tmp_path / 'metrics.jsonl')
    fid.report([{'fid': 30.0, 'precision': 0.5}], dict(command='calc', images='out/a'), metrics)
    fid.report([{'fid': 20.0, 'precision': 0.6}], dict(command='calc', images='out/b'), metrics)
    curves, xlabel, _ = plots.load_metrics(metrics)
    assert xlabel.startswith('result index')
    assert curves['fid'] == {'fid': [(0, 30.0), (2, 20.0)]} and curves['precision'] == {'precision': [(1, 0.5), (3, 0.6)]}


def test_corrupt_and_resumed_lines(runs, tmp_path):
    lines = open(os.path.join(runs['tiny-edm'], 'stats.jsonl')).read().splitlines()
    # A resume from the kimg-0.064 state repeats the third tick; a crash leaves half a line at the end.
    text = '\n'.join(lines[:3] + ['', 'garbage'] + lines[2:] + [lines[3][:25]])
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'stats.jsonl').write_text(text)
    series, warnings = plots.load_stats(str(run_dir))
    assert series['kimg'] == pytest.approx([0.032, 0.064, 0.096, 0.128])  # EDM's tick 0 (after step 1) is the first
    assert len(warnings) == 2 and ':5: skipped not a JSON object' in warnings[0]
    assert ':8: skipped incomplete last line' in warnings[1]
    result = CliRunner().invoke(plots.main, [str(run_dir)])
    assert result.exit_code == 0 and 'Warning:' in result.stderr


@pytest.mark.parametrize('setup,message', [
    (None, 'does not exist'),
    ('', 'stats.jsonl not found'),
    ('\n\n', 'no status lines'),
    ('{"Progress/kimg": ', 'no status lines'),
    (json.dumps({'Loss/loss': 1.0}) + '\n', 'no status lines'),
])
def test_errors_are_one_line(tmp_path, setup, message):
    run_dir = tmp_path / 'run'
    if setup is not None:
        run_dir.mkdir()
        if setup:
            (run_dir / 'stats.jsonl').write_text(setup)
    result = CliRunner().invoke(plots.main, [str(run_dir)])
    assert result.exit_code == 1 and 'Traceback' not in result.output
    assert result.output.count('\n') <= 3 and message in result.output and 'Error:' in result.output
    assert not (run_dir / 'stats.png').exists()


def test_missing_metrics_file_is_an_error(runs, tmp_path):
    result = CliRunner().invoke(plots.main, [runs['tiny-edm'], f'--metrics={tmp_path / "none.jsonl"}',
                                             f'--out={tmp_path / "x.png"}'])
    assert result.exit_code == 1 and '--metrics=' in result.output and not (tmp_path / 'x.png').exists()
