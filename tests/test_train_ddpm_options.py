"""The DDPM recipe's training options of tqch/ddpm-torch train.py: --chkpt-intv (epochs), --block-size
(ModelWrapper: pixel unshuffle around the UNet), --transfer from DDPM checkpoints and --eval (FID of the EMA at
every snapshot, with a stand-in detector: the real Inception weights are not needed)."""

import json
import os
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

import generate as generate_script
import train as train_script
from tests.conftest import free_port
from tests.test_train import assert_states_equal as assert_same, load_state
from training import detectors, metrics
from training import training_loop as tl
from training.eval_ddpm import REF_FILE, fid_of_network
from training.networks_ddpm import ModelWrapper, UNet, load_checkpoint
from training.presets import build_config
from training.sampling_ddpm import DDPMNetwork, load_ddpm_network

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py
TINY_UNET = dict(hid_channels=32, ch_multipliers=[1, 2], num_res_blocks=1, apply_attn=[False, True])


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """48 smooth random 16x16 RGB images as a PNG folder."""
    folder = tmp_path_factory.mktemp('ddpm-data')
    rng = np.random.RandomState(0)
    for i in range(48):
        image = np.kron(rng.rand(4, 4, 3) * 255, np.ones((4, 4, 1))) + rng.randn(16, 16, 3) * 8
        PIL.Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f'{i:05d}.png')
    return str(folder)


def train(run_dir, **overrides):
    cfg = build_config('tiny-ddpm', **{**dict(status_nimg=None, snapshot_nimg=None, checkpoint_nimg=None), **overrides})
    return tl.training_loop(cfg, str(run_dir), torch.device('cpu'))


def invoke_train(args):
    return CliRunner().invoke(train_script.main, args)


def dry_run_config(args):
    result = invoke_train(args + ['-n'])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index('{'):result.output.rindex('}') + 1])


def assert_one_line_error(result, message):
    errors = [line for line in result.output.splitlines() if 'Error' in line]
    assert result.exit_code != 0 and len(errors) == 1 and message in errors[0], result.output
    assert 'Traceback' not in result.output


class ProjectionDetector(detectors.Detector):
    """Stand-in for Inception-v3: a fixed random projection of the pixels to 8 features."""

    def __init__(self, pixels: int = 16 * 16 * 3):
        super().__init__(name='projection', feature_dim=8)
        self.weight = torch.randn([pixels, 8], generator=torch.Generator().manual_seed(0))

    def __call__(self, images):
        return images.float().flatten(1) @ self.weight / 255


@pytest.fixture
def stand_in_detector(monkeypatch):
    monkeypatch.setattr(metrics, 'build_detectors', lambda names, **kwargs: {'inception': ProjectionDetector()})

#----------------------------------------------------------------------------
# --chkpt-intv: epochs between snapshots and training states.


def test_chkpt_intv_counts_full_batches_of_unflipped_images():
    class Images:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n
    cfg = build_config('tiny-ddpm', batch_size=24, chkpt_intv=2)
    resolved = tl.resolve_epochs(cfg, Images(64))   # 64 images: 2 batches of 24 per epoch (the rest is dropped)
    assert resolved.snapshot_nimg == resolved.checkpoint_nimg == 96
    flipped = tl.resolve_epochs(build_config('tiny-ddpm', batch_size=24, chkpt_intv=0.5, xflip=True), Images(128))
    assert flipped.snapshot_nimg == 24   # x-flips double the dataset, not the epoch


def test_chkpt_intv_default_is_the_reference_120_epochs():
    cfg = dry_run_config(['--preset=ddpm-cifar10-32x32'])
    assert cfg['chkpt_intv'] == 120 and cfg['snapshot_nimg'] == cfg['checkpoint_nimg'] == 120 * 390 * 128
    cfg = dry_run_config(['--preset=ddpm-cifar10-32x32', '--snapshot=1M'])   # images replace the preset's epochs
    assert cfg['chkpt_intv'] is None and cfg['snapshot_nimg'] == 10**6 and cfg['checkpoint_nimg'] == 120 * 390 * 128
    assert dry_run_config(['--preset=ddpm-celeba-64x64', '--chkpt-intv=10'])['chkpt_intv'] == 10


