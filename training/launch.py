"""What every training entry point (train.py, train_edm2.py) does between the resolved config and the loop."""

from __future__ import annotations

import torch

from torch_utils import distributed as dist
from torch_utils import misc
from training import presets


def init_run(cfg: presets.TrainConfig) -> torch.device:
    """Pick this rank's device, join the process group, check the batch split and catch SIGTERM/SIGUSR1."""
    device = misc.choose_device(cfg.device)
    dist.init(device)
    device = dist.device_for_rank(device)
    presets.check_batch(cfg, dist.get_world_size())
    dist.install_signal_handlers()
    return device
