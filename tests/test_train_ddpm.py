"""The DDPM recipe in the shared training loop (training/recipe_ddpm.py): every mean/var/loss combination
trains, resume is exact, the RNG stream is the documented one, gradient accumulation and 2-process DDP give
the full batch's gradients, --first-step, --epochs, snapshots in the
published ddpm-torch layout, and one-line errors for options of the wrong recipe."""

import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import train as train_script
from tests.conftest import free_port
from torch_utils import distributed as dist
from training import ddpm
from training import networks_ddpm
from training import training_loop as tl
from training.networks_ddpm import UNet, load_checkpoint
from training.presets import build_config
from training.recipe_ddpm import DDPMEMA, DDPMLoss, DDPMRecipe, attn_levels

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """64 smooth random 8x8 RGB images as a PNG folder."""
    folder = tmp_path_factory.mktemp('ddpm-data')
    rng = np.random.RandomState(0)
    for i in range(64):
        base = rng.rand(2, 2, 3) * 255
        image = np.kron(base, np.ones((4, 4, 1))) + rng.randn(8, 8, 3) * 8
        PIL.Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f'{i:05d}.png')
    return str(folder)


def train(run_dir, **overrides):
    cfg = build_config('tiny-ddpm', **{**dict(status_nimg=None, snapshot_nimg=None, checkpoint_nimg=None), **overrides})
    return tl.training_loop(cfg, str(run_dir), torch.device('cpu'))


# The training-state helpers of the EDM/EDM2 loop tests serve here too.
from tests.test_train import assert_gradients_match, record_gradients  # noqa: E402
from tests.test_train import assert_states_equal as assert_same, load_state as state  # noqa: E402

#----------------------------------------------------------------------------
# Losses, EMA, learning rate.


@pytest.mark.parametrize('mean_type', ddpm.MODEL_MEAN_TYPES)
@pytest.mark.parametrize('var_type', ddpm.MODEL_VAR_TYPES)
@pytest.mark.parametrize('loss_type', ddpm.LOSS_TYPES)
def test_every_combination_gives_finite_loss_and_gradients(mean_type, var_type, loss_type):
    torch.manual_seed(0)
    recipe = DDPMRecipe(build_config('tiny-ddpm', model_var_type=var_type, model_mean_type=mean_type, loss_type=loss_type,
                                     timesteps=50))
    net = UNet(**recipe.unet_kwargs(8, 3))
    assert net.out_channels == (6 if var_type == 'learned' else 3)
    with torch.no_grad():   # The reference initialises the output conv near zero; make the output matter.
        net.out_conv[2].weight.normal_(0, 0.05)
    loss_fn = DDPMLoss(**{k: v for k, v in recipe.loss_kwargs().items() if k != 'class_name'})
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    loss = loss_fn(net=net, images=images)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert net.in_conv.weight.grad.abs().sum() > 0


def test_timesteps_are_drawn_before_the_noise():
    seen = {}
    diffusion_loss = DDPMLoss(ddpm.get_beta_schedule('linear', 1e-4, 0.02, 1000))
    def fake_losses(net, x_0, t, noise):
        seen.update(t=t, noise=noise)
        return torch.zeros(len(t))
    diffusion_loss.diffusion.train_losses = fake_losses
    torch.manual_seed(5)
    diffusion_loss(net=None, images=torch.zeros(3, 3, 2, 2))
    torch.manual_seed(5)
    t = torch.empty(3, dtype=torch.int64).random_(0, 1000)
    assert torch.equal(seen['t'], t) and torch.equal(seen['noise'], torch.empty(3, 3, 2, 2).normal_())


def test_ema_decay_warms_up_and_state_has_the_reference_layout():
    net = torch.nn.Linear(2, 2)
    ema = DDPMEMA(net, decay=0.9999)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()   # n = 0: d = min(0.9999, 1 / 10)
    torch.testing.assert_close(ema.get().weight, start + 0.9, rtol=0, atol=1e-6)
    state = ema.state_dict()
    assert set(state) == {'decay', 'shadow', 'num_updates'} and set(state['shadow']) == {'weight', 'bias'}
    assert state['num_updates'] == 1


