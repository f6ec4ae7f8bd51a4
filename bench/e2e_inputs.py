"""Inputs of `python -m bench --mode=e2e`, made on first use in a work folder: a labelled PNG dataset,
EDM2 raw latents, network snapshots (EDM and EDM2), FID reference statistics and a random-weight VAE."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

from bench import e2e_rows
from dnnlib.util import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# Command-line helpers.

def last_line(text: str) -> str:
    """The last non-empty line (of stderr: the one-line error of our scripts); tqdm's \\r updates split too."""
    lines = [line.strip() for line in text.replace('\r', '\n').splitlines() if line.strip()]
    return lines[-1] if lines else ''


def flag_value(args: list[str], flag: str) -> str | None:
    """Value of the last `--flag=value` or `--flag value` in an argument list (click: the last one wins)."""
    value = None
    for idx, arg in enumerate(args):
        if arg.startswith(flag + '='):
            value = arg.split('=', 1)[1]
        elif arg == flag and idx + 1 < len(args):
            value = args[idx + 1]
    return value

#----------------------------------------------------------------------------
# Inputs: made once per work folder, on first use, and reused when --workdir is given again.

def spread_label(idx: int, count: int, classes: int) -> int:
    """Labels spread over 0 ... classes - 1 (both ends used), so the dataset's label_dim is `classes`."""
    return round(idx * (classes - 1) / max(count - 1, 1))


def _write_png_folder(folder: str, count: int, resolution: int, classes: int, seed: int) -> None:
    """`count` random RGB images with labels (dataset.json), the input of `dataset_tool.py convert`."""
    import PIL.Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = []
    for idx in range(count):
        name = f'{idx:06d}.png'
        PIL.Image.fromarray(rng.integers(0, 256, [resolution, resolution, 3], dtype=np.uint8)).save(os.path.join(folder, name))
        labels.append([name, spread_label(idx, count, classes)])
    with open(os.path.join(folder, 'dataset.json'), 'wt') as f:
        json.dump(dict(labels=labels), f)


def make_image_dataset(dest: str, count: int, resolution: int, timeout_s: float = 600, classes: int = 10,
                       seed: int = 0) -> str:
    """A labelled PNG dataset zip made by `dataset_tool.py convert` from random images."""
    with tempfile.TemporaryDirectory(dir=os.path.dirname(dest)) as src:
        _write_png_folder(src, count, resolution, classes, seed)
        workers = ['--workers=1'] if count < 1000 else []  # a pool of one process per core pays off only for many images
        proc = subprocess.run([sys.executable, os.path.join(ROOT, 'dataset_tool.py'), 'convert', f'--source={src}',
                               f'--dest={dest}', '--force'] + workers, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f'dataset_tool.py convert failed: {last_line(proc.stderr)}')
    return dest


def make_latent_dataset(dest: str, count: int, resolution: int, classes: int = 1000, seed: int = 0) -> str:
    """A zip of raw 8-channel latents (mean, std) as `dataset_tool.py encode` writes them, drawn at random
    (no VAE needed: EDM2 training reads the raw latents only)."""
    rng = np.random.default_rng(seed)
    tmp = dest + '.tmp'
    with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED) as zf:
        labels = []
        for idx in range(count):
            mean = rng.normal(0, 4, [4, resolution, resolution])
            std = rng.uniform(0.05, 0.2, [4, resolution, resolution])
            buf = io.BytesIO()
            np.save(buf, np.concatenate([mean, std]).astype(np.float32))
            name = f'{idx // 1000:05d}/img-mean-std-{idx:08d}.npy'
            zf.writestr(name, buf.getvalue())
            labels.append([name, spread_label(idx, count, classes)])
        zf.writestr('dataset.json', json.dumps(dict(labels=labels)))
    os.replace(tmp, dest)
    return dest


def make_fid_ref(dest: str, dim: int = 2048) -> str:
    """EDM-format FID reference statistics (.npz of mu, sigma) of a standard normal: the timing needs
    their shape, not their values."""
    tmp = dest + '.tmp.npz'
    np.savez(tmp, mu=np.zeros(dim), sigma=np.eye(dim))
    os.replace(tmp, dest)
    return dest


