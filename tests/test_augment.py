"""AugmentPipe: reference random-draw order, label layout, exact simple transforms, pickling."""

import contextlib
import io
import pickle
import re

import pytest
import torch

from torch_utils import persistence
from training.augment import AugmentPipe

FULL = dict(p=0.5, xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
            brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)

#----------------------------------------------------------------------------
# Helpers (also used by test_loss.py): random draws in the rng_draws.txt notation.

_FUNCS = ('rand', 'randn', 'randint', 'randn_like')


@contextlib.contextmanager
def record_draws():
    """Yield a list that fills with 'torch.fn[shape]:dtype' for every draw inside the block."""
    draws = []
    originals = {name: getattr(torch, name) for name in _FUNCS}

    def wrap(name, fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            draws.append(f'torch.{name}{list(out.shape)}:{str(out.dtype).replace("torch.", "")}')
            return out
        return wrapper
    try:
        for name, fn in originals.items():
            setattr(torch, name, wrap(name, fn))
        yield draws
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


def expected_draws(spec_dir, case: str) -> list[str]:
    """The draws listed under '## <case>:' in rng_draws.txt."""
    lines = (spec_dir / 'rng_draws.txt').read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f'## {case}:'))
    draws = []
    for line in lines[start + 1:]:
        if line.startswith('## '):
            break
        m = re.fullmatch(r'\s*\d+\.\s+(.+?)\s*', line)
        if m:
            draws.append(m.group(1))
    return draws

#----------------------------------------------------------------------------

EDM_TRAIN = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


def _images(n=4, c=3, res=16, seed=0):
    return torch.rand([n, c, res, res], generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize('case,kwargs,seed', [('aug.full', FULL, 2000), ('aug.edm_train_cfg', dict(p=0.5, **EDM_TRAIN), 2001)])
def test_draw_order_matches_reference(spec_dir, case, kwargs, seed):
    images = _images()
    torch.manual_seed(seed)
    with record_draws() as draws:
        out, labels = AugmentPipe(**kwargs)(images)
    assert draws == expected_draws(spec_dir, case)
    assert out.shape == images.shape and torch.isfinite(out).all()


def test_label_layout():
    images = _images()
    _, labels = AugmentPipe(p=0.12, **EDM_TRAIN)(images)
    assert labels.shape == (4, 9)  # EDM networks use augment_dim=9
    _, labels = AugmentPipe(**FULL)(images)
    assert labels.shape == (4, 1 + 1 + 2 + 2 + 1 + 2 + 2 + 2 + 1 + 1 + 1 + 2 + 1)
    _, labels = AugmentPipe()(images)
    assert labels.shape == (4, 0)


def test_flips_follow_labels():
    images = _images(n=16)
    torch.manual_seed(0)
    out, labels = AugmentPipe(p=1, xflip=1, yflip=1)(images)
    for i in range(16):
        expected = images[i]
        if labels[i, 0] == 1:
            expected = expected.flip(2)
        if labels[i, 1] == 1:
            expected = expected.flip(1)
        assert torch.equal(out[i], expected)
    assert 0 < labels[:, 0].sum() < 16  # xflip=1 with p=1 flips about half


def test_integer_rotation_follows_labels():
    images = _images(n=16)
    torch.manual_seed(1)
    out, labels = AugmentPipe(p=1, rotate_int=1)(images)
    for i in range(16):
        k = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}[(int(labels[i, 0]), int(labels[i, 1]))]
        assert torch.equal(out[i], torch.rot90(images[i], k=k, dims=(1, 2)))


def test_disabled_geometry_is_near_identity():
    images = _images()
    out, labels = AugmentPipe(p=0, scale=1, rotate_frac=1, aniso=1, translate_frac=1)(images)
    assert torch.all(labels == 0)
    # Resampling through the 2x up/down wavelet filters is almost lossless.
    assert (out - images).abs().max() < 0.05


def test_brightness_adds_offset():
    images = _images()
    torch.manual_seed(3)
    out, labels = AugmentPipe(p=1, brightness=1, brightness_std=0.2)(images)
    offset = (labels[:, 0] * 0.2)[:, None, None, None]
    torch.testing.assert_close(out, images + offset, rtol=1e-5, atol=1e-5)


def test_grayscale_and_bad_channels():
    out, _ = AugmentPipe(p=1, contrast=1, saturation=1)(_images(c=1))
    assert out.shape == (4, 1, 16, 16)
    with pytest.raises(ValueError, match='RGB'):
        AugmentPipe(p=1, brightness=1)(_images(c=2))


def test_pickle_roundtrip_safe_loader():
    pipe = AugmentPipe(p=0.12, **EDM_TRAIN)
    buf = io.BytesIO()
    pickle.dump(pipe, buf)
    buf.seek(0)
    loaded = persistence.load_pickle(buf)
    assert type(loaded).__name__ == 'AugmentPipe'
    assert loaded.p == pytest.approx(0.12) and loaded.xflip == 1e8 and loaded.rotate_int == 0
    images = _images()
    torch.manual_seed(5)
    a = pipe(images)
    torch.manual_seed(5)
    b = loaded(images)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
