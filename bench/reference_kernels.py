"""Run one of our scripts on the reference code's kernels: einsum attention, resampling by depthwise
convolutions and EDM2 weights derived in every call (training.networks.reference_kernels), whatever the flags.

    python -m bench.reference_kernels train.py --fp16=1 ...

The e2e benchmark runs its reference rows (EDM's --fp16=1, fp32 sampling, EDM2's fp16) this way, so that they
time the layers NVlabs/edm and NVlabs/edm2 run rather than ours under the reference's flags.
"""

import sys

from bench.compile_report import run_script
from training import networks


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit('usage: python -m bench.reference_kernels SCRIPT.py [ARGS...]')
    with networks.reference_kernels():
        run_script(sys.argv[1], sys.argv[2:])


if __name__ == '__main__':
    main()
