"""Benchmark post-hoc EMA reconstruction: time and peak RSS vs. the number of input snapshots.

Writes a synthetic run (tests/phema_tiny_net.py: random-walk weights, EDM2 snapshot format, fp16)
to a temporary folder, then reconstructs at several training times, i.e. from growing numbers of
snapshots. Peak RSS is sampled with psutil in a background thread.

    python bench/phema_bench.py --hidden=1024 --snapshots=8,16,32,64 --outstd=0.010,0.020,...,0.080 --batch=8,2
"""

import os
import sys
import tempfile
import threading
import time

import click
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.phema_tiny_net import write_run # noqa: E402 (needs the repository root on sys.path)
from training import phema # noqa: E402


class PeakRSS:
    """Context manager that samples this process's RSS every few milliseconds and keeps the maximum."""

    def __init__(self, interval_s=0.002):
        self.process = psutil.Process()
        self.interval_s = interval_s
        self.peak = 0

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.done.wait(self.interval_s)

    def __enter__(self):
        self.done = threading.Event()
        self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _measure(run_dir, num_snapshots, out_std, batch):
    """Reconstruct out_std at num_snapshots kimg; return (seconds, peak RSS, RSS before)."""
    in_pkls = phema.list_input_pickles(run_dir)
    with tempfile.TemporaryDirectory() as out_dir:
        rss_before = psutil.Process().memory_info().rss
        with PeakRSS() as peak:
            start = time.perf_counter()
            rec = phema.reconstruct_phema(in_pkls, out_std, out_nimg=num_snapshots * 1024, out_dir=out_dir,
                max_batch_size=batch, verbose=False)
            for _step in rec:
                pass
            seconds = time.perf_counter() - start
    return seconds, peak.peak, rss_before


@click.command()
@click.option('--hidden', help='Width of the two layers of the network (params ~ hidden^2)', type=int, default=1024, show_default=True)
@click.option('--snapshots', help='Numbers of snapshot times (each has one file per stored std)', type=str, default='8,16,32', show_default=True)
@click.option('--outstd', help='Relative stds to reconstruct', type=str, default='0.010,0.020,...,0.080', show_default=True)
@click.option('--batch', help='Values of max_batch_size to compare', type=str, default='8,2', show_default=True)
def main(hidden, snapshots, outstd, batch):
    """Print a table of reconstruction time and peak RSS."""
    counts = sorted(int(n) for n in snapshots.split(','))
    batches = [int(b) for b in batch.split(',')]
    out_std = phema.parse_std_list(outstd)
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        write_run(run_dir, num_snapshots=counts[-1], in_features=hidden, hidden=hidden, out_features=hidden)
        net_mb = sum(os.path.getsize(os.path.join(run_dir, f)) for f in os.listdir(run_dir)) / len(os.listdir(run_dir)) / 2**20
        print(f'Wrote {len(os.listdir(run_dir))} snapshots of {net_mb:.1f} MiB (fp16) in {time.perf_counter() - start:.1f} s; '
              f'{len(out_std)} outputs, {psutil.cpu_count()} CPUs, torch threads {phema.torch.get_num_threads()}')
        print(f'{"snapshots":>9} {"inputs":>6} {"outputs":>7} {"batch":>5} {"passes":>6} {"time_s":>7} '
              f'{"ms/input":>8} {"peak_rss_MiB":>12} {"peak-before_MiB":>15}')
        for num_snapshots in counts:
            for max_batch in batches:
                seconds, peak, before = _measure(run_dir, num_snapshots, out_std, max_batch)
                num_inputs, passes = 2 * num_snapshots, -(-len(out_std) // max_batch)
                print(f'{num_snapshots:>9} {num_inputs:>6} {len(out_std):>7} {max_batch:>5} {passes:>6} {seconds:>7.2f} '
                      f'{seconds / (num_inputs * passes) * 1e3:>8.1f} {peak / 2**20:>12.1f} {(peak - before) / 2**20:>15.1f}')


if __name__ == '__main__':
    main()
