"""Where a training run writes: EDM's numbered run folders, EDM2's --outdir, the STF fork's --name.

- EDM recipe (NVlabs/edm train.py): each command makes `<outdir>/<NNNNN>-<description>`, e.g.
  `00000-cifar10-32x32-cond-ddpmpp-edm-gpus8-batch512-fp32`, unless `--nosubdir`. Rerunning the
  same command after an interruption resumes the newest unfinished run folder of that description
  whose `run_config.json` holds the same options; a finished run gets a new folder, as in EDM.
  An --outdir that itself holds training states is a run folder and is continued in place.
- EDM2 recipe (NVlabs/edm2 train_edm2.py): `--outdir` is the run folder itself (with `--desc`, a
  numbered folder as for EDM).
- `--name=NAME` (Newbeeer/stf train.py): the run folder is `<outdir>/NAME`, for every recipe.
"""

from __future__ import annotations

import json
import os
import re

import torch

from torch_utils import distributed as dist
from training.presets import TrainConfig, to_json
from training.resume_options import HARMLESS_OPTIONS


def run_description(cfg: TrainConfig, world_size: int, desc: str | None = None) -> str:
    """EDM's run name: <dataset>-<cond|uncond>-<arch>-<precond>-gpus<N>-batch<B>-<dtype>[-<desc>]."""
    dataset = os.path.splitext(os.path.basename(os.path.normpath(cfg.data)))[0]
    dtype = 'fp16' if cfg.fp16 else 'bf16' if cfg.bf16 else 'fp32'
    name = (f'{dataset}-{"cond" if cfg.cond else "uncond"}-{cfg.arch}-{cfg.precond}-gpus{world_size}'
            f'-batch{cfg.batch_size}-{dtype}')
    return name if desc is None else f'{name}-{desc}'


def _numbered_dirs(outdir: str) -> list[tuple[int, str]]:
    """(run number, folder name) of the subfolders of outdir whose name starts with digits."""
    entries = os.listdir(outdir) if os.path.isdir(outdir) else []
    return [(int(m.group()), entry) for entry in entries
            if os.path.isdir(os.path.join(outdir, entry)) and (m := re.match(r'\d+', entry))]


def numbered_run_dir(outdir: str, name: str) -> str:
    """<outdir>/<NNNNN>-<name> with the next free run number, as EDM names its run directories."""
    taken = [number for number, _entry in _numbered_dirs(outdir)]
    return os.path.join(outdir, f'{max(taken, default=-1) + 1:05d}-{name}')


def _same_options(run_dir: str, cfg: TrainConfig) -> bool:
    try:
        with open(os.path.join(run_dir, 'run_config.json')) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return False
    current = to_json(cfg)
    return all(stored.get(key) == value for key, value in current.items() if key not in HARMLESS_OPTIONS)  # what resuming accepts too


def _trained_nimg(run_dir: str) -> int | None:
    """cur_nimg of the newest training state in run_dir (read lazily, tensors untouched), or None."""
    from training.training_loop import find_latest_state
    path = find_latest_state(run_dir)
    if path is None:
        return None
    try:
        return int(torch.load(path, map_location='cpu', weights_only=True, mmap=True)['cur_nimg'])
    except Exception:  # noqa: BLE001 -- an unreadable state marks no resumable run
        return None


def unfinished_run_dir(outdir: str, name: str, cfg: TrainConfig) -> str | None:
    """The newest <outdir>/<NNNNN>-<name> with the same options whose training stopped short of cfg.total_nimg."""
    for _number, entry in sorted(_numbered_dirs(outdir), reverse=True):
        if re.fullmatch(r'\d+-' + re.escape(name), entry):
            run_dir = os.path.join(outdir, entry)
            nimg = _trained_nimg(run_dir)
            if _same_options(run_dir, cfg) and nimg is not None and nimg < cfg.total_nimg:
                return run_dir
            return None  # Only the newest run of this description is ever continued.
    return None


def choose_run_dir(outdir: str, cfg: TrainConfig, desc: str | None = None, nosubdir: bool = False,
                   name: str | None = None) -> str:
    """The run folder (see the module docstring); rank 0 decides and every rank gets its answer."""
    if name is not None:
        return os.path.join(outdir, name)
    if nosubdir or (cfg.recipe != 'edm' and desc is None):
        return outdir
    from training.training_loop import find_latest_state
    if find_latest_state(outdir) is not None:
        dist.print0(f'--outdir={outdir} is itself a run folder (it holds training states): continuing it there')
        return outdir  # e.g. a run started with --nosubdir, or before numbered folders
    run_dir = [None]
    if dist.get_rank() == 0:
        description = run_description(cfg, dist.get_world_size(), desc)
        resumable = None if cfg.resume else unfinished_run_dir(outdir, description, cfg)
        run_dir[0] = resumable or numbered_run_dir(outdir, description)
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(run_dir, src=0)
    return run_dir[0]
