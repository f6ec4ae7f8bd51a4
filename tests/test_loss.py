"""Losses: reference random-draw order, hand-computed values, Stable Target Field properties."""

import io
import pickle

import numpy as np
import pytest
import torch

from tests.test_augment import EDM_TRAIN, expected_draws, record_draws
from torch_utils import persistence
from training.augment import AugmentPipe
from training.loss import EDM2Loss, EDMLoss, STFLoss, VELoss, VPLoss, stf_target


class ToyNet:
    """Deterministic stand-in denoiser (the thing under test is the loss): D = x / (1 + sigma)."""

    def __init__(self, logvar=None):
        self.logvar = logvar
        self.calls = []

    def __call__(self, x, sigma, labels=None, augment_labels=None, return_logvar=False):
        self.calls.append(dict(sigma=sigma, labels=labels, augment_labels=augment_labels))
        out = x / (1 + sigma)
        if return_logvar:
            return out, torch.full_like(sigma, self.logvar)
        return out


def _images(n=4, res=16, seed=0):
    return torch.rand([n, 3, res, res], generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize('case,make,seed,net_draws', [
    ('loss.vp', lambda: (VPLoss(), None), 1000, 1),
    ('loss.ve', lambda: (VELoss(sigma_min=0.02, sigma_max=100), None), 1001, 1),
    ('loss.edm', lambda: (EDMLoss(), None), 1002, 1),
    ('loss.edm_aug', lambda: (EDMLoss(), AugmentPipe(p=0.12, **EDM_TRAIN)), 1003, 1),
    ('loss.edm2', lambda: (EDM2Loss(P_mean=-0.8, P_std=1.6), None), 3000, 0),
])
def test_draw_order_matches_reference(spec_dir, case, make, seed, net_draws):
    loss_fn, pipe = make()
    images = _images()
    torch.manual_seed(seed)
    with record_draws() as draws:
        loss = loss_fn(net=ToyNet(logvar=0.0), images=images, labels=None, augment_pipe=pipe)
    expected = expected_draws(spec_dir, case)
    # The reference networks draw their label dropout last; ToyNet has none.
    assert draws == expected[:len(expected) - net_draws]
    assert loss.shape == (4, 3, 16, 16)


def test_edm_loss_by_hand():
    images = _images()
    torch.manual_seed(7)
    rnd_normal = torch.randn([4, 1, 1, 1])
    noise = torch.randn_like(images)
    sigma = (rnd_normal * 1.2 - 1.2).exp()
    denoised = (images + noise * sigma) / (1 + sigma)
    expected = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2 * (denoised - images) ** 2
    torch.manual_seed(7)
    net = ToyNet()
    loss = EDMLoss()(net=net, images=images)
    torch.testing.assert_close(loss, expected)
    assert net.calls[0]['augment_labels'] is None


def test_edm2_loss_by_hand():
    images = _images()
    torch.manual_seed(8)
    sigma = (torch.randn([4, 1, 1, 1]) * 1.0 - 0.4).exp()
    noise = torch.randn_like(images)
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    expected = weight / np.exp(0.3) * ((images + noise * sigma) / (1 + sigma) - images) ** 2 + 0.3
    torch.manual_seed(8)
    loss = EDM2Loss()(net=ToyNet(logvar=0.3), images=images)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match='augment'):
        EDM2Loss()(net=ToyNet(0.0), images=images, augment_pipe=AugmentPipe(p=0.1, xflip=1))


def test_vp_ve_sigma_ranges():
    vp = VPLoss()
    assert float(vp.sigma(1.0)) == pytest.approx(np.sqrt(np.exp(0.5 * 19.9 + 0.1) - 1), rel=1e-5)
    torch.manual_seed(0)
    net = ToyNet()
    VELoss()(net=net, images=_images(n=256, res=2))
    sigma = net.calls[0]['sigma']
    assert 0.02 <= sigma.min() and sigma.max() <= 100


