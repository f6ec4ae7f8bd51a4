"""Run one of our scripts and write, when it exits, what torch.compile did in it: time per compile phase,
cache hits and misses, recompiles and graph breaks.

    python -m bench.compile_report --out=report.json train.py --fast ...

A rerun on a warm inductor cache should show `fxgraph_cache_hit` and `autograd_cache_hit` and little
time in `compile_fx`; whatever time remains is what a resume still pays. `bypass_reasons` says why a graph
could not use a cache.
"""

import atexit
import json
import logging
import os
import runpy
import sys
import time

# Loggers that say at INFO why a graph missed the AOTAutograd or the FX graph cache.
_BYPASS_LOGGERS = ('torch._functorch._aot_autograd.autograd_cache', 'torch._inductor.codecache')


class _Bypasses(logging.Handler):
    """Keeps the messages that give a cache bypass's reason, first lines only."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.reasons = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if 'ypass' in message:
            self.reasons.append(' '.join(message.split())[:300])


def _watch_bypasses() -> _Bypasses:
    handler = _Bypasses()
    for name in _BYPASS_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)  # torch leaves them at WARNING; their records still reach only this handler
        logger.propagate = False
    return handler


def _report(start: float, bypasses: _Bypasses) -> dict:
    if 'torch._dynamo' not in sys.modules:  # the script stopped before anything was compiled
        return dict(process_s=round(time.time() - start, 2), phases_s={}, counters={}, bypass_reasons=[])
    from torch._dynamo.utils import compile_times, counters
    headers, values = compile_times(repr='csv', aggregate=True)
    phases = {name: float(value) for name, value in zip(headers, values)}
    top = dict(sorted(phases.items(), key=lambda item: -item[1])[:25])
    return dict(process_s=round(time.time() - start, 2), phases_s=top,
                counters={key: dict(value) for key, value in counters.items() if value},
                bypass_reasons=sorted(set(bypasses.reasons)))


def summary(path: str) -> dict | None:
    """The gist of a report file for an e2e record: seconds in dynamo (tracing, AOTAutograd, cache loads) and in
    inductor's compile, cache counters and bypass reasons; None when the script wrote no report (killed, crashed)."""
    try:
        with open(path) as f:
            report = json.load(f)
        phases, counters = report['phases_s'], report['counters']
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dict(process_s=report['process_s'], dynamo_s=phases.get('_compile.compile_inner', 0.0),
                inductor_s=phases.get('compile_fx_inner', 0.0), frames=counters.get('frames', {}),
                aot_autograd=counters.get('aot_autograd', {}),
                fxgraph={k: v for k, v in counters.get('inductor', {}).items() if k.startswith('fxgraph_cache')},
                bypass_reasons=report.get('bypass_reasons', []))


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 2 or not args[0].startswith('--out='):
        sys.exit('usage: python -m bench.compile_report --out=REPORT.json SCRIPT.py [ARGS...]')
    out, script, script_args = args[0].split('=', 1)[1], args[1], args[2:]
    start = time.time()
    bypasses = _watch_bypasses()

    def write():
        with open(out, 'w') as f:
            json.dump(_report(start, bypasses), f, indent=1)
    atexit.register(write)
    run_script(script, script_args)


def run_script(script: str, args: list[str]) -> None:
    """Run a script of ours in this process as `python SCRIPT ARGS` would."""
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
    main()