def make_vae(dest: str, size: str) -> str:
    """A diffusers folder with a randomly initialised Stable Diffusion VAE architecture (full) or a narrow
    copy (tiny): the encoder's speed does not depend on its weights."""
    try:
        import diffusers
    except ImportError:
        raise RuntimeError('the encode rows need diffusers (pip install diffusers) or --vae NAME|FOLDER') from None
    from bench import configs
    tmp = dest + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    diffusers.AutoencoderKL(**configs.vae_config(size)).save_pretrained(tmp)
    os.replace(tmp, dest)
    return dest


def point_encoder_at_vae(path: str, vae: str) -> str:
    """Make the StabilityVAEEncoder of an EDM2 snapshot load `vae` (name or diffusers folder) instead of the
    Hugging Face VAE train.py recorded, rewriting the pickle atomically. Read with the safe loader: no code
    stored in the file runs."""
    from torch_utils import persistence
    vae = os.path.abspath(vae) if os.path.isdir(vae) else vae  # the scripts run in the repository root
    data = persistence.load_pickle(path)
    encoder = data.get('encoder')
    if not hasattr(encoder, 'vae_name'):
        raise RuntimeError(f'{path} holds no VAE encoder ({type(encoder).__name__}); were its training data latents?')
    if encoder.vae_name != vae:
        # A new encoder, so that its constructor arguments (what the safe loader rebuilds from) name the VAE too.
        data['encoder'] = type(encoder)(*encoder.init_args, **dict(encoder.init_kwargs, vae_name=vae))
        persistence.save_pickle(data, path)
    return path


def _snapshots(folder: str) -> list[str]:
    """Names of the network snapshots in a run folder, oldest first (none if the folder is missing)."""
    return sorted(n for n in os.listdir(folder) if n.startswith('network-snapshot-')) if os.path.isdir(folder) else []


