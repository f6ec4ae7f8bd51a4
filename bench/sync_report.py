"""Run one of our scripts with CUDA's synchronisation check on and write, when it exits, where the host waited
for the GPU: each place once, with how often it happened and the stack inside this repository.

    python -m bench.sync_report --out=syncs.json train.py --fast ...

A training or sampling loop should wait only where it must (a status tick, a snapshot, PNGs to write). A wait
inside every step stops the host from queuing the next kernels while the GPU works, and the GPU then idles for
the launches: the cost grows with the number of small kernels, as in eager mode or EDM2's rounds of 32.
torch.cuda.set_sync_debug_mode('warn') raises a warning at each wait; on a machine without CUDA nothing is
checked and the report is empty.
"""

import atexit
import collections
import json
import os
import sys
import sysconfig
import traceback
import warnings

from bench.compile_report import run_script

_MARKER = 'synchroniz'  # torch's message: "called a synchronizing CUDA operation"
# Frames of Python itself, installed packages and this tool are left out of a stack: what remains is our code.
_SKIP = tuple({sysconfig.get_paths()[key] for key in ('stdlib', 'purelib', 'platlib')}) + (os.path.dirname(__file__),)


class _Syncs:
    """Counts each synchronising call site by its stack within this repository."""

    def __init__(self):
        self.sites = collections.Counter()

    def record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if _MARKER not in str(message):
            _show(message, category, filename, lineno, file, line)
            return
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith(_SKIP) and f.filename[0] != '<']
        self.sites[tuple(f'{os.path.relpath(f.filename)}:{f.lineno} {f.line}' for f in frames[-6:])] += 1

    def report(self) -> dict:
        sites = [dict(count=count, stack=list(stack)) for stack, count in self.sites.most_common()]
        return dict(total=sum(self.sites.values()), sites=sites)


_show = warnings.showwarning


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 2 or not args[0].startswith('--out='):
        sys.exit('usage: python -m bench.sync_report --out=SYNCS.json SCRIPT.py [ARGS...]')
    out, script, script_args = args[0].split('=', 1)[1], args[1], args[2:]
    syncs = _Syncs()
    warnings.showwarning = syncs.record
    warnings.filterwarnings('always', message=f'.*{_MARKER}')  # every wait, not the first per call site

    def write():
        with open(out, 'w') as f:
            json.dump(syncs.report(), f, indent=1)
    atexit.register(write)
    import torch
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode('warn')
    run_script(script, script_args)


if __name__ == '__main__':
    main()
