"""Training loop on tiny CPU configs with real (downsampled CIFAR-10) data: the loss falls, resume is
exact, gradient accumulation and 2-process DDP equal the full batch, snapshots load and generate,
bad input gives one clear line and loses nothing."""

import json
import os
import pickle
import signal

import numpy as np
import PIL.Image
import pytest
import torch

from tests.conftest import cifar_mini, free_port
from torch_utils import distributed as dist
from torch_utils import persistence
from training import training_loop as tl
from training.presets import build_config

#----------------------------------------------------------------------------
# Fixtures and helpers.


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def write_dataset(folder, images, labels=None):
    """PNG folder + dataset.json, the layout dataset_tool.py writes."""
    os.makedirs(folder, exist_ok=True)
    names = []
    for i, image in enumerate(images):
        names.append(f'{i:05d}.png')
        PIL.Image.fromarray(image).save(os.path.join(folder, names[-1]))
    if labels is not None:
        with open(os.path.join(folder, 'dataset.json'), 'w') as f:
            json.dump(dict(labels=[[n, int(c)] for n, c in zip(names, labels)]), f)
    return str(folder)


@pytest.fixture(scope='module')
def cifar(tmp_path_factory):
    """256 CIFAR-10 training images box-downsampled to 8x8 (with labels), plus 16x16 and label-less variants."""
    images, labels = cifar_mini()
    pixels = images[:256].transpose(0, 3, 1, 2).astype(np.float32)
    labels = labels[:256]
    def downsample(res):
        x = pixels.reshape(256, 3, res, 32 // res, res, 32 // res).mean(axis=(3, 5))
        return np.rint(x).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    root = tmp_path_factory.mktemp('cifar')
    return dict(c8=write_dataset(root / 'c8', downsample(8), labels),
                c16=write_dataset(root / 'c16', downsample(16)[:32], labels[:32]),
                nolabels=write_dataset(root / 'nolabels', downsample(8)[:32]))


def train(run_dir, preset='tiny-edm', **overrides):
    cfg = build_config(preset, **overrides)
    return tl.training_loop(cfg, str(run_dir), torch.device('cpu'))


def load_state(run_dir):
    return torch.load(tl.find_latest_state(str(run_dir)), map_location='cpu', weights_only=False)


def assert_states_equal(a, b, atol=0.0):
    assert a['cur_nimg'] == b['cur_nimg']
    def flat(x, prefix=''):
        if isinstance(x, torch.Tensor):
            return {prefix: x}
        if isinstance(x, dict):
            return {k: v for key, val in x.items() for k, v in flat(val, f'{prefix}/{key}').items()}
        if isinstance(x, (list, tuple)):
            return {k: v for i, val in enumerate(x) for k, v in flat(val, f'{prefix}/{i}').items()}
        return {prefix: x}
    fa = flat(dict(net=a['net'], ema=a['ema'], optimizer=a['optimizer']))
    fb = flat(dict(net=b['net'], ema=b['ema'], optimizer=b['optimizer']))
    assert fa.keys() == fb.keys()
    for key in fa:
        if isinstance(fa[key], torch.Tensor):
            diff = (fa[key].double() - fb[key].double()).abs().max().item() if fa[key].numel() else 0.0
            assert fa[key].shape == fb[key].shape and diff <= atol, f'{key}: max abs difference {diff}'
        else:
            assert fa[key] == fb[key], key


def eval_loss(cfg, net, data):
    """Mean loss of `net` over a fixed batch and fixed noise (independent of training randomness)."""
    loss_fn = torch_loss(cfg)
    images = torch.stack([torch.as_tensor(np.array(PIL.Image.open(os.path.join(data, f'{i:05d}.png'))))
                          for i in range(64)]).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1
    torch.manual_seed(1234)
    with torch.no_grad():
        return float(torch.stack([loss_fn(net=net, images=images).mean() for _ in range(4)]).mean())


def torch_loss(cfg):
    import dnnlib
    return dnnlib.util.construct_class_by_name(**tl.loss_kwargs(cfg))


def deterministic_noise(monkeypatch):
    """Noise as a fixed function of each image, so a sample's draw does not depend on how batches are split."""
    monkeypatch.setattr(torch, 'randn_like', lambda x, **kw: torch.sin(x * 53.0 + 1.0))

#----------------------------------------------------------------------------
# Training works and its outputs follow the references.


@pytest.fixture(scope='module')
def trained(cifar, tmp_path_factory):
    """Both recipes trained for 64 steps of 32 images; eval loss before and after."""
    runs = {}
    for preset in ('tiny-edm', 'tiny-edm2'):
        cfg = build_config(preset, data=cifar['c8'], total_nimg=2048, status_nimg=512, snapshot_nimg=1024,
                           checkpoint_nimg=1024)
        torch.manual_seed(0)
        before_net = tl.dnnlib.util.construct_class_by_name(**tl.network_kwargs(cfg), img_resolution=8, img_channels=3,
                                                            label_dim=0)
        run_dir = tmp_path_factory.mktemp(preset)
        result = tl.training_loop(cfg, str(run_dir), torch.device('cpu'))
        runs[preset] = dict(cfg=cfg, run_dir=run_dir, result=result, before=eval_loss(cfg, before_net.train(), cfg.data),
                            after=eval_loss(cfg, result.net, cfg.data))
    return runs


@pytest.mark.parametrize('preset', ['tiny-edm', 'tiny-edm2'])
def test_loss_falls(trained, preset):
    run = trained[preset]
    assert run['result'].cur_nimg == 2048
    assert run['after'] < 0.8 * run['before'], (run['before'], run['after'])
    stats = [json.loads(line) for line in (run['run_dir'] / 'stats.jsonl').read_text().splitlines()]
    kimg = [s['Progress/kimg'] for s in stats]
    kimg = [x['mean'] if isinstance(x, dict) else x for x in kimg]
    if preset == 'tiny-edm':  # EDM's tick 0: a status line right after the first step
        assert kimg[0] * 1000 == pytest.approx(run['cfg'].batch_size) and len(stats) == 5
    else:
        assert len(stats) == 4
    loss = [s['Loss/loss'] for s in stats]
    loss = [x['mean'] if isinstance(x, dict) else x for x in loss]
    assert loss[-1] < loss[0]


def test_output_files_follow_reference_names(trained):
    edm = sorted(os.listdir(trained['tiny-edm']['run_dir']))
    assert edm == ['log.txt', 'network-snapshot-000001.pkl', 'network-snapshot-000002.pkl', 'run_config.json',
                   'stats.jsonl', 'training-state-000001.pt', 'training-state-000002.pt', 'training_options.json']
    edm2 = sorted(os.listdir(trained['tiny-edm2']['run_dir']))
    assert 'network-snapshot-0000002-0.050.pkl' in edm2 and 'network-snapshot-0000002-0.100.pkl' in edm2
    assert 'training-state-0000002.pt' in edm2
    run_dir = trained['tiny-edm']['run_dir']
    options = json.loads((run_dir / 'training_options.json').read_text())
    assert options['network_kwargs']['class_name'] == 'training.networks.EDMPrecond'
    assert options['network_kwargs']['model_type'] == 'SongUNet'
    assert options['loss_kwargs']['class_name'] == 'training.loss.EDMLoss'
    log = (run_dir / 'log.txt').read_text()
    assert 'Status: kimg' in log and 'sec/kimg' in log and 'img/s' in log
    edm_stats = json.loads((run_dir / 'stats.jsonl').read_text().splitlines()[0])
    assert {'Loss/loss', 'Progress/kimg', 'Timing/sec_per_kimg', 'Resources/peak_gpu_mem_gb'} <= set(edm_stats)
    state = load_state(run_dir)
    assert state['format_version'] == tl.STATE_FORMAT_VERSION and state['config']['preset'] == 'tiny-edm'
    assert not any(k.startswith('_orig_mod.') for k in state['net'])


@pytest.mark.parametrize('preset', ['tiny-edm', 'tiny-edm2'])
def test_snapshot_loads_safely_and_generates(trained, preset):
    from training.sampling import generate_images
    run_dir = trained[preset]['run_dir']
    name = 'network-snapshot-000002.pkl' if preset == 'tiny-edm' else 'network-snapshot-0000002-0.100.pkl'
    data = persistence.load_pickle(str(run_dir / name))
    assert set(data) >= {'ema', 'loss_fn', 'dataset_kwargs'}
    expected_dtype = torch.float32 if preset == 'tiny-edm' else torch.float16  # EDM2 stores the EMA in fp16
    assert all(p.dtype == expected_dtype for p in data['ema'].parameters())
    net = data['ema'].to(torch.float32)
    if preset == 'tiny-edm':
        ref = trained[preset]['result'].ema.get()
        for a, b in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    batches = list(generate_images(net, seeds=[0, 1], encoder=data.get('encoder'), batch_size=2, num_steps=4))
    images = batches[0].images
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8 and images.float().std() > 0

#----------------------------------------------------------------------------
# Exact resume, accumulation and DDP.


@pytest.mark.parametrize('preset,extra', [('tiny-edm', dict(augment=0.5)), ('tiny-edm2', dict(stf=True, rbatch=64))])
def test_resume_is_exact(cifar, tmp_path, preset, extra):
    common = dict(data=cifar['c8'], status_nimg=None, snapshot_nimg=None, checkpoint_nimg=None, **extra)
    train(tmp_path / 'full', preset, total_nimg=256, **common)
    train(tmp_path / 'split', preset, total_nimg=128, **common)
    result = train(tmp_path / 'split', preset, total_nimg=256, **common)  # same command, longer: resumes
    assert result.cur_nimg == 256
    assert_states_equal(load_state(tmp_path / 'full'), load_state(tmp_path / 'split'))


def record_gradients(patch, store: list) -> None:
    """Append a float64 copy of every parameter's gradient to `store` each time Adam is about to step."""
    adam_step = torch.optim.Adam.step
    def step(self, *args, **kwargs):
        store.append([p.grad.double().clone() for group in self.param_groups for p in group['params']])
        return adam_step(self, *args, **kwargs)
    patch(torch.optim.Adam, 'step', step)


def assert_gradients_match(ours, full, batch_size, resolution):
    """Gradients from the same weights, summed in another order: equal up to fp32 summation error.

    A weight gradient sums batch x pixels products; the rounding error of an n-term fp32 sum is at most about
    n * eps * (sum of |terms|), taken here as n * eps * the tensor's largest gradient. Adam's update g / sqrt(v)
    would amplify these differences without bound where g is near 0, so the gradients are what we compare.
    """
    tol = batch_size * resolution ** 2 * torch.finfo(torch.float32).eps
    assert len(ours) == len(full)
    for i, (a, b) in enumerate(zip(ours, full)):
        scale = b.abs().max().item()
        diff = (a - b).abs().max().item()
        assert diff <= tol * scale, f'parameter {i}: max abs difference {diff:.3g} > {tol:.3g} x max |grad| {scale:.3g}'


@pytest.mark.parametrize('preset', ['tiny-edm', 'tiny-edm2'])
def test_accumulation_equals_full_batch(cifar, tmp_path, monkeypatch, preset):
    deterministic_noise(monkeypatch)
    grads = []
    record_gradients(monkeypatch.setattr, grads)
    common = dict(data=cifar['c8'], total_nimg=16, batch_size=16, P_mean=-0.5, P_std=0.0, status_nimg=None,
                  snapshot_nimg=None)
    train(tmp_path / 'full', preset, **common)
    train(tmp_path / 'accum', preset, batch_gpu=4, **common)  # 4 rounds of 4
    assert len(grads) == 2
    assert_gradients_match(grads[1], grads[0], batch_size=16, resolution=8)


def _ddp_worker(rank, port, run_dir, data):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE='2')
    torch.set_num_threads(1)
    torch.randn_like = lambda x, **kw: torch.sin(x * 53.0 + 1.0)
    grads = []
    record_gradients(lambda obj, name, value: setattr(obj, name, value), grads)
    dist.init(torch.device('cpu'))
    cfg = build_config('tiny-edm2', data=data, total_nimg=32, batch_size=16, P_mean=-0.5, P_std=0.0,
                       status_nimg=16, snapshot_nimg=None)
    tl.training_loop(cfg, run_dir, torch.device('cpu'))
    torch.save(grads[0], os.path.join(run_dir, f'grads-rank{rank}.pt'))
    dist.shutdown()