class Workspace:
    """The work folder: the made-up inputs (once each, on demand) and a fresh output folder per row."""

    def __init__(self,
        root:     str,              # Work folder; inputs found there are reused.
        size:     str,              # 'full' or 'tiny' (e2e_rows.DATA, base arguments of the groups).
        device:   str,              # What the scripts get as --device: 'cpu' or 'cuda'.
        images:   int | None,       # PNG dataset size; None = e2e_rows.DATA[size]['images'].
        vae:      str | None,       # VAE name or diffusers folder for the encode rows; None = random one made here.
        timeout_s: float = 600,     # Limit of each command that makes an input.
    ):
        self.root, self.size, self.device, self.vae, self.timeout_s = root, size, device, vae, timeout_s
        self.data = dict(e2e_rows.DATA[size], **({} if images is None else dict(images=images)))
        self._made, self._failed = {}, {}
        os.makedirs(root, exist_ok=True)

    def _make(self, key: str, fn, *args) -> str:
        """Make input `key` once; a failure is remembered, so every row that needs it fails the same way."""
        if key in self._failed:
            raise RuntimeError(self._failed[key])
        if key not in self._made:
            try:
                self._made[key] = fn(*args)
            except (RuntimeError, OSError, ValueError, UserError, subprocess.TimeoutExpired) as err:  # UserError: a bad pickle
                self._failed[key] = f'making {key} failed: {err}'
                raise RuntimeError(self._failed[key]) from None
        return self._made[key]

    def _existing(self, path: str, fn, *args) -> str:
        return path if os.path.exists(path) else fn(path, *args)

    def path(self, key: str) -> str:
        """The input a placeholder names, made if missing."""
        d, size = self.data, self.size
        if key == 'data':
            path = os.path.join(self.root, f'data-{d["resolution"]}px-{d["images"]}.zip')
            return self._make(key, self._existing, path, make_image_dataset, d['images'], d['resolution'], self.timeout_s)
        if key == 'encode_data':
            path = os.path.join(self.root, f'data-{d["encode_resolution"]}px-{d["encode_images"]}.zip')
            return self._make(key, self._existing, path, make_image_dataset, d['encode_images'], d['encode_resolution'],
                              self.timeout_s)
        if key == 'latents':
            path = os.path.join(self.root, f'latents-{d["latent_resolution"]}px-{d["latents"]}.zip')
            return self._make(key, self._existing, path, make_latent_dataset, d['latents'], d['latent_resolution'])
        if key == 'ref':
            return self._make(key, self._existing, os.path.join(self.root, 'fid-ref-2048.npz'), make_fid_ref)
        if key == 'vae':
            if self.vae is not None:
                return self.vae
            return self._make(key, self._existing, os.path.join(self.root, f'vae-{size}'), make_vae, size)
        if key == 'network':
            return self._make(key, self._make_snapshot)
        if key in e2e_rows.EDM2_NETS:
            return self._make(key, self._make_edm2_snapshot, key)
        raise KeyError(key)

    def offer_snapshot(self, outdir: str) -> None:
        """A finished fp32 'train' row's folder: its last snapshot serves the generate rows of this run."""
        found = _snapshots(outdir)
        if found and 'network' not in self._made and 'network' not in self._failed:
            self._made['network'] = os.path.join(outdir, found[-1])

    def _train_once(self, folder: str, make_args, what: str) -> str:
        """The last snapshot in `folder`, made first by `train.py make_args()` if there is none."""
        found = _snapshots(folder)
        if not found:
            shutil.rmtree(folder, ignore_errors=True)
            argv = [sys.executable, 'train.py'] + make_args()
            proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=self.timeout_s)
            found = _snapshots(folder)
            if proc.returncode != 0 or not found:
                raise RuntimeError(f'train.py for {what} failed: {last_line(proc.stderr) or last_line(proc.stdout)}')
        return os.path.join(folder, found[-1])

    def _make_snapshot(self) -> str:
        """The network pickle of the generate rows: train.py as the 'train' rows run it (fp32), one batch."""
        folder = os.path.join(self.root, f'snapshot-{self.size}')

        def make_args():
            args = self.fill(e2e_rows.GROUPS['train'].base[self.size], folder)
            return args + [f'--duration={int(flag_value(args, "--batch")) / 1000}k', '--workers=0']
        return self._train_once(folder, make_args, 'the snapshot')

    def _make_edm2_snapshot(self, key: str) -> str:
        """A network pickle of the edm2-gen rows (e2e_rows.EDM2_NETS[key]): train.py as the 'edm2' rows run it,
        for one round of one GPU batch, its encoder pointed at the bench's VAE ({vae})."""
        preset, extra = e2e_rows.EDM2_NETS[key]
        folder = os.path.join(self.root, f'snapshot-{preset}-{self.size}')

        def make_args():
            args = self.fill(e2e_rows.GROUPS['edm2'].base[self.size], folder)
            batch = flag_value(args, '--batch-gpu') or flag_value(args, '--batch')
            args = [f'--preset={preset}' if arg.startswith('--preset=') else arg for arg in args]
            return args + [f'--batch={batch}', f'--duration={batch}', f'--status={batch}'] + list(extra[self.size])
        return point_encoder_at_vae(self._train_once(folder, make_args, f'the {preset} snapshot'), self.path('vae'))

    def compile_cache(self, row) -> tuple[str, str] | None:
        """(inductor cache folder, 'cold' or 'warm from ROW') of a row that compiles; a cold one is emptied."""
        if row.warm_from is None and not any(arg.split('=')[0] in e2e_rows.COMPILE_FLAGS for arg in row.args):
            return None
        path = os.path.join(self.root, 'compile-cache', row.warm_from or row.name)
        if row.warm_from is None:
            shutil.rmtree(path, ignore_errors=True)
            return path, 'cold'
        warm = os.path.isdir(path) and len(os.listdir(path)) > 0
        return path, f'warm from {row.warm_from}' if warm else f'cold ({row.warm_from} left no cache)'

    def compile_report_path(self, row_name: str) -> str:
        """Where a compiling row's bench.compile_report goes (outside its output folder, which the script owns);
        a report left by an earlier run is removed."""
        folder = os.path.join(self.root, 'compile-reports')
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f'{row_name}.json')
        if os.path.exists(path):
            os.remove(path)
        return path

    def outdir(self, row_name: str) -> str:
        """An empty output folder for one run of a row."""
        path = os.path.join(self.root, 'runs', row_name)
        shutil.rmtree(path, ignore_errors=True)
        return path

    def fill(self, args, outdir: str) -> list[str]:
        """Arguments with their {placeholders} replaced; inputs are made on first use."""
        filled = []
        for arg in args:
            values = dict(device=self.device, outdir=outdir, images=str(self.data['images']))
            for key in ('data', 'encode_data', 'latents', 'ref', 'vae', 'network', *e2e_rows.EDM2_NETS):
                if '{' + key + '}' in arg:
                    values[key] = self.path(key)
            filled.append(arg.format(**values))
        return filled
