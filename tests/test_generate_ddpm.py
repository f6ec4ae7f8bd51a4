"""Sampling DDPM networks (training/sampling_ddpm.py, generate.py): ancestral and DDIM samplers recover the
data variance with an exact denoiser, seeds give the same images for any batch size, and published-layout
checkpoints sample from the command line."""

import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate as generate_script
from training import ddpm, sampling
from training.networks_ddpm import UNet
from training.sampling_ddpm import DDPMNetwork, ddpm_ancestral_sampler, ddpm_ddim_sampler

FIXTURES = Path(__file__).parent / 'fixtures' / 'ddpm'
pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


class GaussianEps(torch.nn.Module):
    """The exact eps-prediction for data ~ N(0, std^2 I): eps = sqrt(1 - ab) x_t / (ab std^2 + 1 - ab)."""

    def __init__(self, betas, std):
        super().__init__()
        self.alphas_bar, self.std, self.in_channels = torch.cumprod(1 - betas, 0).float(), std, 1

    def forward(self, x, t):
        ab = self.alphas_bar[t].reshape(-1, 1, 1, 1)
        return (1 - ab).sqrt() * x / (ab * self.std ** 2 + 1 - ab)


def gaussian_net(var_type='fixed-small'):
    settings = dict(timesteps=1000, beta_schedule='linear', beta_start=1e-4, beta_end=0.02, model_mean_type='eps',
                    model_var_type=var_type)
    return DDPMNetwork(GaussianEps(ddpm.get_beta_schedule('linear', 1e-4, 0.02, 1000), std=0.3), 4, settings)


@pytest.mark.parametrize('sampler,kwargs', [(ddpm_ancestral_sampler, {}),
                                            (ddpm_ddim_sampler, dict(eta=0.0, subseq_size=1000)),
                                            (ddpm_ddim_sampler, dict(eta=1.0, subseq_size=1000))])
def test_samplers_recover_the_data_variance_with_an_exact_denoiser(sampler, kwargs):
    torch.manual_seed(0)
    noise = torch.randn(1000, 1, 4, 4)
    samples = sampler(gaussian_net(), noise, **kwargs)
    # 16000 values: the std of the variance estimate is sqrt(2 / 16000) = 1.1 % of 0.09; DDIM with every
    # step still under-disperses by about 1 % (100 steps: 8 %), so 5 % is a 3-sigma bound plus that bias.
    assert samples.var().item() == pytest.approx(0.09, rel=0.05)
    assert samples.mean().abs().item() < 0.01


def tiny_ddpm_net(var_type='fixed-large', timesteps=20):
    torch.manual_seed(1)
    unet = UNet(3, 32, 6 if var_type == 'learned' else 3, [1, 2], 1, [False, True])
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    settings = dict(timesteps=timesteps, beta_schedule='linear', beta_start=1e-3, beta_end=0.2, model_mean_type='eps',
                    model_var_type=var_type)
    return DDPMNetwork(unet, 8, settings).eval()


@pytest.mark.parametrize('var_type,sampler,kwargs', [('learned', 'ddpm', {}),
                                                     ('fixed-small', 'ddim', dict(eta=0.5, subseq_size=5))])
def test_images_do_not_depend_on_the_batch_size(var_type, sampler, kwargs):
    net = tiny_ddpm_net(var_type)
    seeds = [3, 1, 4, 1000]
    runs = [torch.cat([b.images for b in sampling.generate_images(net, seeds, batch_size=bs, sampler=sampler,
                                                                   **kwargs) if b.images is not None])
            for bs in (1, 3)]
    assert torch.equal(runs[0], runs[1]) and runs[0].dtype == torch.uint8 and runs[0].float().std() > 0


class MeanHalf(torch.nn.Module):
    """The first C output channels of a learned-variance UNet, as a fixed-variance network."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.in_channels = unet, unet.in_channels

    def forward(self, x, t):
        return self.unet(x, t)[:, :self.in_channels]


@pytest.mark.parametrize('v,equivalent', [(-1.0, 'fixed-small'), (1.0, 'fixed-large')])
def test_ancestral_sampling_uses_the_learned_variance(v, equivalent):
    # v = -1 is the posterior variance, v = +1 is beta_t (fixed-large differs only at t = 0, where no noise is added).
    net = tiny_ddpm_net('learned')
    with torch.no_grad():
        net.unet.out_conv[2].weight[3:] = 0
        net.unet.out_conv[2].bias[3:] = v
    fixed = DDPMNetwork(MeanHalf(net.unet), 8, dict(net.diffusion, model_var_type=equivalent))
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    def sample(model):
        g = torch.Generator().manual_seed(1)
        return ddpm_ancestral_sampler(model, noise, randn_like=lambda x: torch.randn(x.shape, generator=g))
    learned, reference = sample(net), sample(fixed)
    torch.testing.assert_close(learned, reference, rtol=1e-5, atol=1e-5)
    assert learned.std() > 0.1


#----------------------------------------------------------------------------
# Command line with a checkpoint in the published layout.


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    """The reference tiny UNet weights as a published ddpm-torch checkpoint (no config entry)."""
    tiny = torch.load(FIXTURES / 'unet_tiny_forward.pt', weights_only=True)
    model = tiny['tensors']['state_dict']
    shadow = {k: v.float() * 0.5 for k, v in model.items()}
    path = tmp_path_factory.mktemp('chkpts') / 'ddpm_cifar10.pt'
    torch.save(dict(model={'module.' + k: v.float() for k, v in model.items()}, ema=dict(decay=0.9999, shadow=shadow),
                    optimizer={}, epoch=2040), path)
    return str(path)


def run(args):
    return CliRunner().invoke(generate_script.main, args)


def test_published_checkpoint_samples_with_ddim_from_the_command_line(published, tmp_path):
    args = [f'--net={published}', '--dataset=cifar10', '--use-ddim', '--skip-schedule=quadratic', '--subseq-size=3',
            '--seeds=0-1', '--batch=1']
    result = run(args + [f'--outdir={tmp_path / "raw"}'])
    assert result.exit_code == 0, result.output
    result = run(args + ['--use-ema', f'--outdir={tmp_path / "ema"}'])
    assert result.exit_code == 0, result.output
    raw, ema = (np.asarray(PIL.Image.open(tmp_path / kind / '000001.png')) for kind in ('raw', 'ema'))
    assert raw.shape == (32, 32, 3) and not np.array_equal(raw, ema)


@pytest.mark.parametrize('args,message', [
    (['--use-ddim', '--subseq-size=1001', '--dataset=cifar10'], '--subseq-size=1001 must lie in [1, --timesteps=1000]'),
    ([], 'holds no config (a published ddpm-torch checkpoint); name its reference config with --dataset'),
    (['--dataset=cifar10', '--sampler=edm'], '--sampler=edm does not apply to a DDPM network'),
    (['--dataset=cifar10', '--use-ddim', '--sampler=ddpm'], '--use-ddim means --sampler=ddim'),
    (['--dataset=cifar10', '--subseq-size=5'], '--subseq-size=5 does not apply to --sampler=ddpm'),
])
def test_bad_ddpm_options_are_one_line_errors(published, tmp_path, args, message):
    result = run([f'--net={published}', f'--outdir={tmp_path}', '--seeds=0'] + args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert 'Traceback' not in result.output and not list(tmp_path.iterdir())


def test_ddpm_options_on_a_pickle_are_an_error(tmp_path):
    result = run(['--net=network-snapshot.pkl', f'--outdir={tmp_path}', '--use-ema'])
    assert result.exit_code != 0 and '--use-ema applies to DDPM checkpoints (.pt) only' in result.output
