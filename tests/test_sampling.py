"""Samplers: reference parity, seed determinism, analytic Gaussian data, guidance, batched generation."""

import numpy as np
import pytest
import torch

import dnnlib
from training import sampling
from training.sampling import StackedRandomGenerator

#----------------------------------------------------------------------------
# Helpers.

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser of data ~ N(m, s^2 I): D(x; sigma) = m + s^2 / (s^2 + sigma^2) (x - m)."""

    def __init__(self, s=0.5, img_channels=3, img_resolution=8, label_dim=0, mu=None, class_mu=None):
        super().__init__()
        self.s, self.img_channels, self.img_resolution, self.label_dim = s, img_channels, img_resolution, label_dim
        self.mu = torch.zeros([img_channels, img_resolution, img_resolution], dtype=torch.float64) if mu is None else mu.double()
        self.class_mu = None if class_mu is None else class_mu.double()
        self.sigma_min, self.sigma_max = 0, float('inf')
        self.calls = 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        m = self.mu
        if class_labels is not None and self.class_mu is not None:
            m = m + torch.einsum('nk,kchw->nchw', class_labels.double(), self.class_mu)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return m + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x.double() - m)


class EDM2Style(GaussianDenoiser):
    """The same denoiser without round_sigma / sigma range, like an EDM2 network."""

    def __getattribute__(self, name):
        if name in ('round_sigma', 'sigma_min', 'sigma_max'):
            raise AttributeError(name)
        return super().__getattribute__(name)


class CountingRandn:
    def __init__(self, rnd):
        self.rnd, self.calls = rnd, 0

    def __call__(self, x):
        self.calls += 1
        return self.rnd.randn_like(x)


def load_case(spec_dir, name):
    return torch.load(spec_dir / 'samplers' / f'{name}.pt', weights_only=False)


def spec_inputs(case):
    """Latents and labels as the reference generate scripts draw them."""
    c = case['case']
    rnd = StackedRandomGenerator('cpu', c['seeds'])
    n, res = len(c['seeds']), c['img_resolution']
    latents = rnd.randn([n, c['img_channels'], res, res])
    labels = torch.eye(c['label_dim'])[rnd.randint(c['label_dim'], size=[n])]
    return rnd, latents, labels


def tiny_precond(label_dim=0, resolution=8):
    from training.networks import EDMPrecond
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=resolution, img_channels=3, label_dim=label_dim, model_type='SongUNet',
                     model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0)
    return net.eval().requires_grad_(False)

#----------------------------------------------------------------------------
# Reference parity.

def test_stacked_random_generator_matches_reference(spec_dir):
    data = load_case(spec_dir, 'srg.edm')
    c, t = data['case'], data['tensors']
    rnd = StackedRandomGenerator('cpu', c['seeds'])
    n = len(c['seeds'])
    assert torch.equal(rnd.randn([n] + c['randn_shape']), t['randn'])
    assert torch.equal(rnd.randint(c['randint_high'], size=[n]), t['randint'])
    like = rnd.randn_like(torch.zeros([n] + c['like_shape'], dtype=t['randn_like'].dtype))
    assert torch.equal(like, t['randn_like'])


def test_edm_sampler_matches_reference_on_gaussian_denoiser(spec_dir):
    data = load_case(spec_dir, 's.iso.edm_det')
    g = data['gauss_denoiser']
    net = GaussianDenoiser(s=g['s'], img_resolution=data['case']['img_resolution'], label_dim=data['case']['label_dim'],
                           mu=g['mu'], class_mu=g['class_mu'])
    rnd, latents, labels = spec_inputs(data)
    assert torch.equal(latents, data['tensors']['latents'])
    assert torch.equal(labels, data['tensors']['class_labels'])
    out = sampling.edm_sampler(net, latents, labels, randn_like=rnd.randn_like, **data['case']['kwargs'])
    assert out.dtype == data['tensors']['out'].dtype
    torch.testing.assert_close(out, data['tensors']['out'], atol=1e-4, rtol=0)


@pytest.mark.parametrize('name,sampler', [('s.edm.det', 'edm_sampler'), ('s.edm2.det', 'edm2_sampler')])
def test_sampler_matches_reference_on_network(spec_dir, name, sampler):
    data = load_case(spec_dir, name)
    assert data['case']['sampler'] == sampler
    net_case = torch.load(spec_dir / 'networks' / f'{data["case"]["net"]["case"]}.pt', weights_only=False)
    net = dnnlib.util.construct_class_by_name(class_name=net_case['case']['class_path'], **net_case['case']['kwargs'])
    net.load_state_dict(net_case['tensors']['state_dict'])
    net.eval()
    rnd, latents, labels = spec_inputs(data)
    assert torch.equal(latents, data['tensors']['latents'])
    with torch.no_grad():
        out = getattr(sampling, sampler)(net, latents, labels, randn_like=rnd.randn_like, **data['case']['kwargs'])
    assert out.dtype == data['tensors']['out'].dtype
    torch.testing.assert_close(out, data['tensors']['out'], atol=1e-4, rtol=0)
    # 'edm' resolves to the sampler of the codebase the network comes from.
    assert sampling.resolve_sampler('edm', net) is getattr(sampling, sampler)

#----------------------------------------------------------------------------
# Properties on the analytic Gaussian denoiser.

SAMPLER_CASES = [
    ('edm1', {}),
    ('edm2', {}),
    ('edm1', dict(num_steps=64, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)),
    ('ablation', {}),
    ('ablation', dict(solver='euler', discretization='vp', schedule='vp', scaling='vp', num_steps=128)),
    ('ablation', dict(solver='heun', discretization='ve', schedule='ve', scaling='none', num_steps=64)),
    ('ablation', dict(solver='heun', discretization='iddpm', schedule='linear', scaling='none')),
    ('ddim', {}),
    ('ddpm', {}),
    ('dpmpp2m', {}),
    ('dpmpp2m-sde', {}),
]


@pytest.mark.parametrize('sampler,kwargs', SAMPLER_CASES, ids=lambda v: str(v) if isinstance(v, str) else '-'.join(map(str, v.values())))
def test_sampler_recovers_gaussian_data_variance(sampler, kwargs):
    # Few steps leave a discretization error (EDM with 18 steps: +12% variance), hence the tolerance;
    # test_deterministic_samplers_converge checks that it vanishes with more steps.
    s = 0.5
    net = GaussianDenoiser(s=s, img_resolution=16)
    seeds = list(range(8))
    rnd = StackedRandomGenerator('cpu', seeds)
    noise = rnd.randn([len(seeds), 3, 16, 16])
    fn = sampling.resolve_sampler(sampler, net)
    out = fn(net, noise, randn_like=rnd.randn_like, **kwargs).double()
    assert torch.isfinite(out).all()
    assert abs(out.mean().item()) < 0.03
    assert out.var().item() == pytest.approx(s ** 2, rel=0.15)


@pytest.mark.parametrize('sampler', ['edm1', 'edm2', 'ablation', 'ddim', 'dpmpp2m'])
def test_deterministic_samplers_converge(sampler):
    # For N(0, s^2) data the probability-flow ODE maps x(sigma_max) to x(0) = x(sigma_max) s / sqrt(s^2 + sigma_max^2).
    s = 0.5
    net = GaussianDenoiser(s=s, img_channels=1, img_resolution=1)
    noise = torch.ones([1, 1, 1, 1])
    fn = sampling.resolve_sampler(sampler, net)
    out = [fn(net, noise, num_steps=n).item() for n in (16, 256)]
    exact = 80 * s / np.sqrt(s ** 2 + 80 ** 2)
    assert abs(out[1] - exact) < abs(out[0] - exact)
    assert out[1] == pytest.approx(exact, rel=0.02)


def test_ablation_with_edm_choices_equals_edm_sampler():
    net = GaussianDenoiser(s=0.7, img_resolution=8)
    kwargs = dict(num_steps=10, S_churn=20, S_min=0.1, S_max=20, S_noise=1.01)
    outs = []
    for fn in (sampling.edm_sampler, sampling.ablation_sampler):
        rnd = StackedRandomGenerator('cpu', [3, 4])
        outs.append(fn(net, rnd.randn([2, 3, 8, 8]), randn_like=rnd.randn_like, **kwargs))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-9, rtol=1e-9)


def test_ddim_eta0_equals_euler_ablation():
    net = GaussianDenoiser(s=0.7, img_resolution=8)
    noise = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(1))
    ddim = sampling.ddim_sampler(net, noise, num_steps=12)
    euler = sampling.ablation_sampler(net, noise, num_steps=12, solver='euler')
    torch.testing.assert_close(ddim, euler, atol=1e-9, rtol=1e-9)


def test_edm2_sampler_draws_churn_noise_only_where_it_applies():
    net = EDM2Style(img_resolution=8)
    rnd = StackedRandomGenerator('cpu', [0])
    noise = rnd.randn([1, 3, 8, 8])
    counter = CountingRandn(rnd)
    sampling.edm2_sampler(net, noise, randn_like=counter, num_steps=8, S_churn=10, S_min=1, S_max=10)
    steps = sampling.edm_sigma_steps(8, 0.002, 80, 7, torch.float32, 'cpu')
    assert counter.calls == int(((steps >= 1) & (steps <= 10)).sum())
    # EDM's sampler draws at every step, as the reference does.
    counter = CountingRandn(StackedRandomGenerator('cpu', [0]))
    sampling.edm_sampler(GaussianDenoiser(img_resolution=8), noise, randn_like=counter, num_steps=8)
    assert counter.calls == 8


@pytest.mark.parametrize('sampler', ['edm1', 'edm2', 'ablation', 'ddim', 'dpmpp2m-sde'])
def test_guidance_with_gnet_equal_to_net_is_no_guidance(sampler):
    net = GaussianDenoiser(s=0.6, img_resolution=8)
    fn = sampling.resolve_sampler(sampler, net)
    outs = []
    for gnet, guidance in [(None, 1), (net, 2.5)]:
        rnd = StackedRandomGenerator('cpu', [7, 8])
        outs.append(fn(net, rnd.randn([2, 3, 8, 8]), gnet=gnet, guidance=guidance, randn_like=rnd.randn_like, num_steps=6))
    assert torch.equal(outs[0], outs[1])


def test_guided_denoiser_extrapolates_from_gnet():
    net, gnet = GaussianDenoiser(s=0.6), GaussianDenoiser(s=0.3)
    x, sigma = torch.randn([2, 3, 8, 8], dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64)
    guided = sampling.guided_denoiser(net, gnet, None, 2.0, torch.float64)(x, sigma)
    torch.testing.assert_close(guided, gnet(x, sigma) + 2.0 * (net(x, sigma) - gnet(x, sigma)))
    gnet.calls = 0
    sampling.guided_denoiser(net, gnet, None, 1, torch.float64)(x, sigma)
    assert gnet.calls == 0  # w = 1 never evaluates the guiding network.
    with pytest.raises(ValueError, match='guiding network'):
        sampling.guided_denoiser(net, None, None, 2.0, torch.float64)

#----------------------------------------------------------------------------
# Batched generation.

def _images_by_seed(batches):
    return {seed: image for batch in batches for seed, image in zip(batch.seeds, batch.images if batch.images is not None else [])}


def test_generated_images_do_not_depend_on_batch_size_or_ranks():
    net = tiny_precond(label_dim=4)
    seeds = [0, 1, 2, 5, 9, 100, 2**32 + 3, 17]
    kwargs = dict(num_steps=3, S_churn=5)
    reference = _images_by_seed(sampling.generate_images(net, seeds, batch_size=8, **kwargs))
    assert sorted(reference) == sorted(seeds)
    assert all(img.dtype == torch.uint8 and img.shape == (3, 8, 8) for img in reference.values())
    for batch_size, world_size in [(1, 1), (3, 1), (3, 2)]:
        got = {}
        for rank in range(world_size):
            got.update(_images_by_seed(sampling.generate_images(net, seeds, batch_size=batch_size, rank=rank,
                                                                 world_size=world_size, **kwargs)))
        assert sorted(got) == sorted(seeds)
        diff = torch.stack([(got[seed].int() - reference[seed].int()).abs() for seed in seeds])
        # Allow a rare off-by-one from float rounding in batched convolutions on other BLAS builds.
        assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99, f'batch {batch_size}, {world_size} ranks'


def test_generate_images_labels_and_class():
    net = GaussianDenoiser(img_resolution=8, label_dim=5)
    batches = list(sampling.generate_images(net, range(6), batch_size=4, class_idx=3, num_steps=4))
    assert len(batches) == 2 and [len(b.seeds) for b in batches] == [3, 3]
    labels = torch.cat([b.labels for b in batches])
    assert torch.equal(labels, torch.eye(5)[[3] * 6])
    random_labels = torch.cat([b.labels for b in sampling.generate_images(net, range(6), batch_size=4, num_steps=4)])
    assert torch.equal(random_labels.sum(1), torch.ones(6))


def test_split_seeds_covers_every_seed_once():
    seeds = list(range(10, 47))
    parts = [b for r in range(3) for b in sampling.split_seeds(seeds, 4, r, 3)]
    assert sorted(s for b in parts for s in b) == seeds
    assert max(len(b) for b in parts) <= 4
    assert len(sampling.split_seeds(seeds, 4, 0, 3)) == len(sampling.split_seeds(seeds, 4, 2, 3))


@pytest.mark.parametrize('kwargs,match', [
    (dict(class_idx=5), 'out of range'),
    (dict(gnet=GaussianDenoiser(img_resolution=16, label_dim=5), guidance=2), 'img_resolution'),
    (dict(gnet=GaussianDenoiser(img_resolution=8, label_dim=3), guidance=2), 'label_dim'),
    (dict(guidance=2), 'guiding network'),
    (dict(sampler='euler'), 'expected one of'),
    (dict(sampler='ddim', S_churn=1), 'does not take S_churn'),
    (dict(batch_size=0), 'at least 1'),
])
def test_generate_images_rejects_bad_input(kwargs, match):
    net = GaussianDenoiser(img_resolution=8, label_dim=5)
    with pytest.raises(ValueError, match=match):
        sampling.generate_images(net, [0, 1], **{'batch_size': 2, **kwargs})


def test_generate_images_class_for_unconditional_net():
    with pytest.raises(ValueError, match='unconditional'):
        sampling.generate_images(GaussianDenoiser(img_resolution=8), [0], batch_size=1, class_idx=0)


def test_unconditional_gnet_guides_conditional_net():
    net, gnet = GaussianDenoiser(img_resolution=8, label_dim=5), GaussianDenoiser(s=0.3, img_resolution=8)
    batches = list(sampling.generate_images(net, [0, 1], gnet=gnet, guidance=1.5, batch_size=2, num_steps=4))
    assert batches[0].images.shape == (2, 3, 8, 8)


def test_image_grid_layout():
    images = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones([1, 1, 2, 3], dtype=np.uint8)
    grid = sampling.image_grid(images)
    assert grid.shape == (1, 2 * 2, 3 * 3)
    assert grid[0, 0, 0] == 0 and grid[0, 0, 3] == 1 and grid[0, 2, 0] == 3 and grid[0, 2, 3] == 4
    assert grid[0, 2, 6] == 0  # Blank cell.
