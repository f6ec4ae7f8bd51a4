"""Power function EMA and post-hoc EMA reconstruction (EDM2 Sec. 3 and Appendix C).

The profile math works in float64 numpy, like the reference, so that coefficients
agree with it to the last bit. The EMA trackers update all parameters of a network
with one vectorised `torch._foreach_*` call per tracked profile.
"""

import copy
import json
import os
import re
import warnings

import numpy as np
import torch

import dnnlib

#----------------------------------------------------------------------------
# Power function EMA profiles.

def exp_to_std(exp):
    """Relative standard deviation of a power function EMA profile (EDM2 Eq. 123)."""
    gamma = np.asarray(exp, dtype=np.float64)
    return np.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3))


def std_to_exp(std):
    """Exponent gamma of the profile with the given relative std (EDM2 Eq. 126, Algorithm 2)."""
    std = np.asarray(std, dtype=np.float64)
    # sigma_rel^-2 = (gamma+2)^2 (gamma+3) / (gamma+1) is a cubic in gamma; take its largest real root.
    inv_var = std.reshape(-1) ** -2
    roots = [np.roots([1, 7, 16 - v, 12 - v]).real.max() for v in inv_var]
    return np.asarray(roots, dtype=np.float64).reshape(std.shape)


def power_function_response(ofs, std, len, axis=0):
    """Discrete power function EMA profiles over t = 0..len-1, normalised to unit sum (EDM2 Eqs. 108, 121)."""
    ofs, std = np.broadcast_arrays(ofs, std)
    t_end = np.expand_dims(np.asarray(ofs, dtype=np.float64), axis)
    gamma = np.expand_dims(std_to_exp(std), axis)
    shape = [1] * gamma.ndim
    shape[axis] = -1
    t = np.arange(len).reshape(shape)
    with np.errstate(divide='ignore', invalid='ignore'):
        resp = np.where(t <= t_end, (t / t_end) ** gamma, 0) / t_end * (gamma + 1)
    return resp / np.sum(resp, axis=axis, keepdims=True)


def power_function_correlation(a_ofs, a_std, b_ofs, b_std):
    """Inner product of two power function EMA profiles (EDM2 Eq. 151, Algorithm 3)."""
    a_exp = std_to_exp(a_std)
    b_exp = std_to_exp(b_std)
    # The shorter profile ends first; the integral has a closed form in the ratio of end times.
    t_ratio = a_ofs / b_ofs
    t_exp = np.where(a_ofs < b_ofs, b_exp, -a_exp)
    t_max = np.maximum(a_ofs, b_ofs)
    num = (a_exp + 1) * (b_exp + 1) * t_ratio ** t_exp
    den = (a_exp + b_exp + 1) * t_max
    return num / den


def power_function_beta(std, t_next, t_delta):
    """EMA decay beta that tracks a power function profile during training (EDM2 Eq. 127)."""
    return (1 - t_delta / t_next) ** (std_to_exp(std) + 1)


def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std):
    """Least-squares weights [in, out] that combine stored profiles into target ones (EDM2 Algorithm 3)."""
    in_ofs, in_std = np.broadcast_arrays(in_ofs, in_std)
    out_ofs, out_std = np.broadcast_arrays(out_ofs, out_std)
    col = lambda x: np.asarray(x, dtype=np.float64).reshape(-1, 1)
    row = lambda x: np.asarray(x, dtype=np.float64).reshape(1, -1)
    gram = power_function_correlation(col(in_ofs), col(in_std), row(in_ofs), row(in_std))
    rhs = power_function_correlation(col(in_ofs), col(in_std), row(out_ofs), row(out_std))
    coefs = np.linalg.solve(gram, rhs)
    # Renormalise so that every output is an affine combination of the inputs.
    return coefs / np.sum(coefs, axis=0)

#----------------------------------------------------------------------------
# EMA trackers used by the training loop.

@torch.no_grad()
def _copy_all(src, dst):
    """Copy tensors pairwise (one vectorised call when the lists are non-empty)."""
    if len(dst) > 0:
        torch._foreach_copy_(dst, src)


