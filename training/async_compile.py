"""Compile the training network in a child process while the run trains eagerly (train.py --compile-async).

A cold torch.compile of DDPM++ took 120-156 s on an H200 before the first step completed (docs/performance.md):
the GPU idles and no status line comes. With --compile-async the run trains eagerly from its first step, while a
child process builds the same network, loss and augmentation from the same options, runs one forward and backward
of the compiled network on a batch of the same shapes, and so fills inductor's on-disk caches (AOTAutograd, FX
graphs, Triton kernels). When the child is done, the run compiles its own network, which is then a cache hit.

The child starts after the first eager step, once that step's peak memory is known, and only when the device has
that much free: it holds a second copy of the network and of a step's activations. Without the room, or when the
child fails, the run compiles in its own process as plain --compile does, and says why in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import dnnlib

HEADROOM_BYTES = 2 << 30  # besides the step's peak: the child's CUDA context, cuDNN workspaces, compile buffers


class AsyncCompile:
    """The child process of one run (python -m training.async_compile JOB.json); poll() after each step."""

    def __init__(self, job: dict):
        folder = tempfile.mkdtemp(prefix='edm-compile-')
        self.log_path = os.path.join(folder, 'compile.log')
        job_path = os.path.join(folder, 'job.json')
        with open(job_path, 'w') as f:
            json.dump(job, f)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds training/, as the run has it
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')])))
        self.start_time = time.time()
        with open(self.log_path, 'wb') as log:
            self.process = subprocess.Popen([sys.executable, '-m', 'training.async_compile', job_path], env=env,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def poll(self) -> str | None:
        """None while the child runs; '' once it has filled the cache; else why it failed, in one line."""
        code = self.process.poll()
        if code is None:
            return None
        if code == 0:
            return ''
        return f'the compile process exited with code {code}: {_last_line(self.log_path)}'

    def close(self) -> None:
        """Stop the child if it still runs (the run ended or failed first)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def room_for_child(device: torch.device) -> str | None:
    """Why the device cannot hold a compile process beside this run's training step, or None when it can."""
    if device.type != 'cuda':
        return None
    free, _total = torch.cuda.mem_get_info(device)
    need = torch.cuda.max_memory_reserved(device) + HEADROOM_BYTES
    if free >= need:
        return None
    return f'{free / 2**30:.1f} GB of GPU memory free, a compile process beside this run needs about {need / 2**30:.1f} GB'


def make_job(ctx, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """What the child needs to build this run's compiled step, as JSON: options, kwargs and the batch's shapes."""
    from training import presets, speed
    return dict(cfg=presets.to_json(ctx.cfg), device=str(ctx.device), network_kwargs=ctx.network_kwargs,
                network_interface=ctx.network_interface, loss_kwargs=ctx.recipe.loss_kwargs(),
                images=[list(images.shape), str(images.dtype)], labels=[list(labels.shape), str(labels.dtype)],
                scale=ctx.cfg.loss_scaling / (ctx.batch_gpu * ctx.rounds), backend=speed.DEFAULT_BACKEND)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix('torch.'), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f'not a torch dtype: {name!r}')
    return dtype


def _compile_step(job: dict) -> None:
    """One compiled forward and backward of the run's step, on random data of the run's shapes."""
    from training import presets, speed, training_loop
    from training.recipes import make_recipe
    speed.DEFAULT_BACKEND = job['backend']
    cfg, device = presets.from_json(job['cfg']), torch.device(job['device'])
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    training_loop._init_runtime(cfg, device, make_recipe(cfg))
    net = training_loop.build_network(job['network_kwargs'], job['network_interface'], cfg, device)
    loss_fn = dnnlib.util.construct_class_by_name(**job['loss_kwargs'])
    aug = training_loop.augment_kwargs(cfg)
    augment_pipe = dnnlib.util.construct_class_by_name(**aug) if aug is not None else None
    call = speed.autocast_calls(training_loop.compile_for_training(net, device), device, enabled=cfg.bf16)
    (image_shape, image_dtype), (label_shape, label_dtype) = job['images'], job['labels']
    images = torch.randn(image_shape, device=device).to(_dtype(image_dtype))
    labels = torch.zeros(label_shape, dtype=_dtype(label_dtype), device=device)
    training_loop.loss_backward(call, loss_fn, images, labels, augment_pipe, {}, job['scale'])
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _last_line(path: str) -> str:
    try:
        with open(path, errors='replace') as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError as err:
        return f'(no log: {err})'
    return dnnlib.util.text_line(lines[-1], 300) if lines else '(no output)'


if __name__ == '__main__':
    with open(sys.argv[1]) as f:
        _compile_step(json.load(f))
