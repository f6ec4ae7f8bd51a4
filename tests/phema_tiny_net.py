"""A tiny persistent network and a synthetic EDM2-style training run, for the post-hoc EMA tests."""

import copy
import os

import torch

import dnnlib
from torch_utils import persistence
from training import phema


@persistence.persistent_class
class PhemaTinyNet(torch.nn.Module):
    """Two linear layers, a scalar gain and a step counter buffer."""

    def __init__(self,
        in_features  = 5,   # Input width.
        hidden       = 4,   # Hidden width; changing it changes the architecture.
        out_features = 2,   # Output width.
    ):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones([]))
        self.lin1 = torch.nn.Linear(in_features, hidden)
        self.lin2 = torch.nn.Linear(hidden, out_features, bias=False)
        self.register_buffer('counter', torch.zeros([3]))

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(x))) * self.gain


def write_run(run_dir, num_snapshots, batch_size=256, snapshot_nimg=1024, stds=(0.050, 0.100),
        track_stds=(), seed=0, dtype=torch.float16, **net_kwargs):
    """Random-walk training: save EDM2 snapshots network-snapshot-<kimg>-<std>.pkl every snapshot_nimg
    images through PowerFunctionEMA; return {std: ema_net} tracked directly at track_stds (float32)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = PhemaTinyNet(**net_kwargs)
    drift = [torch.randn(p.shape, generator=gen) * 0.02 for p in net.parameters()]
    ema = phema.PowerFunctionEMA(net, stds=list(stds))
    direct = phema.PowerFunctionEMA(net, stds=list(track_stds))
    cur_nimg = 0
    _save_snapshots(run_dir, ema, cur_nimg, dtype)
    while cur_nimg < num_snapshots * snapshot_nimg:
        with torch.no_grad():
            for param, mean in zip(net.parameters(), drift):
                param += mean + 0.05 * torch.randn(param.shape, generator=gen)
            net.counter += 1
        cur_nimg += batch_size
        ema.update(cur_nimg=cur_nimg, batch_size=batch_size)
        direct.update(cur_nimg=cur_nimg, batch_size=batch_size)
        if cur_nimg % snapshot_nimg == 0:
            _save_snapshots(run_dir, ema, cur_nimg, dtype)
    return {std: ema_net for std, (ema_net, _suffix) in zip(track_stds, direct.get())}


def _save_snapshots(run_dir, ema, cur_nimg, dtype):
    """Write one snapshot per tracked profile, as the EDM2 training loop does."""
    for ema_net, suffix in ema.get():
        data = dnnlib.EasyDict(encoder=None, dataset_kwargs=dict(class_name='toy.Dataset', path='toy'), loss_fn=None)
        data.ema = copy.deepcopy(ema_net).cpu().eval().requires_grad_(False).to(dtype)
        persistence.save_pickle(data, os.path.join(run_dir, f'network-snapshot-{cur_nimg // 1000:07d}{suffix}.pkl'))