class PowerFunctionEMA:
    """Tracks one power function EMA per relative std during training (EDM2 Sec. 3.1, Eq. 127)."""

    @torch.no_grad()
    def __init__(self,
        net,                        # Network being trained; its parameters are read at every update().
        stds = [0.050, 0.100],      # Relative standard deviations of the tracked profiles.
    ):
        self.net = net
        self.stds = stds
        self.emas = [copy.deepcopy(net) for _std in stds]

    @torch.no_grad()
    def reset(self):
        """Set every EMA to the current network parameters."""
        for ema in self.emas:
            _copy_all(list(self.net.parameters()), list(ema.parameters()))

    @torch.no_grad()
    def update(self, cur_nimg, batch_size):
        """Advance every EMA to training time cur_nimg (EDM2 Eq. 127)."""
        net_params = list(self.net.parameters())
        for std, ema in zip(self.stds, self.emas):
            beta = float(power_function_beta(std=std, t_next=cur_nimg, t_delta=batch_size))
            torch._foreach_lerp_(list(ema.parameters()), net_params, 1 - beta)

    @torch.no_grad()
    def get(self):
        """Return [(ema_net, suffix)], with buffers taken from the network, e.g. suffix '-0.050'."""
        for ema in self.emas:
            _copy_all(list(self.net.buffers()), list(ema.buffers()))
        return [(ema, f'-{std:.3f}') for std, ema in zip(self.stds, self.emas)]

    def state_dict(self):
        """Profiles and EMA weights, in the reference layout {stds, emas}."""
        return dict(stds=self.stds, emas=[ema.state_dict() for ema in self.emas])

    def load_state_dict(self, state):
        """Inverse of state_dict()."""
        if len(state['emas']) != len(self.emas):
            raise ValueError(f'EMA state holds {len(state["emas"])} profiles, this tracker has {len(self.emas)}')
        self.stds = state['stds']
        for ema, ema_state in zip(self.emas, state['emas']):
            ema.load_state_dict(ema_state)


class TraditionalEMA:
    """Classic EMA with a half-life in Mimg and an optional ramp-up (EDM training loop; EDM2 Sec. 3 baseline)."""

    @torch.no_grad()
    def __init__(self,
        net,                            # Network being trained; its parameters are read at every update().
        halflife_Mimg = float('inf'),   # Half-life of the EMA in millions of images.
        rampup_ratio  = 0.09,           # Half-life never exceeds this fraction of training time. None = no ramp-up.
    ):
        self.net = net
        self.halflife_Mimg = halflife_Mimg
        self.rampup_ratio = rampup_ratio
        self.ema = copy.deepcopy(net)

    @torch.no_grad()
    def reset(self):
        """Set the EMA to the current network parameters."""
        _copy_all(list(self.net.parameters()), list(self.ema.parameters()))

    @torch.no_grad()
    def update(self, cur_nimg, batch_size):
        """Advance the EMA by one batch: beta = 0.5 ** (batch / half-life)."""
        halflife_Mimg = self.halflife_Mimg
        if self.rampup_ratio is not None:
            halflife_Mimg = min(halflife_Mimg, cur_nimg / 1e6 * self.rampup_ratio)
        beta = 0.5 ** (batch_size / max(halflife_Mimg * 1e6, 1e-8))
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.net.parameters()), 1 - beta)

    @torch.no_grad()
    def get(self):
        """Return the EMA network, with buffers taken from the network."""
        _copy_all(list(self.net.buffers()), list(self.ema.buffers()))
        return self.ema

    def state_dict(self):
        """The EMA network's state_dict, as in the reference."""
        return self.ema.state_dict()

    def load_state_dict(self, state):
        """Inverse of state_dict()."""
        self.ema.load_state_dict(state)

#----------------------------------------------------------------------------
# Snapshot files: names, listing and the --outstd list syntax.

def pkl_path(dir, prefix, nimg, std):
    """Path of a snapshot pickle, named <prefix>-<kimg:07d>-<std:.3f>.pkl as in the reference."""
    name = f'{prefix}-{nimg // 1000:07d}-{std:.3f}.pkl'
    return None if dir is None else os.path.join(dir, name)


def kimg_to_nimg(kimg):
    """Training time in images of a snapshot named by kimg, assuming a multiple of 1024 images."""
    nimg = (kimg * 1000 + 999) // 1024 * 1024
    if nimg // 1000 != kimg:
        raise ValueError(f'Snapshot time {kimg} kimg is not a multiple of 1024 images; cannot recover nimg')
    return nimg