def test_two_process_gloo_equals_one_process(cifar, tmp_path, monkeypatch):
    port = free_port()
    torch.multiprocessing.spawn(_ddp_worker, args=(port, str(tmp_path / 'ddp'), cifar['c8']), nprocs=2, join=True)
    deterministic_noise(monkeypatch)
    grads = []
    record_gradients(monkeypatch.setattr, grads)
    train(tmp_path / 'single', 'tiny-edm2', data=cifar['c8'], total_nimg=32, batch_size=16, P_mean=-0.5, P_std=0.0,
          status_nimg=16, snapshot_nimg=None)
    assert load_state(tmp_path / 'ddp')['cur_nimg'] == 32
    for rank in range(2):  # the all-reduced gradient of the first step, on both ranks
        ddp_grads = torch.load(tmp_path / 'ddp' / f'grads-rank{rank}.pt')
        assert_gradients_match(ddp_grads, grads[0], batch_size=16, resolution=8)

#----------------------------------------------------------------------------
# Stop signals, NaN, transfer, explicit resume.


def test_stop_signal_checkpoints_then_rerun_continues(cifar, tmp_path, monkeypatch):
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    monkeypatch.setattr(dist, '_handlers_installed', False)
    try:
        dist.install_signal_handlers()
        signal.raise_signal(signal.SIGUSR1)
        first = train(tmp_path, data=cifar['c8'], total_nimg=128)
    finally:
        dist.request_stop(False)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert first.stopped and first.cur_nimg == 32 and load_state(tmp_path)['cur_nimg'] == 32
    second = train(tmp_path, data=cifar['c8'], total_nimg=128)
    assert not second.stopped and second.cur_nimg == 128


