"""Statistics split over 2 gloo processes equal those of one process (the torchrun path of fid.py)."""

import os

import numpy as np
import torch
import torch.multiprocessing as mp

from training import detectors, metrics
from tests.conftest import free_port
from tests.test_metrics import tiny_vit

def _worker(rank, world_size, port, state_dict, images, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1) # two processes on a 2-core machine
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world_size)
    try:
        det = detectors.DINOv2Detector(model=detectors.DINOv2ViT.from_state_dict(state_dict))
        acc = metrics.StatsAccumulator(['fd_dinov2'], {'dinov2': det}, torch.device('cpu'))
        acc.add(images[rank::world_size]) # 3 and 2 images: ranks hold different counts
        stats = acc.finish()
        rows = metrics._gather_rows(torch.full([rank + 1, 3], float(rank)), torch.device('cpu'))
        torch.save(dict(stats=stats, rows=rows), os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        torch.distributed.destroy_process_group()

def test_two_process_statistics_equal_single_process(tmp_path):
    net = tiny_vit(seed=2)
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mp.spawn(_worker, args=(2, free_port(), net.state_dict(), images, str(tmp_path)), nprocs=2, join=True)

    det = detectors.DINOv2Detector(model=net)
    acc = metrics.StatsAccumulator(['fd_dinov2'], {'dinov2': det}, torch.device('cpu'))
    acc.add(images)
    single = acc.finish()
    for rank in range(2):
        result = torch.load(tmp_path / f'rank{rank}.pt', weights_only=False)
        assert result['stats']['num_images'] == 5
        for key in ('mu', 'sigma'):
            np.testing.assert_allclose(result['stats']['fd_dinov2'][key], single['fd_dinov2'][key], rtol=1e-5, atol=1e-7)
        expected_rows = torch.tensor([[0.0] * 3, [1.0] * 3, [1.0] * 3])
        assert torch.equal(result['rows'], expected_rows)