SNAPSHOT_INDEX = 'snapshot-nimg.json'


def read_snapshot_index(in_dir):
    """{snapshot file name: exact training images}, written by train.py beside EDM2 snapshots; {} if absent.
    The names hold only kimg, from which the image count is exact only for multiples of 1024 images."""
    path = os.path.join(in_dir, SNAPSHOT_INDEX)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, 'r', encoding='utf-8') as f:
            index = json.load(f)
        if not isinstance(index, dict) or not all(isinstance(v, int) and v >= 0 for v in index.values()):
            raise ValueError('expected {"<snapshot>.pkl": <images>, ...}')
    except (OSError, ValueError) as err:
        raise ValueError(f'{path}: unreadable snapshot index ({err}); delete it to fall back to the times in the file names') from None
    return index


def record_snapshots(run_dir, names, nimg):
    """Add the snapshots just saved (file names) at training time nimg to the run's snapshot index.
    An unreadable index is started afresh with a warning rather than stopping the training run."""
    try:
        index = read_snapshot_index(run_dir)
    except ValueError as err:
        warnings.warn(f'{err}; starting a new index (older snapshots fall back to the times in their names)')
        index = {}
    index.update({name: int(nimg) for name in names})
    with dnnlib.util.atomic_write(os.path.join(run_dir, SNAPSHOT_INDEX), 'w') as f:
        json.dump(dict(sorted(index.items())), f, indent=1)


def list_input_pickles(in_dir, in_prefix=None, in_std=None):
    """Snapshots <prefix>-<kimg>-<std>.pkl in in_dir as EasyDict(path, nimg, std, prefix), sorted by (nimg, std)."""
    if not os.path.isdir(in_dir):
        raise ValueError(f'Input directory does not exist: {in_dir}')
    in_std = set(in_std) if in_std is not None else None
    index = read_snapshot_index(in_dir)
    pkls = []
    with os.scandir(in_dir) as entries:
        for entry in entries:
            match = re.fullmatch(r'(.*)-(\d+)-(\d+\.\d+)\.pkl', entry.name)
            if not match or not entry.is_file():
                continue
            prefix, kimg, std = match.group(1), int(match.group(2)), float(match.group(3))
            if (in_prefix is not None and prefix != in_prefix) or (in_std is not None and std not in in_std):
                continue
            nimg = index.get(entry.name)
            if nimg is None or nimg // 1000 != kimg: # not indexed, or renamed since
                try:
                    nimg = kimg_to_nimg(kimg)
                except ValueError as err:
                    raise ValueError(f'{entry.path}: {err}') from None
            pkls.append(dnnlib.EasyDict(path=entry.path, nimg=nimg, std=std, prefix=prefix))
    return sorted(pkls, key=lambda pkl: (pkl.nimg, pkl.std))


def parse_std_list(text):
    """Parse '0.010,0.015,...,0.250' into a sorted list of relative stds; '...' repeats the last step."""
    if isinstance(text, (list, tuple)):
        values = [float(v) for v in text]
    else:
        try:
            raw = [None if v.strip() == '...' else float(v) for v in text.split(',')]
        except ValueError:
            raise ValueError(f'{text!r} is not a comma-separated list of floats (with optional "...")') from None
        values = []
        for i, v in enumerate(raw):
            values += [v] if v is not None else _expand_ellipsis(raw, i)
    values = sorted(set(values))
    bad = [v for v in values if not 0 < v < 0.289]
    if len(values) == 0 or bad:
        raise ValueError(f'relative std must be in (0, 0.289), got {bad or text!r}')
    return values


def _expand_ellipsis(raw, i):
    """Values that '...' at raw[i] stands for, continuing the step raw[i-1] - raw[i-2] up to raw[i+1]."""
    if i < 2 or raw[i - 2] is None or raw[i - 1] is None:
        raise ValueError("'...' must be preceded by at least two floats")
    if i + 1 >= len(raw) or raw[i + 1] is None:
        raise ValueError("'...' must be followed by a float")
    step = raw[i - 1] - raw[i - 2]
    if step == 0:
        raise ValueError("the two floats before '...' must differ")
    approx_num = (raw[i + 1] - raw[i - 1]) / step - 1
    num = round(approx_num)
    if num <= 0 or abs(num - approx_num) > 1e-4:
        raise ValueError("'...' must stand for a non-empty, evenly spaced interval")
    return [raw[i - 1] + step * (j + 1) for j in range(num)]