def test_nan_loss_stops_and_keeps_last_good_state(cifar, tmp_path):
    train(tmp_path, data=cifar['c8'], total_nimg=64)
    before = sorted(os.listdir(tmp_path))
    good = (tmp_path / 'training-state-000000.pt').read_bytes()
    with pytest.raises(tl.NonFiniteLossError, match='NaN'):
        train(tmp_path, data=cifar['c8'], total_nimg=256, P_mean=1000.0, allow_option_change=True)  # sigma = inf
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / 'training-state-000000.pt').read_bytes() == good
    assert 'NaN' in (tmp_path / 'log.txt').read_text()


def test_transfer_and_explicit_resume(cifar, tmp_path):
    src = train(tmp_path / 'src', data=cifar['c8'], total_nimg=64)
    cfg = build_config('tiny-edm', data=cifar['c8'], transfer=str(tmp_path / 'src' / 'network-snapshot-000000.pkl'))
    ctx = tl.setup(cfg, str(tmp_path / 'transfer'), torch.device('cpu'))
    assert ctx.cur_nimg == 0
    for a, b in zip(ctx.net.parameters(), src.ema.get().parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    cfg = build_config('tiny-edm', data=cifar['c8'], resume=str(tmp_path / 'src' / 'training-state-000000.pt'))
    ctx = tl.setup(cfg, str(tmp_path / 'resumed'), torch.device('cpu'))
    assert ctx.cur_nimg == 64
    for a, b in zip(ctx.net.parameters(), src.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_edm2_trains_on_vae_latent_npy(tmp_path):
    """8-channel NPY items (SD-VAE posterior mean, std) train a 4-channel latent model via StabilityVAEEncoder."""
    rng = np.random.default_rng(0)
    data = tmp_path / 'latents'
    data.mkdir()
    raw_mean = np.float32([5.81, 3.25, 0.12, -2.15]).reshape(4, 1, 1)
    for i in range(32):
        mean = raw_mean + rng.standard_normal([4, 8, 8]).astype(np.float32) * 4
        np.save(data / f'{i:05d}.npy', np.concatenate([mean, np.full([4, 8, 8], 0.1, np.float32)]))
    result = train(tmp_path / 'run', 'tiny-edm2', data=str(data), total_nimg=64, batch_size=16, bf16=True)
    assert result.cur_nimg == 64 and result.net.img_channels == 4
    options = json.loads((tmp_path / 'run' / 'training_options.json').read_text())
    assert options['encoder_kwargs']['class_name'] == 'training.encoders.StabilityVAEEncoder'
    snapshot = persistence.load_pickle(str(tmp_path / 'run' / 'network-snapshot-0000000-0.050.pkl'))
    assert type(snapshot['encoder']).__name__ == 'StabilityVAEEncoder'
    assert all(torch.isfinite(p).all() for p in result.net.parameters())


def test_channels_last_training_matches_reference_layout(cifar, tmp_path, monkeypatch):
    """The channels-last fast path computes the same gradients as the reference NCHW layout."""
    deterministic_noise(monkeypatch)
    grads = []
    record_gradients(monkeypatch.setattr, grads)
    common = dict(data=cifar['c8'], total_nimg=16, batch_size=16, status_nimg=None, snapshot_nimg=None)
    train(tmp_path / 'nchw', **common)
    train(tmp_path / 'cl', channels_last=True, **common)
    assert len(grads) == 2
    assert_gradients_match(grads[1], grads[0], batch_size=16, resolution=8)  # convolutions sum in another order


def test_edm2_snapshot_times_off_multiples_of_1024_are_recorded(cifar, tmp_path):
    # Names hold kimg only: 1536 images reads back as 1024 from the name alone (as in the reference);
    # the run's snapshot index keeps the exact count for reconstruct_phema.
    from training import phema
    cfg = build_config('tiny-edm2', data=cifar['c8'], total_nimg=3072, status_nimg=1536, snapshot_nimg=1536,
                       checkpoint_nimg=None)
    tl.training_loop(cfg, str(tmp_path), torch.device('cpu'))
    listed = {(os.path.basename(p.path), p.nimg) for p in phema.list_input_pickles(tmp_path)}
    assert listed == {('network-snapshot-0000001-0.050.pkl', 1536), ('network-snapshot-0000001-0.100.pkl', 1536),
                      ('network-snapshot-0000003-0.050.pkl', 3072), ('network-snapshot-0000003-0.100.pkl', 3072)}
    (tmp_path / phema.SNAPSHOT_INDEX).unlink()
    assert {p.nimg for p in phema.list_input_pickles(tmp_path)} == {1024, 3072}


def test_zip_dataset_with_worker_processes_trains_like_the_main_process(cifar, tmp_path):
    # DataLoader worker processes feed the same batches in the same order: the same weights. (The shared
    # zip handle bug itself is caught by test_dataset.py::test_zip_reads_in_forked_workers.)
    import zipfile
    archive = tmp_path / 'c8.zip'
    with zipfile.ZipFile(archive, 'w') as z:
        for name in sorted(os.listdir(cifar['c8'])):
            z.write(os.path.join(cifar['c8'], name), name)
    common = dict(data=str(archive), total_nimg=128, status_nimg=None, snapshot_nimg=None, checkpoint_nimg=None)
    train(tmp_path / 'main', workers=0, **common)
    train(tmp_path / 'workers', workers=2, **common)
    assert_states_equal(load_state(tmp_path / 'main'), load_state(tmp_path / 'workers'))