def test_cli_takes_the_eval_and_block_options():
    cfg = dry_run_config(['--preset=ddpm-celeba-64x64', '--eval', '--eval-total-size=10000', '--eval-batch-size=500',
                          '--eval-ref=refs/celeba.npz', '--use-ddim', '--skip-schedule=quadratic', '--subseq-size=100',
                          '--block-size=2', '--transfer=ddpm_celeba.pt'])
    expected = dict(eval=True, eval_total_size=10000, eval_batch_size=500, eval_ref='refs/celeba.npz', use_ddim=True,
                    skip_schedule='quadratic', subseq_size=100, block_size=2, transfer='ddpm_celeba.pt')
    assert {k: cfg[k] for k in expected} == expected
    defaults = dry_run_config(['--preset=ddpm-celeba-64x64'])   # ddpm-torch train.py's defaults
    assert (defaults['eval'], defaults['eval_total_size'], defaults['eval_batch_size'], defaults['use_ddim'],
            defaults['skip_schedule'], defaults['subseq_size'], defaults['block_size']) == \
           (False, 50000, 256, False, 'linear', 50, 1)


@pytest.mark.parametrize('args,message', [
    (['--chkpt-intv=10', '--checkpoint=1M'], '--chkpt-intv=10 (epochs) and --checkpoint=1000000 (images) both set when to save'),
    (['--chkpt-intv=2', '--snapshot=5k'], '--chkpt-intv=2 (epochs) and --snapshot=5000 (images) both set'),
    (['--chkpt-intv=0'], "Invalid value for '--chkpt-intv'"),
])
def test_chkpt_intv_errors(args, message):
    assert_one_line_error(invoke_train(['--preset=ddpm-cifar10-32x32', '-n'] + args), message)


@pytest.mark.parametrize('flag', ['--chkpt-intv=5', '--block-size=2', '--eval', '--eval-total-size=100', '--use-ddim'])
def test_ddpm_training_options_need_a_ddpm_preset(flag):
    assert_one_line_error(invoke_train(['--preset=tiny-edm', '-n', flag]), 'DDPM options need a DDPM preset')

#----------------------------------------------------------------------------
# --block-size: ddpm-torch's ModelWrapper.


def test_model_wrapper_is_pixel_unshuffle_unet_pixel_shuffle():
    torch.manual_seed(0)
    wrapper = ModelWrapper(2, in_channels=12, out_channels=12, **TINY_UNET).eval()
    assert (wrapper.in_channels, wrapper.out_channels, wrapper.block_size) == (3, 3, 2)
    assert all(key.startswith('_model.') for key in wrapper.state_dict())
    unet = UNet(in_channels=12, out_channels=12, **TINY_UNET).eval()
    unet.load_state_dict({key[len('_model.'):]: value for key, value in wrapper.state_dict().items()})
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        for p in unet.parameters():   # the reference zero-initialises the output conv; make every path matter
            p.add_(torch.randn_like(p) * 0.02)
        wrapper._model.load_state_dict(unet.state_dict())
        expected = torch.nn.functional.pixel_shuffle(unet(torch.nn.functional.pixel_unshuffle(x, 2), t), 2)
        torch.testing.assert_close(wrapper(x, t), expected, rtol=0, atol=0)


def test_block_size_trains_and_its_snapshot_samples(data, tmp_path):
    result = train(tmp_path, data=data, total_nimg=64, snapshot_nimg=64, block_size=2, timesteps=20)
    assert isinstance(result.net, ModelWrapper) and result.net._model.in_channels == 12
    checkpoint = torch.load(tmp_path / 'network-snapshot-000000.pt', weights_only=True)
    assert checkpoint['config']['block_size'] == 2 and checkpoint['config']['unet']['in_channels'] == 12
    assert all(key.startswith('_model.') for key in checkpoint['ema']['shadow'])
    net = load_ddpm_network(str(tmp_path / 'network-snapshot-000000.pt'), use_ema=True)
    assert isinstance(net.unet, ModelWrapper) and net.unet.block_size == 2
    for key, value in result.ema.get().state_dict().items():
        assert torch.equal(net.unet.state_dict()[key], value)
    out = tmp_path / 'images'
    cli = CliRunner().invoke(generate_script.main, [f'--net={tmp_path / "network-snapshot-000000.pt"}', '--use-ema',
                                                     '--use-ddim', '--subseq-size=3', f'--outdir={out}', '--seeds=0-1'])
    assert cli.exit_code == 0, cli.output
    assert np.asarray(PIL.Image.open(out / '000001.png')).shape == (16, 16, 3)