def test_learning_rate_warms_up_linearly_per_optimizer_step():
    recipe = DDPMRecipe(build_config('tiny-ddpm', lr=1e-3, lr_warmup_steps=4, batch_size=32))
    assert [recipe.learning_rate(32 * step) for step in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_grad_norm_clips_the_global_norm():
    recipe = DDPMRecipe(build_config('tiny-ddpm', grad_norm=1.0))
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    recipe.clean_gradients(params)
    assert torch.cat([p.grad for p in params]).norm().item() == pytest.approx(1.0)


def test_attention_levels_follow_the_reference_configs():
    assert attn_levels(32, (1, 2, 2, 2), (16,)) == [False, True, False, False]          # cifar10
    assert attn_levels(64, (1, 2, 2, 2), (16,)) == [False, False, True, False]          # celeba
    assert attn_levels(256, (1, 1, 2, 2, 4, 4), (16,)) == [False] * 4 + [True, False]   # celebahq

#----------------------------------------------------------------------------
# The loop.


def test_trains_and_snapshot_is_a_published_layout_checkpoint(data, tmp_path):
    result = train(tmp_path, data=data, total_nimg=128, snapshot_nimg=128, status_nimg=64)
    assert result.cur_nimg == 128
    names = sorted(os.listdir(tmp_path))
    assert 'network-snapshot-000000.pt' in names and 'training-state-000000.pt' in names
    checkpoint = torch.load(tmp_path / 'network-snapshot-000000.pt', weights_only=True)
    assert {'model', 'optimizer', 'scheduler', 'ema', 'epoch'} <= set(checkpoint)
    assert checkpoint['ema']['num_updates'] == 4 and checkpoint['epoch'] == 2   # 64 images = 2 batches per epoch
    net, _ = load_checkpoint(str(tmp_path / 'network-snapshot-000000.pt'), use_ema=True)
    for key, value in result.ema.get().state_dict().items():
        assert torch.equal(net.state_dict()[key], value)
    options = json.loads((tmp_path / 'training_options.json').read_text())
    assert options['network_kwargs']['class_name'] == 'training.networks_ddpm.UNet'
    assert options['loss_kwargs']['beta_schedule'] == 'linear'
    stats = [json.loads(line) for line in (tmp_path / 'stats.jsonl').read_text().splitlines()]
    # Two status ticks of two 32-image steps. Only the last tick is checked: training_stats' counters are
    # process-global, so reports of an earlier run in this process (a NaN, say) leak into the first tick.
    assert len(stats) == 2 and stats[-1]['Loss/loss']['num'] == 64


def test_resume_is_exact(data, tmp_path):
    # Dropout on: its masks come from the per-step stream too, so they must continue across the resume.
    common = dict(data=data, model_var_type='learned', lr_warmup_steps=2, dropout=0.1)
    train(tmp_path / 'full', total_nimg=128, **common)
    train(tmp_path / 'split', total_nimg=64, **common)
    result = train(tmp_path / 'split', total_nimg=128, **common)
    assert result.cur_nimg == 128
    assert_same(state(tmp_path / 'full'), state(tmp_path / 'split'))


def test_rng_stream_is_a_function_of_seed_rank_and_images_seen(data, tmp_path, monkeypatch):
    # The documented stream (docs/ddpm.md, "Random numbers"): before the optimizer step at cur_nimg the
    # global generator is reseeded with step_seed(seed, rank, cur_nimg); each round then draws t, then noise.
    drawn = []
    train_losses = ddpm.GaussianDiffusion.train_losses
    def record(self, denoise_fn, x_0, t, noise):
        drawn.append((t.clone(), noise.clone()))
        return train_losses(self, denoise_fn, x_0, t, noise)
    monkeypatch.setattr(ddpm.GaussianDiffusion, 'train_losses', record)
    train(tmp_path / 'a', data=data, total_nimg=64, seed=7, dropout=0.1)
    assert len(drawn) == 2
    for step, (t, noise) in enumerate(drawn):
        torch.manual_seed(tl.step_seed(7, 0, 32 * step))
        assert torch.equal(t, torch.empty(32, dtype=torch.int64).random_(0, 1000))
        assert torch.equal(noise, torch.empty(32, 3, 8, 8).normal_())
    first = [d[0] for d in drawn]
    drawn.clear()
    train(tmp_path / 'b', data=data, total_nimg=64, seed=7, dropout=0.1)
    assert all(torch.equal(a, b) for a, b in zip(first, [d[0] for d in drawn]))   # same seed: same draws
    assert_same(state(tmp_path / 'a'), state(tmp_path / 'b'))                       # and the same run
    drawn.clear()
    train(tmp_path / 'c', data=data, total_nimg=64, seed=8, dropout=0.1)
    assert not torch.equal(first[0], drawn[0][0])                                    # another seed: others


def test_first_step_stops_after_one_update_and_saves_nothing(data, tmp_path):
    result = train(tmp_path, data=data, total_nimg=4096, first_step=True)
    assert result.cur_nimg == 32 and result.ema.num_updates == 1
    assert not any(name.endswith('.pt') for name in os.listdir(tmp_path))


def test_epochs_set_the_duration_from_the_dataset(data, tmp_path):
    result = train(tmp_path, data=data, epochs=1, batch_size=24)   # 64 images: two full batches of 24
    assert result.cur_nimg == 48


def fixed_draws(patch):
    """t and noise as a fixed function of each image, so how the batch is split (rounds, ranks) does not matter;
    and unit-gain init of the layers the reference starts near zero (gain 1e-10), so every layer's gradient counts."""
    patch(DDPMLoss, '__call__', lambda self, net, images, labels=None, augment_pipe=None:
          self.diffusion.train_losses(net, images, (images[:, 0, 0, 0] * 400 + 500).long(), torch.sin(images * 53.0 + 1.0)))
    init = networks_ddpm._init
    patch(networks_ddpm, '_init', lambda module, scale=1.0: init(module))


def assert_ddpm_gradients_match(ours, full, batch_size, resolution):
    """test_train's n * eps bound per tensor, except for gradients that are zero in exact arithmetic.

    A GroupNorm with one channel per group removes whatever is added per channel before it (a conv bias, the
    time embedding), so those gradients hold only the rounding residue of the sums feeding them (here ~1e-9
    against ~1e-2). Such a residue does not scale with its own size: it is bounded by the largest gradient.
    """
    tol = batch_size * resolution ** 2 * torch.finfo(torch.float32).eps
    largest = max(g.abs().max().item() for g in full)
    residue = {i for i, g in enumerate(full) if g.abs().max().item() <= tol * largest}
    assert len(residue) < len(full) // 4, 'most gradients vanish: the test would not check anything'
    kept = [i for i in range(len(full)) if i not in residue]
    assert_gradients_match([ours[i] for i in kept], [full[i] for i in kept], batch_size, resolution)
    for i in residue:
        diff = (ours[i] - full[i]).abs().max().item()
        assert diff <= tol * largest, f'parameter {i}: max abs difference {diff:.3g} > {tol:.3g} x largest |grad| {largest:.3g}'


def test_gradient_accumulation_equals_the_full_batch(data, tmp_path, monkeypatch):
    fixed_draws(monkeypatch.setattr)
    grads = []
    record_gradients(monkeypatch.setattr, grads)
    common = dict(data=data, total_nimg=16, batch_size=16, grad_norm=0)  # unclipped: clipping would hide a scale error
    train(tmp_path / 'full', **common)
    train(tmp_path / 'accum', batch_gpu=4, **common)  # 4 rounds of 4
    assert len(grads) == 2
    assert_ddpm_gradients_match(grads[1], grads[0], batch_size=16, resolution=8)


def _ddp_worker(rank, port, run_dir, data):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE='2')
    torch.set_num_threads(1)
    fixed_draws(lambda obj, name, value: setattr(obj, name, value))
    grads = []
    record_gradients(lambda obj, name, value: setattr(obj, name, value), grads)
    dist.init(torch.device('cpu'))
    train(run_dir, data=data, total_nimg=16, batch_size=16, grad_norm=0)  # batch-gpu 8 per rank
    torch.save(grads[0], os.path.join(run_dir, f'grads-rank{rank}.pt'))
    dist.shutdown()


