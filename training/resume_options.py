"""Resuming a run folder: compare the options it was trained with to the new command's options."""

from __future__ import annotations

import json
import os

# Options that change how a run is carried out or logged, not what it computes: a rerun may change them.
# total_nimg is how a finished run is extended; batch_gpu only splits the same batch into rounds.
HARMLESS_OPTIONS = frozenset({
    'total_nimg', 'epochs', 'batch_gpu', 'status_nimg', 'snapshot_nimg', 'checkpoint_nimg', 'workers', 'cache', 'device',
    'compile', 'compile_async', 'fast', 'channels_last', 'deterministic', 'cudnn_benchmark', 'transfer', 'resume', 'preset',
    'allow_option_change', 'trust_pickle', 'chkpt_intv', 'eval', 'eval_total_size', 'eval_batch_size', 'eval_ref',
    'use_ddim', 'skip_schedule', 'subseq_size',
})

RUN_CONFIG = 'run_config.json'

#----------------------------------------------------------------------------

def changed_options(stored: dict, new: dict) -> list[str]:
    """'name: old -> new' for every run-altering option that differs; the dataset is compared by file name,
    so a dataset moved to another folder is the same dataset."""
    changes = []
    for name in sorted(set(stored) & set(new) - HARMLESS_OPTIONS):
        old, cur = stored[name], new[name]
        if name == 'data' and old is not None and cur is not None:
            old, cur = os.path.basename(os.path.normpath(old)), os.path.basename(os.path.normpath(cur))
        if isinstance(old, (list, tuple)) and isinstance(cur, (list, tuple)):
            old, cur = list(old), list(cur)
        if old != cur:
            changes.append(f'{name}: {old!r} -> {cur!r}')
    return changes


def check_resume_options(state_path: str | None, new: dict, allow: bool) -> list[str]:
    """Refuse to resume `state_path` with run-altering option changes (ValueError naming them) unless
    `allow`; returns the changes. Compares with the run_config.json beside the state, if there is one."""
    if state_path is None:
        return []
    config_path = os.path.join(os.path.dirname(os.path.abspath(state_path)), RUN_CONFIG)
    if not os.path.isfile(config_path):
        return []
    with open(config_path, encoding='utf-8') as f:
        stored = json.load(f)
    changes = changed_options(stored, new)
    if changes and not allow:
        raise ValueError(f'{state_path} was trained with other options ({"; ".join(changes)}). Rerun with the '
                         f'original options, use a new --outdir, or pass --allow-option-change to resume anyway')
    return changes

#----------------------------------------------------------------------------
