"""The README's quickstart, end to end at a smaller size: every artefact exists and loads."""

import glob
import json
import os
import subprocess
import sys

import PIL.Image

from tests.conftest import ROOT
from torch_utils import persistence


def test_quickstart_end_to_end(tmp_path):
    outdir = tmp_path / 'qs'
    cmd = [sys.executable, str(ROOT / 'quickstart.py'), f'--outdir={outdir}', '--kimg=1', '--num=4', '--device=cpu']
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f'Everything is in {outdir}' in result.stdout
    with PIL.Image.open(outdir / 'grid.png') as grid:
        grid.load()
        assert grid.size[0] >= 16 * 2 and grid.mode == 'RGB'
    assert len(glob.glob(str(outdir / 'images' / '*.png'))) == 4
    snapshot = sorted(glob.glob(str(outdir / 'training-run' / 'network-snapshot-*.pkl')))[-1]
    net = persistence.load_pickle(snapshot)['ema']
    assert net.img_resolution == 16 and net.label_dim == 10
    lines = [json.loads(line) for line in (outdir / 'metrics.jsonl').read_text().splitlines()]
    assert any('fid' in json.dumps(line) for line in lines)
    for name in ('log.txt', 'stats.jsonl', 'training_options.json'):
        assert os.path.getsize(outdir / 'training-run' / name) > 0