def test_published_block_size_checkpoint_loads_and_samples(tmp_path):
    # ddpm-torch's layout for --block-size 2 under DDP: model keys 'module._model.*', ema.shadow keys '_model.*'.
    torch.manual_seed(1)
    wrapper = ModelWrapper(2, in_channels=12, out_channels=12, **TINY_UNET)
    model = {'module.' + key: value for key, value in wrapper.state_dict().items()}
    shadow = {key: value * 0.5 for key, value in wrapper.state_dict().items()}
    path = tmp_path / 'ddpm_cifar10.pt'
    torch.save(dict(model=model, ema=dict(decay=0.9999, shadow=shadow, num_updates=3), optimizer={}, epoch=5), path)
    net, _ = load_checkpoint(str(path), use_ema=True)
    assert isinstance(net, ModelWrapper) and net.block_size == 2 and net.in_channels == 3
    assert torch.equal(net.state_dict()['_model.in_conv.weight'], shadow['_model.in_conv.weight'])
    result = CliRunner().invoke(generate_script.main, [f'--net={path}', '--dataset=cifar10', '--use-ddim', '--subseq-size=2',
                                                       f'--outdir={tmp_path / "out"}', '--seeds=0'])
    assert result.exit_code == 0, result.output
    assert np.asarray(PIL.Image.open(tmp_path / 'out' / '000000.png')).shape == (32, 32, 3)


def test_block_size_that_does_not_fit_the_images_is_a_one_line_error(data, tmp_path):
    result = invoke_train(['--preset=tiny-ddpm', f'--data={data}', f'--outdir={tmp_path}', '--block-size=3'])
    assert_one_line_error(result, '--block-size=3 does not fit 16x16 images')
    result = invoke_train(['--preset=ddpm-cifar10-32x32', '-n', '--block-size=16'])
    assert_one_line_error(result, '--block-size=16 does not fit 32x32 images')

#----------------------------------------------------------------------------
# --transfer: initialise from a DDPM checkpoint.


def setup_only(run_dir, **overrides):
    """The loop's setup (network built, weights transferred), without training."""
    cfg = build_config('tiny-ddpm', **{**dict(status_nimg=None, snapshot_nimg=None, checkpoint_nimg=None), **overrides})
    try:
        return tl.setup(cfg, str(run_dir), torch.device('cpu'))
    finally:
        tl._close_logging()