#----------------------------------------------------------------------------
# Post-hoc EMA reconstruction from stored snapshots (EDM2 Sec. 3.2).

def _load_snapshot(path, trust):
    """Read a snapshot pickle and check it holds an 'ema' network."""
    from torch_utils import persistence # Imported lazily: only reconstruction needs it.
    try:
        data = persistence.load_pickle(path, trust=trust)
    except dnnlib.util.USER_ERRORS:
        raise # Already one line that names the file.
    except Exception as err: # Anything else that fails to read is still a bad input file, not a bug here.
        raise ValueError(f'Cannot read input pickle {path}: {type(err).__name__}: {err}') from err
    if not isinstance(data, dict) or not isinstance(data.get('ema'), torch.nn.Module):
        raise ValueError(f'Input pickle {path} is not a network snapshot (no "ema" network in it)')
    return data


def _architecture(net):
    """Names and shapes of all parameters and buffers: what must agree across input snapshots."""
    tensors = list(net.named_parameters()) + list(net.named_buffers())
    return [(name, tuple(tensor.shape)) for name, tensor in tensors]


def _check_architecture(arch, ref_arch, path, ref_path):
    """Raise if a snapshot's parameters differ from the first snapshot's."""
    if arch == ref_arch:
        return
    diff = sorted(set(arch) ^ set(ref_arch))
    detail = f'{diff[0][0]} {list(diff[0][1])}' if diff else 'tensor order'
    raise ValueError(f'Input pickle {path} has a different network architecture than {ref_path} '
        f'(first difference: {detail}); reconstruct from snapshots of one training run only')


def _run_signature(data):
    """What snapshots of one training run share: network class and kwargs, dataset, loss and encoder options."""
    def describe(obj):
        if obj is None:
            return None
        kwargs = getattr(obj, '_init_kwargs', None)
        return dict(dnnlib.EasyDict(kwargs or {}), class_name=type(obj).__name__)
    return dict(architecture=describe(data['ema']), dataset=dict(data.get('dataset_kwargs') or {}),
                training_options=dict(loss=describe(data.get('loss_fn')), encoder=describe(data.get('encoder'))))


