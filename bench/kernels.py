"""Where a step's device time goes: `torch.profiler` over a few calls, kernels grouped by what they do.

    from bench import kernels
    report = kernels.profile(step, device, calls=3)   # dict: wall_s, busy_s, groups {name: s}, top [...]

`busy_s` is the device time of all kernels per call; `wall_s - busy_s` is time the device sat idle
(launch overhead, host syncs, data), the part CUDA graphs could win back. The groups say whether
convolutions, fused element-wise kernels, attention, the optimizer or the augmentation dominate.
"""

import re
import time

import torch

# Kernel name patterns, first match wins. Names are cuDNN/cuBLAS/CUTLASS/Triton/ATen kernel symbols.
GROUPS = (
    ('layout', r'nchwToNhwc|nhwcToNchw'),
    ('convolution', r'conv|cudnn|xmma|implicit_gemm|wgrad|dgrad|fprop'),
    ('attention', r'flash|fmha|attention|softmax'),
    ('matmul', r'gemm|cublas|cutlass|matmul|sm\d+_'),
    ('optimizer', r'adam|multi_tensor|foreach'),
    ('augmentation', r'grid_sampler|upfirdn'),
    ('norm', r'group_norm|norm'),
    ('triton', r'^triton_'),
    ('copy', r'copy|fill|memset|cat'),
)


def group_of(name: str) -> str:
    """The GROUPS name whose pattern matches the kernel name (case-insensitive), else 'other'."""
    for group, pattern in GROUPS:
        if re.search(pattern, name, re.IGNORECASE):
            return group
    return 'other'


def profile(fn, device: torch.device, calls: int = 3, top: int = 30) -> dict:
    """Profile `calls` synchronised calls of `fn` (after one warm-up); times are per call, in seconds."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from bench import timing
    fn()
    timing.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        timing.synchronize(device)
        wall = (time.perf_counter() - start) / calls
    kernels = {}
    for event in prof.events():
        if device.type == 'cuda' and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if device.type != 'cuda' and (event.cpu_parent is not None or event.device_type != torch.autograd.DeviceType.CPU):
            continue  # on the CPU: top-level ops only, so nested ops are not counted twice
        duration = event.device_time if device.type == 'cuda' else event.cpu_time_total
        kernels.setdefault(event.name, [0.0, 0])
        kernels[event.name][0] += duration / 1e6 / calls
        kernels[event.name][1] += 1
    groups = {}
    for name, (seconds, _count) in kernels.items():
        group = group_of(name)
        groups[group] = groups.get(group, 0.0) + seconds
    ranked = sorted(kernels.items(), key=lambda item: -item[1][0])[:top]
    return dict(wall_s=wall, busy_s=sum(s for s, _c in kernels.values()), launches=sum(c for _s, c in kernels.values()) // calls,
                groups=dict(sorted(groups.items(), key=lambda item: -item[1])),
                top=[dict(name=name[:160], s=seconds, calls=count // calls, group=group_of(name))
                     for name, (seconds, count) in ranked])