@pytest.fixture(scope='module')
def source_run(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp('source')
    result = train(run_dir, data=data, total_nimg=64, snapshot_nimg=64)
    return run_dir, result


def test_transfer_from_our_snapshot_takes_the_ema(data, source_run, tmp_path):
    run_dir, source = source_run
    ctx = setup_only(tmp_path, data=data, transfer=str(run_dir / 'network-snapshot-000000.pt'))
    expected = source.ema.get().state_dict()
    assert not torch.equal(expected['in_conv.weight'], source.net.state_dict()['in_conv.weight'])
    for key, value in ctx.net.state_dict().items():
        assert torch.equal(value, expected[key]) and torch.equal(ctx.ema.get().state_dict()[key], value)
    assert ctx.cur_nimg == 0 and ctx.ema.num_updates == 0
    assert 'Initialised the network from the ema.shadow weights' in (tmp_path / 'log.txt').read_text()


def test_transfer_from_published_model_weights_and_from_a_training_state(data, source_run, tmp_path):
    run_dir, source = source_run
    model = source.net.state_dict()
    torch.save(dict(model={'module.' + k: v for k, v in model.items()}, optimizer={}, epoch=1), tmp_path / 'raw.pt')
    ctx = setup_only(tmp_path / 'a', data=data, transfer=str(tmp_path / 'raw.pt'))
    assert all(torch.equal(value, model[key]) for key, value in ctx.net.state_dict().items())
    ctx = setup_only(tmp_path / 'b', data=data, transfer=str(run_dir / 'training-state-000000.pt'))
    ema = source.ema.get().state_dict()
    assert all(torch.equal(value, ema[key]) for key, value in ctx.net.state_dict().items())


def test_transfer_with_another_layout_names_the_keys(data, source_run, tmp_path):
    run_dir, _source = source_run
    path = str(run_dir / 'network-snapshot-000000.pt')
    with pytest.raises(ValueError, match=r'--transfer=.*missing keys: _model\.embed.*unexpected keys: embed'):
        setup_only(tmp_path / 'a', data=data, transfer=path, block_size=2)
    result = invoke_train(['--preset=tiny-ddpm', f'--data={data}', f'--outdir={tmp_path / "b"}', f'--transfer={path}',
                           '--cbase=64'])
    assert_one_line_error(result, 'shape mismatches: ')
    result = invoke_train(['--preset=tiny-ddpm', f'--data={data}', f'--outdir={tmp_path / "c"}',
                           f'--transfer={tmp_path / "none.pt"}'])
    assert_one_line_error(result, 'none.pt: no such file')
    torch.save(dict(model=torch.nn.Linear(2, 2)), tmp_path / 'code.pt')   # unpickling it would run code
    result = invoke_train(['--preset=tiny-ddpm', f'--data={data}', f'--outdir={tmp_path / "d"}',
                           f'--transfer={tmp_path / "code.pt"}'])
    assert_one_line_error(result, 'not a DDPM checkpoint readable without running code (it holds torch.nn.modules.linear.Linear)')
    assert result.output.strip().splitlines()[-1].startswith('Error: --transfer=')   # the message is one line

#----------------------------------------------------------------------------
# --eval: FID of the EMA at every snapshot.


def test_eval_logs_the_fid_of_the_ema_at_every_snapshot(data, tmp_path, stand_in_detector):
    common = dict(data=data, eval=True, eval_total_size=12, eval_batch_size=5, timesteps=10, xflip=True)
    train(tmp_path, total_nimg=96, chkpt_intv=2, status_nimg=16, **common)   # 48 images x2 flips: epoch = 32
    log = (tmp_path / 'log.txt').read_text()
    assert log.count('Saved network-snapshot-000000.pt') == 2 and log.count(' of the EMA (12 images, ancestral, 10 steps') == 2
    assert f'FID reference statistics (--eval): {data} (48 images, cached as' in log
    stats = [json.loads(line) for line in (tmp_path / 'stats.jsonl').read_text().splitlines()]
    fids = [(line['Progress/kimg']['mean'], line['Metrics/fid']['mean']) for line in stats if 'Metrics/fid' in line]
    assert [kimg for kimg, _ in fids] == pytest.approx([0.064, 0.096]) and len(stats) == 3   # a status line per step
    # The value: EMA weights of the snapshot, seeds 0..11, against the statistics of --data.
    checkpoint = torch.load(tmp_path / 'network-snapshot-000000.pt', weights_only=True)
    assert checkpoint['epoch'] == 3 and checkpoint['fid'] == pytest.approx(fids[-1][1], rel=1e-6)
    ref = metrics.load_stats(str(tmp_path / REF_FILE))
    expected_ref = metrics.stats_for_files(data, ['fid'], {'inception': ProjectionDetector()}, torch.device('cpu'),
                                           num_workers=0)[0]
    np.testing.assert_allclose(ref['fid']['sigma'], expected_ref['fid']['sigma'], rtol=1e-12)
    net = load_ddpm_network(str(tmp_path / 'network-snapshot-000000.pt'), use_ema=True)
    fid = fid_of_network(net, ref, {'inception': ProjectionDetector()}, 12, 5, torch.device('cpu'))  # the loop's batch
    assert fid == checkpoint['fid'] and fid > 0
    # Evaluating changes nothing of the training.
    train(tmp_path / 'no-eval', total_nimg=96, chkpt_intv=2, **dict(common, eval=False))
    assert_same(load_state(tmp_path), load_state(tmp_path / 'no-eval'), atol=0)
    # A rerun with a longer duration reads the cached statistics.
    train(tmp_path, total_nimg=128, chkpt_intv=2, status_nimg=16, **common)
    assert f'FID reference statistics (--eval): {tmp_path / REF_FILE}' in (tmp_path / 'log.txt').read_text()


def test_cli_eval_with_the_inception_detector_class(data, tmp_path, monkeypatch):
    # The real detector path (no build_detectors stand-in): a tiny TorchScript module in place of Inception-v3.
    from tests.test_readme_commands import TinyInception
    detector = tmp_path / 'tiny-inception.pt'
    with warnings.catch_warnings():   # torch.jit is deprecated, but it is the format of the FID detector file
        warnings.simplefilter('ignore', DeprecationWarning)
        torch.jit.save(torch.jit.script(TinyInception().eval()), str(detector))
    monkeypatch.setenv(detectors.INCEPTION_ENV, str(detector))
    result = invoke_train(['--preset=tiny-ddpm', f'--data={data}', f'--outdir={tmp_path / "run"}', '--duration=32',
                           '--snapshot=32', '--checkpoint=32', '--status=32', '--eval', '--eval-total-size=3',
                           '--timesteps=4'])
    assert result.exit_code == 0, result.output
    stats = [json.loads(line) for line in (tmp_path / 'run' / 'stats.jsonl').read_text().splitlines()]
    assert len(stats) == 1 and np.isfinite(stats[0]['Metrics/fid']['mean'])
    assert metrics.load_stats(str(tmp_path / 'run' / REF_FILE))['fid']['mu'].shape == (2048,)


def test_eval_with_ddim_and_a_reference_file(data, tmp_path, stand_in_detector):
    ref = tmp_path / 'ref.npz'
    metrics.save_stats(metrics.stats_for_files(data, ['fid'], {'inception': ProjectionDetector()}, torch.device('cpu'),
                                               num_workers=0)[0], str(ref))
    train(tmp_path / 'run', data=data, total_nimg=32, snapshot_nimg=32, eval=True, eval_total_size=4, eval_ref=str(ref),
          use_ddim=True, skip_schedule='quadratic', subseq_size=3)
    log = (tmp_path / 'run' / 'log.txt').read_text()
    assert f'FID reference statistics (--eval): {ref}' in log and 'DDIM eta 0, quadratic subsequence of 3' in log
    assert not (tmp_path / 'run' / REF_FILE).exists()


def test_eval_errors_come_before_training(data, tmp_path, stand_in_detector):
    bad_ref = tmp_path / 'ref.pkl'
    metrics.save_stats({'fid': dict(mu=np.zeros(5), sigma=np.eye(5))}, str(bad_ref))
    result = invoke_train(['--preset=tiny-ddpm', f'--data={data}', f'--outdir={tmp_path / "run"}', '--eval',
                           f'--eval-ref={bad_ref}'])
    assert_one_line_error(result, 'has 5-d features, but the detector projection gives 8-d')
    assert not any(name.endswith('.pt') for name in os.listdir(tmp_path / 'run'))
    result = invoke_train(['--preset=tiny-ddpm', '-n', '--eval', '--use-ddim', '--subseq-size=2000'])
    assert_one_line_error(result, '--subseq-size=2000 is larger than --timesteps=1000')


def _fid_worker(rank, world_size, port, state_dict, ref, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world_size)
    try:
        fid = fid_of_network(tiny_network(state_dict), ref, {'inception': ProjectionDetector()}, 7, 4,
                             torch.device('cpu'))
        torch.save(fid, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        torch.distributed.destroy_process_group()


def tiny_network(state_dict=None):
    torch.manual_seed(2)
    unet = UNet(in_channels=3, out_channels=3, **TINY_UNET)
    if state_dict is not None:
        unet.load_state_dict(state_dict)
    settings = dict(timesteps=5, beta_schedule='linear', beta_start=1e-3, beta_end=0.2, model_mean_type='eps',
                    model_var_type='fixed-large')
    return DDPMNetwork(unet, 16, settings).eval()


def test_eval_fid_split_over_two_processes_equals_one_process(data, tmp_path):
    net = tiny_network()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref = metrics.stats_for_files(data, ['fid'], {'inception': ProjectionDetector()}, torch.device('cpu'), num_workers=0)[0]
    single = fid_of_network(net, ref, {'inception': ProjectionDetector()}, 7, 4, torch.device('cpu'))
    mp.spawn(_fid_worker, args=(2, free_port(), net.unet.state_dict(), ref, str(tmp_path)), nprocs=2, join=True)
    assert torch.load(tmp_path / 'rank1.pt') is None   # every rank generates; rank 0 reports
    assert torch.load(tmp_path / 'rank0.pt', weights_only=False) == pytest.approx(single, rel=1e-9)