def test_two_process_gloo_equals_one_process(data, tmp_path, monkeypatch):
    torch.multiprocessing.spawn(_ddp_worker, args=(free_port(), str(tmp_path / 'ddp'), data), nprocs=2, join=True)
    fixed_draws(monkeypatch.setattr)
    grads = []
    record_gradients(monkeypatch.setattr, grads)
    train(tmp_path / 'single', data=data, total_nimg=16, batch_size=16, grad_norm=0)
    assert state(tmp_path / 'ddp')['cur_nimg'] == 16
    for rank in range(2):  # the all-reduced gradient of the first step, on both ranks
        ddp_grads = torch.load(tmp_path / 'ddp' / f'grads-rank{rank}.pt')
        assert_ddpm_gradients_match(ddp_grads, grads[0], batch_size=16, resolution=8)


#----------------------------------------------------------------------------
# Command line.


def invoke(args):
    return CliRunner().invoke(train_script.main, args)


def test_cli_takes_the_ddpm_torch_options():
    result = invoke(['--preset=ddpm-cifar10-32x32', '-n', '--timesteps=500', '--beta-schedule=quad', '--beta-start=1e-4',
                     '--beta-end=0.03', '--model-mean-type=x_0', '--model-var-type=learned', '--loss-type=kl',
                     '--ema-decay=0.999', '--grad-norm=0.5', '--warmup=100', '--epochs=3', '--batch-size=64',
                     '--num-accum=2', '--beta1=0.8', '--beta2=0.99', '--lr=1e-4'])
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.output[result.output.index('{'):result.output.rindex('}') + 1])
    expected = dict(timesteps=500, beta_schedule='quad', beta_end=0.03, model_mean_type='x_0', model_var_type='learned',
                    loss_type='kl', ema_decay=0.999, grad_norm=0.5, lr_warmup_steps=100, epochs=3, batch_size=64,
                    batch_gpu=32, adam_betas=[0.8, 0.99], lr=1e-4, recipe='ddpm')
    assert {k: cfg[k] for k in expected} == expected