@pytest.mark.parametrize('base,kwargs', [('edm', {}), ('vp', {}), ('ve', {}), ('edm2', dict(P_mean=-0.8, P_std=1.6))])
def test_stf_single_image_reference_is_plain_loss(base, kwargs):
    """rbatch == batch == 1: the posterior over one reference is that image, so STF == base loss."""
    images = _images(n=1)
    base_loss = {'edm': EDMLoss, 'vp': VPLoss, 've': VELoss, 'edm2': EDM2Loss}[base](**kwargs)
    stf = STFLoss(base=base, rbatch=1, **kwargs)
    torch.manual_seed(11)
    expected = base_loss(net=ToyNet(0.2), images=images)
    torch.manual_seed(11)
    actual = stf(net=ToyNet(0.2), images=images)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_stf_target_matches_bruteforce():
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn([5, 3, 4, 4], generator=gen, dtype=torch.float64)
    refs = torch.randn([7, 3, 4, 4], generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.5, 1, 2, 4, 8], dtype=torch.float64).reshape(5, 1, 1, 1)
    # B x R x D brute force, fine for a test.
    d2 = ((noisy[:, None] - refs[None]) ** 2).flatten(2).sum(2)
    w = torch.softmax(-d2 / (2 * sigma.reshape(5, 1) ** 2), dim=1)
    expected = torch.einsum('br,rchw->bchw', w, refs)
    torch.testing.assert_close(stf_target(noisy, sigma, refs), expected, rtol=1e-10, atol=1e-10)
    # bf16 autocast (the --bf16 training path) must not reach the distance computation.
    with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
        target = stf_target(noisy.float(), sigma.float(), refs.float())
    assert target.dtype == torch.float32
    torch.testing.assert_close(target.double(), expected, rtol=0, atol=1e-5)


def test_stf_target_limits_and_class_mask():
    a, b = torch.zeros([1, 1, 2, 2]), torch.ones([1, 1, 2, 2])
    refs = torch.cat([a, b])
    x = torch.full([1, 1, 2, 2], 0.25)
    # Tiny sigma: the nearest reference wins; huge sigma: the reference mean.
    torch.testing.assert_close(stf_target(x, torch.tensor([1e-3]), refs), a)
    torch.testing.assert_close(stf_target(x, torch.tensor([1e4]), refs), (a + b) / 2, rtol=0, atol=1e-6)
    # Hand computation: ||x-a||^2 = 4 * 0.0625, ||x-b||^2 = 4 * 0.5625, sigma = 1.
    w_b = 1 / (1 + np.exp((4 * 0.5625 - 4 * 0.0625) / 2))
    torch.testing.assert_close(stf_target(x, torch.tensor([1.0]), refs), torch.full_like(x, w_b))
    # A reference of another class is ignored, however close it is.
    valid = torch.tensor([[False, True]])
    torch.testing.assert_close(stf_target(x, torch.tensor([1e-3]), refs, valid), b)


def test_stf_uses_extra_references_and_labels(monkeypatch):
    images = _images(n=2, res=4)
    extra = _images(n=3, res=4, seed=1)
    labels = torch.eye(2)
    ref_labels = torch.tensor([[1.0, 0], [0, 1], [0, 1]])
    seen = []
    def recording_target(noisy, sigma, refs, valid=None):
        seen.append((refs, valid))
        return stf_target(noisy, sigma, refs, valid)
    monkeypatch.setattr('training.loss.stf_target', recording_target)
    stf = STFLoss(base='edm', rbatch=5)
    stf(net=ToyNet(), images=images, labels=labels, ref_images=extra, ref_labels=ref_labels)
    refs, valid = seen[0]
    # The batch comes first, then the extra references; only same-class pairs are valid.
    torch.testing.assert_close(refs, torch.cat([images, extra]))
    assert valid.tolist() == [[True, False, True, False, False], [False, True, False, True, True]]
    with pytest.raises(ValueError, match='ref_labels'):
        stf(net=ToyNet(), images=images, labels=labels, ref_images=extra)
    # With a huge sigma each target is its class mean.
    target = stf_target(images + 0.01, torch.full([2, 1, 1, 1], 1e5), refs, valid)
    torch.testing.assert_close(target[0], (images[0] + extra[0]) / 2, rtol=0, atol=1e-5)
    torch.testing.assert_close(target[1], (images[1] + extra[1] + extra[2]) / 3, rtol=0, atol=1e-5)


def test_losses_pickle_through_safe_loader():
    for loss in [VPLoss(beta_d=10), VELoss(sigma_max=50), EDMLoss(P_mean=-1.0), EDM2Loss(P_std=1.6),
                 STFLoss(base='edm', rbatch=64, P_mean=-1.0)]:
        buf = io.BytesIO()
        pickle.dump(dict(loss_fn=loss), buf)
        buf.seek(0)
        loaded = persistence.load_pickle(buf)['loss_fn']
        assert type(loaded).__name__ == type(loss).__name__
        assert vars(loaded).keys() >= {k for k in vars(loss) if not k.startswith('_')}
    assert loaded.base_loss.P_mean == -1.0 and loaded.rbatch == 64
    with pytest.raises(ValueError, match='base'):
        STFLoss(base='nope')