def _first_difference(a, b, prefix=''):
    """'key: A vs B' for the first differing entry of two nested dicts, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(key), b.get(key), f'{prefix}{key}.')
            if found is not None:
                return found
        return None
    try:
        same = bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # arrays and tensors compare elementwise
        same = repr(a) == repr(b)
    return None if same else f'{prefix[:-1]}: {a!r} vs {b!r}'


def check_same_run(signature, ref_signature, path, ref_path):
    """Warn when two input snapshots look like they come from different training runs (EDM2 reconstructs one run)."""
    for field in ('architecture', 'dataset', 'training_options'):
        diff = _first_difference(ref_signature[field], signature[field])
        if diff is not None:
            text = diff if len(diff) <= 200 else diff[:197] + '...'
            warnings.warn(f'Input pickles {ref_path} and {path} differ in {field} ({text}); '
                          'they look like snapshots of different training runs, which reconstruction should not mix',
                          stacklevel=2)


class _Reconstruction:
    """Iterable over reconstruction steps: for each batch of outputs, one pass over the inputs."""

    def __init__(self, in_pkls, out_std_batches, out_nimg, out_dir, out_prefix, trust_pickle):
        self.in_pkls = in_pkls
        self.out_std_batches = out_std_batches
        self.out_nimg = out_nimg
        self.out_dir = out_dir
        self.out_prefix = out_prefix
        self.trust_pickle = trust_pickle

    def __len__(self):
        return len(self.out_std_batches) * len(self.in_pkls)

    def __iter__(self):
        step = dnnlib.EasyDict(step_idx=0, num_steps=len(self), out=[])
        for out_std in self.out_std_batches:
            step.out = []
            for out in self._stream_batch(out_std):
                step.out = out
                yield step
                step.step_idx += 1

    @torch.no_grad()
    def _stream_batch(self, out_std):
        """Accumulate sum_i coef[i, j] * input_i into each output j, reading each input once."""
        in_nimg = [pkl.nimg for pkl in self.in_pkls]
        in_std = [pkl.std for pkl in self.in_pkls]
        coefs = solve_posthoc_coefficients(in_nimg, in_std, self.out_nimg, out_std)
        outs = []
        for i, pkl in enumerate(self.in_pkls):
            data = _load_snapshot(pkl.path, self.trust_pickle)
            arch, signature = _architecture(data['ema']), _run_signature(data)
            if i == 0:
                ref_arch, ref_signature, ref_path, dtype = arch, signature, pkl.path, _float_dtype(data['ema'])
            _check_architecture(arch, ref_arch, pkl.path, ref_path)
            if out_std is self.out_std_batches[0]:  # warn once, not once per batch
                check_same_run(signature, ref_signature, pkl.path, ref_path)
            in_net = data['ema'].to(torch.float32) # In place: the first input's data becomes the output template.
            if i == 0:
                outs = [self._new_output(data, std) for std in out_std]
            in_params = list(in_net.parameters())
            for j, out in enumerate(outs):
                torch._foreach_add_(list(out.net.parameters()), in_params, alpha=float(coefs[i, j]))
                _copy_all(list(in_net.buffers()), list(out.net.buffers())) # Buffers follow the latest input.
            del data, in_net # Keep at most one input in memory.
            if i == len(self.in_pkls) - 1:
                for out in outs:
                    self._save_output(out, dtype)
                yield outs
            else:
                yield []

    def _new_output(self, template, std):
        """A copy of the first input snapshot whose 'ema' parameters are zero, ready to accumulate into."""
        pkl_data = copy.deepcopy(template)
        for param in pkl_data['ema'].parameters():
            param.zero_()
        return dnnlib.EasyDict(net=pkl_data['ema'], nimg=self.out_nimg, std=std, pkl_data=pkl_data, pkl_path=None)

    def _save_output(self, out, dtype):
        """Cast back to the input precision and write the snapshot pickle atomically."""
        out.net.to(dtype)
        out.pkl_path = pkl_path(self.out_dir, self.out_prefix, self.out_nimg, out.std)
        if out.pkl_path is not None:
            from torch_utils import persistence
            with dnnlib.util.writing(self.out_dir):
                os.makedirs(self.out_dir, exist_ok=True)
            dnnlib.util.remove_stale_temp_files(self.out_dir, targets=re.escape(os.path.basename(out.pkl_path)))
            persistence.save_pickle(out.pkl_data, out.pkl_path)


def _float_dtype(net):
    """Precision the snapshot stores its network in (float16 for EDM2 snapshots)."""
    return next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)


def _select_inputs(in_pkls, out_nimg):
    """Inputs usable for reconstruction at out_nimg: 0 < nimg <= out_nimg, no duplicated (nimg, std)."""
    if len(in_pkls) == 0:
        raise ValueError('No input pickles found')
    if out_nimg is None:
        out_nimg = max(pkl.nimg for pkl in in_pkls)
    elif not any(pkl.nimg == out_nimg for pkl in in_pkls):
        kimgs = sorted({pkl.nimg // 1000 for pkl in in_pkls})
        raise ValueError(f'Reconstruction time {out_nimg // 1000} kimg matches no input pickle; available kimg: {kimgs}')
    in_pkls = [pkl for pkl in in_pkls if 0 < pkl.nimg <= out_nimg]
    if len(in_pkls) == 0:
        raise ValueError(f'No input pickles with 0 < kimg <= {out_nimg // 1000}')
    seen = {}
    for pkl in in_pkls:
        if (pkl.nimg, pkl.std) in seen: # Would make the least-squares system singular.
            raise ValueError(f'Input pickles {seen[(pkl.nimg, pkl.std)]} and {pkl.path} share training time and std; '
                'select one set with --inprefix or --instd')
        seen[(pkl.nimg, pkl.std)] = pkl.path
    return in_pkls, out_nimg


def reconstruct_phema(
    in_pkls,                    # Input snapshots as EasyDict(path, nimg, std), e.g. from list_input_pickles().
    out_std,                    # Relative std (float) or list of them to reconstruct.
    out_nimg        = None,     # Training time to reconstruct at; must match an input. None = latest input.
    out_dir         = None,     # Where to write the output pickles. None = do not write, only yield.
    out_prefix      = 'phema',  # Output filename prefix.
    skip_existing   = False,    # Leave out outputs whose file already exists?
    max_batch_size  = 8,        # Outputs held in memory at once; each extra batch re-reads all inputs.
    trust_pickle    = False,    # Allow input pickles to run their embedded code (unknown classes)?
    verbose         = True,     # Print the plan?
):
    """Post-hoc EMA reconstruction (EDM2 Sec. 3.2, Algorithm 3). Returns an iterable of progress steps
    EasyDict(step_idx, num_steps, out), where out lists EasyDict(net, nimg, std, pkl_data, pkl_path)
    once a batch is complete and is empty otherwise."""
    in_pkls, out_nimg = _select_inputs(in_pkls, out_nimg)
    out_std = [float(out_std)] if np.ndim(out_std) == 0 else sorted({float(std) for std in out_std})
    if not all(0 < std < 0.289 for std in out_std):
        raise ValueError(f'Relative std must be in (0, 0.289), got {out_std}')
    if max_batch_size < 1:
        raise ValueError(f'max_batch_size must be at least 1, got {max_batch_size}')
    if skip_existing and out_dir is not None:
        out_std = [std for std in out_std if not os.path.isfile(pkl_path(out_dir, out_prefix, out_nimg, std))]
    num_batches = -(-len(out_std) // max_batch_size)
    out_std_batches = [[float(s) for s in batch] for batch in np.array_split(out_std, num_batches)] if out_std else []
    if verbose:
        print(f'Loading {len(in_pkls)} input pickles...')
        for pkl in in_pkls:
            print(f'    {pkl.path}')
        print(f'Reconstructing {len(out_std)} output pickles in {num_batches} batches...')
        for i, batch in enumerate(out_std_batches):
            for std in batch:
                print(f'    batch {i}: {pkl_path(out_dir if out_dir is not None else "", out_prefix, out_nimg, std)}')
    return _Reconstruction(in_pkls, out_std_batches, out_nimg, out_dir, out_prefix, trust_pickle)

#----------------------------------------------------------------------------
# Plot of the stored and reconstructed EMA profiles.

def power_function_profile(t, ofs, std):
    """Continuous power function EMA profile at times t for one that ends at ofs (EDM2 Eq. 121)."""
    gamma = float(std_to_exp(std))
    t = np.asarray(t, dtype=np.float64)
    return np.where(t <= ofs, (gamma + 1) / ofs * np.clip(t / ofs, 0, 1) ** gamma, 0)


def plot_ema_profiles(in_nimg, in_std, out_nimg, out_std, path, num_points=1000):
    """Save a PNG of the stored profiles and of each target profile next to its reconstruction."""
    dnnlib.util.require('matplotlib', '--plot')
    from matplotlib.backends.backend_agg import FigureCanvasAgg # Object API: leaves the global backend alone.
    from matplotlib.figure import Figure
    t = np.linspace(0, out_nimg, num_points)
    stored = np.stack([power_function_profile(t, ofs, std) for ofs, std in zip(in_nimg, in_std)])
    coefs = solve_posthoc_coefficients(in_nimg, in_std, out_nimg, out_std)
    fig = Figure(figsize=(10, 7))
    FigureCanvasAgg(fig)
    ax_in, ax_out = fig.subplots(2, 1, sharex=True)
    for profile in stored:
        ax_in.plot(t / 1e3, profile * 1e6, color='gray', lw=0.6)
    ax_in.set_title(f'{len(in_nimg)} stored profiles (std {sorted(set(in_std))})')
    for j, std in enumerate(out_std):
        line, = ax_out.plot(t / 1e3, coefs[:, j] @ stored * 1e6, lw=1.2, label=f'std={std:.3f} reconstructed')
        ax_out.plot(t / 1e3, power_function_profile(t, out_nimg, std) * 1e6, ls='--', color=line.get_color())
    ax_out.set_title(f'Reconstructed (solid) vs. target (dashed) profiles at {out_nimg // 1000} kimg')
    ax_out.set_xlabel('training time (kimg)')
    for ax in (ax_in, ax_out):
        ax.set_ylabel('weight per Mimg')
    ax_out.legend(fontsize='small', ncol=2)
    with dnnlib.util.atomic_write(path, 'wb') as f:
        fig.savefig(f, format='png', dpi=100)

#----------------------------------------------------------------------------