def test_ddpm_preset_matches_the_reference_config():
    layouts = json.loads((Path(__file__).parent / 'fixtures' / 'ddpm' / 'unet_layouts.json').read_text())
    for name, preset, res in (('cifar10', 'ddpm-cifar10-32x32', 32), ('celeba', 'ddpm-celeba-64x64', 64),
                              ('celebahq', 'ddpm-celebahq-256x256', 256)):
        cfg, ref = build_config(preset), layouts[name]
        assert DDPMRecipe(cfg).unet_kwargs(res, 3) == ref['kwargs']
        train_ref, diff_ref = ref['config_train'], ref['config_diffusion']
        assert (cfg.lr, cfg.batch_size, cfg.grad_norm, cfg.epochs, cfg.lr_warmup_steps, cfg.ema_decay) == \
               (train_ref['lr'], train_ref['batch_size'], train_ref['grad_norm'], train_ref['epochs'], train_ref['warmup'],
                train_ref['ema_decay'])
        assert {k: getattr(cfg, k) for k in diff_ref} == diff_ref


@pytest.mark.parametrize('args,message', [
    (['--preset=tiny-edm', '--timesteps=10'], '--timesteps=10: DDPM options need a DDPM preset'),
    (['--preset=edm2-img64-s', '--loss-type=kl'], '--loss-type=kl: DDPM options need a DDPM preset'),
    (['--preset=tiny-ddpm', '--stf'], '--stf: EDM/EDM2 option(s) not used by the DDPM recipe'),
    (['--preset=tiny-ddpm', '--cbase=48'], '--cbase=48 must be a multiple of 32'),
    (['--preset=tiny-ddpm', '--batch=30', '--num-accum=4'], '--batch=30 is not divisible by --num-accum=4'),
])
def test_wrong_recipe_options_are_one_line_errors(args, message):
    result = invoke(args + ['-n'])
    assert result.exit_code != 0 and message in result.output
    assert 'Traceback' not in result.output
