"""Presets and build_config (pure), reference-format kwargs, and train.py through CliRunner:
--dry-run, a tiny run, and one clear error line (exit 1, nothing written) for bad input."""

import json
import os
import signal

import pytest
import torch
from click.testing import CliRunner

import train
from tests.conftest import free_port
from tests.test_train import cifar  # noqa: F401  (module fixture)

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py
from torch_utils import distributed as dist
from training import run_dir
from training import training_loop as tl
from training.presets import PRESETS, build_config, check_batch, from_json, to_json

#----------------------------------------------------------------------------
# Presets.


@pytest.mark.parametrize('name,channels,lr,decay,dropout,P_mean,P_std,duration_Mi', [
    ('edm2-img512-xxs', 64,  0.0170, 70000, 0.00, -0.4, 1.0, 2048),
    ('edm2-img512-s',   192, 0.0100, 70000, 0.00, -0.4, 1.0, 2048),
    ('edm2-img512-xxl', 448, 0.0065, 70000, 0.10, -0.4, 1.0, 896),
    ('edm2-img64-s',    192, 0.0100, 35000, 0.00, -0.8, 1.6, 1024),
    ('edm2-img64-xl',   384, 0.0070, 35000, 0.10, -0.8, 1.6, 640),
])
def test_edm2_presets_match_reference(name, channels, lr, decay, dropout, P_mean, P_std, duration_Mi):
    cfg = build_config(name)
    assert (cfg.model_channels, cfg.lr, cfg.lr_decay_batches, cfg.dropout, cfg.P_mean, cfg.P_std) == \
        (channels, lr, decay, dropout, P_mean, P_std)
    assert cfg.total_nimg == duration_Mi << 20 and cfg.batch_size == 2048 and cfg.adam_betas == (0.9, 0.99)
    assert cfg.ema_stds == (0.050, 0.100) and cfg.fp16 and cfg.cond and cfg.augment == 0
    assert (cfg.status_nimg, cfg.snapshot_nimg, cfg.checkpoint_nimg) == (128 << 10, 8 << 20, 128 << 20)
    kwargs = tl.network_kwargs(cfg)
    assert kwargs.class_name == 'training.networks_edm2.Precond' and kwargs.model_channels == channels
    assert tl.loss_kwargs(cfg) == dict(class_name='training.loss.EDM2Loss', P_mean=P_mean, P_std=P_std)


def test_edm_presets_match_reference():
    cifar_cfg = build_config('edm-cifar10-32x32-cond-vp')
    assert (cifar_cfg.batch_size, cifar_cfg.lr, cifar_cfg.dropout, cifar_cfg.augment, cifar_cfg.ema_halflife_Mimg) == \
        (512, 1e-3, 0.13, 0.12, 0.5)
    assert cifar_cfg.total_nimg == 200_000_000 and cifar_cfg.cond and cifar_cfg.lr_rampup_Mimg == 10
    net = tl.network_kwargs(cifar_cfg)
    assert net == dict(class_name='training.networks.EDMPrecond', model_type='SongUNet', embedding_type='positional',
                       encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                       model_channels=128, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13, use_fp16=False)
    assert tl.augment_kwargs(cifar_cfg) == dict(class_name='training.augment.AugmentPipe', p=0.12, xflip=1e8, yflip=1,
                                                scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    assert tl.network_kwargs(build_config('edm-cifar10-32x32-uncond-ve')).embedding_type == 'fourier'
    assert build_config('edm-ffhq-64x64-uncond-vp').dropout == 0.05
    afhq = build_config('edm-afhqv2-64x64-uncond-ve')
    assert (afhq.dropout, afhq.batch_size, afhq.lr, afhq.augment, afhq.channel_mult) == (0.25, 256, 2e-4, 0.15, (1, 2, 2, 2))
    imagenet = build_config('edm-imagenet-64x64-cond-adm')
    assert (imagenet.batch_size, imagenet.lr, imagenet.ema_halflife_Mimg, imagenet.loss_scaling, imagenet.fp16) == \
        (4096, 1e-4, 50, 100, True)
    assert (imagenet.model_channels, imagenet.channel_mult, imagenet.augment) == (192, (1, 2, 3, 4), 0)


def test_build_config_overrides_and_errors():
    cfg = build_config('tiny-edm', lr=None, batch_size=64, precond='vp', channel_mult=[1, 1])
    assert cfg.lr == PRESETS['tiny-edm'].lr and cfg.batch_size == 64 and cfg.channel_mult == (1, 1)
    assert tl.network_kwargs(cfg).class_name == 'training.networks.VPPrecond'
    assert tl.loss_kwargs(cfg) == dict(class_name='training.loss.VPLoss')
    assert tl.loss_kwargs(build_config('tiny-edm', stf=True)) == \
        dict(class_name='training.loss.STFLoss', base='edm', rbatch=4096)  # the STF fork's default
    assert build_config('edm-cifar10-32x32-cond-vp', arch='adm').model_channels == 192
    assert build_config('tiny-edm', arch='edm2').recipe == 'edm2'
    assert from_json(json.loads(json.dumps(to_json(cfg)))) == cfg
    for kwargs, match in [(dict(preset='nope'), 'tiny-edm2'), (dict(bogus=1), 'unknown config fields'),
                          (dict(fp16=True, bf16=True), 'mutually exclusive'),
                          (dict(precond='edm2'), None), (dict(arch='adm', precond='edm2'), 'do not match')]:
        preset = kwargs.pop('preset', 'tiny-edm')
        if match is None:
            assert build_config(preset, **kwargs).recipe == 'edm2'
            continue
        with pytest.raises(ValueError, match=match):
            build_config(preset, **kwargs)
    with pytest.raises(ValueError, match='--augment'):
        build_config('tiny-edm2', augment=0.1)


def test_check_batch():
    cfg = build_config('tiny-edm', batch_size=64, batch_gpu=8)
    assert check_batch(cfg, 1) == (8, 8) and check_batch(cfg, 2) == (8, 4) and check_batch(cfg, 8) == (8, 1)
    assert check_batch(build_config('tiny-edm', batch_size=64), 4) == (16, 1)
    with pytest.raises(ValueError, match=r'--batch=64 is not divisible by 3 GPUs x --batch-gpu=8'):
        check_batch(cfg, 3)
    with pytest.raises(ValueError, match='--batch-gpu=6'):
        check_batch(build_config('tiny-edm', batch_size=64, batch_gpu=6), 1)
    # STF fork: --rbatch counts the reference images of one GPU, its training images included.
    assert check_batch(build_config('tiny-edm', batch_size=64, stf=True, rbatch=16), 4) == (16, 1)
    with pytest.raises(ValueError, match=r'--rbatch=8 is smaller than the 16 training images per GPU'):
        check_batch(build_config('tiny-edm', batch_size=64, stf=True, rbatch=8), 4)


def test_learning_rate_schedule():
    # EDM: linear ramp-up to lr over 10 Mimg; EDM2: inverse sqrt after t_ref batches (Eq. 67).
    assert tl.learning_rate_schedule(5_000_000, 512, ref_lr=1e-3, ref_batches=0, rampup_Mimg=10) == pytest.approx(5e-4)
    assert tl.learning_rate_schedule(0, 2048, ref_lr=0.01, ref_batches=70000, rampup_Mimg=0) == 0.01
    t = 4 * 70000 * 2048
    assert tl.learning_rate_schedule(t, 2048, ref_lr=0.01, ref_batches=70000, rampup_Mimg=10) == pytest.approx(0.005)

#----------------------------------------------------------------------------
# The command line.


def invoke(args):
    return CliRunner().invoke(train.main, args, catch_exceptions=False)


def test_parse_nimg():
    assert train.parse_nimg('128Ki') == 131072 and train.parse_nimg('8Mi') == 8 << 20
    assert train.parse_nimg('2.5M') == 2_500_000 and train.parse_nimg('200', plain_unit=1e6) == 200_000_000
    with pytest.raises(Exception, match='not a count'):
        train.parse_nimg('lots')


def test_dry_run_prints_resolved_config():
    result = invoke(['--preset=edm2-img64-s', '-n', '--batch=1Ki', '--duration=64Mi', '--lr=0.02', '--P_mean=-1',
                     '--tick=10', '--snap=2', '--ema-stds=0.05,0.1,0.15'])
    assert result.exit_code == 0, result.output
    text = result.output.split('Training config:', 1)[1].rsplit('Dry run', 1)[0]
    cfg = json.loads(text)
    assert (cfg['batch_size'], cfg['total_nimg'], cfg['lr'], cfg['P_mean']) == (1024, 64 << 20, 0.02, -1)
    assert (cfg['status_nimg'], cfg['snapshot_nimg'], cfg['ema_stds']) == (10_000, 20_000, [0.05, 0.1, 0.15])
    assert cfg['model_channels'] == 192 and cfg['recipe'] == 'edm2'


@pytest.mark.parametrize('preset,duration,nimg,words', [
    ('edm-cifar10-32x32-cond-vp', '200', 200_000_000, '200,000,000 images (200 million)'),  # EDM: Mimg
    ('edm-cifar10-32x32-cond-vp', '0.5', 500_000, '500,000 images (500 thousand)'),
    ('edm2-img512-xs', '2147483648', 2 << 30, '2,147,483,648 images (2.15 billion)'),  # EDM2: images
    ('edm2-img512-xs', '2048Mi', 2 << 30, '2,147,483,648 images (2.15 billion)'),
    ('tiny-edm2', '100k', 100_000, '100,000 images (100 thousand)'),
])
def test_duration_counts_per_recipe_and_is_printed_in_words(preset, duration, nimg, words, tmp_path):
    result = invoke([f'--preset={preset}', f'--duration={duration}', f'--outdir={tmp_path / "run"}', '--nosubdir', '-n'])
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.output.split('Training config:', 1)[1].rsplit('Dry run', 1)[0])
    assert cfg['total_nimg'] == nimg and f'Training for: {words}' in result.output
    assert f'Run folder:   {tmp_path / "run"}' in result.output


@pytest.mark.parametrize('args,message', [
    (['--duration=2147483648'], '--duration is 2.15e+15 images, over the 1e+12 limit'),  # EDM2's number in EDM
    (['--preset=edm2-img512-xs', '--duration=2e12'], 'over the 1e+12 limit'),
    (['--duration=12x'], "Invalid value for --duration: '12x' is not a count"),
])
def test_duration_errors_come_before_the_config(args, message):
    result = CliRunner().invoke(train.main, args + ['-n'])
    assert result.exit_code != 0 and message in result.output, result.output
    assert 'Training config' not in result.output and 'Traceback' not in result.output


def test_edm_command_line_records_the_default_preset_as_such():
    cfg = json.loads(invoke(['--cond=1', '--arch=ncsnpp', '-n']).output.split('Training config:', 1)[1].rsplit('Dry run', 1)[0])
    assert cfg['preset'] == 'edm-cifar10-32x32-uncond-vp (default)' and cfg['cond'] and cfg['arch'] == 'ncsnpp'
    cfg = json.loads(invoke(['--preset=edm-cifar10-32x32-uncond-vp', '-n']).output.split('Training config:', 1)[1].rsplit('Dry run', 1)[0])
    assert cfg['preset'] == 'edm-cifar10-32x32-uncond-vp'


def test_cli_trains_and_resumes(cifar, tmp_path, monkeypatch):  # noqa: F811
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    monkeypatch.setattr(dist, '_handlers_installed', False)
    try:
        args = ['--preset=tiny-edm', f'--data={cifar["c8"]}', f'--outdir={tmp_path}', '--nosubdir', '--batch=16', '--status=16']
        assert invoke(args + ['--duration=0.000032']).exit_code == 0
        result = invoke(args + ['--duration=0.000064', '--stf', '--rbatch=32', '--allow-option-change'])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert result.exit_code == 0, result.output
    log = (tmp_path / 'log.txt').read_text()
    assert 'Resuming from' in log and 'changed options (--allow-option-change): rbatch: None -> 32; stf: False -> True' in log
    assert json.loads((tmp_path / 'run_config.json').read_text())['stf'] is True
    assert torch.load(tl.find_latest_state(str(tmp_path)), weights_only=False)['cur_nimg'] == 64


def test_resume_refuses_run_altering_option_changes(cifar, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(dist, 'install_signal_handlers', lambda: None)
    args = ['--preset=tiny-edm', f'--data={cifar["c8"]}', f'--outdir={tmp_path}', '--nosubdir', '--batch=16', '--status=16']
    assert invoke(args + ['--duration=0.016k']).exit_code == 0
    before = sorted(os.listdir(tmp_path))
    for changed, names in [(['--lr=0.01', '--batch=32'], "batch_size: 16 -> 32; lr: 0.002 -> 0.01"),
                           (['--preset=tiny-edm2'], 'arch:')]:  # another preset: another network, not a traceback
        result = CliRunner().invoke(train.main, args + ['--duration=0.032k'] + changed)
        error_lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
        assert result.exit_code == 1 and len(error_lines) == 1 and 'Traceback' not in result.output, result.output
        assert names in error_lines[0] and '--allow-option-change' in error_lines[0]
        assert sorted(os.listdir(tmp_path)) == before
    result = invoke(args + ['--duration=0.032k', '--workers=0', '--status=32', '--snapshot=32', '--checkpoint=32'])
    assert result.exit_code == 0, result.output  # harmless changes: intervals, workers, duration
    assert torch.load(tl.find_latest_state(str(tmp_path)), weights_only=False)['cur_nimg'] == 32


@pytest.mark.parametrize('case', ['missing', 'resolution', 'labels', 'batch'])
def test_bad_input_gives_one_clear_line(cifar, tmp_path, case):  # noqa: F811
    outdir = tmp_path / 'run'
    args = {'missing': [f'--data={tmp_path / "nope"}'],
            'resolution': [f'--data={cifar["c16"]}', '--preset=edm-cifar10-32x32-uncond-vp'],
            'labels': [f'--data={cifar["nolabels"]}', '--cond=1'],
            'batch': [f'--data={cifar["c8"]}', '--batch=30', '--batch-gpu=7']}[case]
    result = CliRunner().invoke(train.main, ['--preset=tiny-edm', f'--outdir={outdir}'] + args)  # later --preset wins
    expected = {'missing': 'dataset not found', 'resolution': 'holds 16x16 images, but --preset=edm-cifar10-32x32-uncond-vp trains at 32x32',
                'labels': '--cond=True, but', 'batch': '--batch=30 is not divisible by 1 GPUs x --batch-gpu=7'}[case]
    assert result.exit_code == 1
    error_lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(error_lines) == 1 and expected in error_lines[0], result.output
    assert 'Traceback' not in result.output and 'Training config' not in result.output  # validated, then printed
    assert not os.path.exists(outdir)


def test_edm_desc_makes_numbered_run_folders(cifar, tmp_path, monkeypatch):  # noqa: F811
    # EDM's --desc/--nosubdir: <outdir>/<NNNNN>-<dataset>-<cond>-<arch>-<precond>-gpus<N>-batch<B>-<dtype>-<desc>.
    monkeypatch.setattr(dist, 'install_signal_handlers', lambda: None)
    (tmp_path / '00007-older-run').mkdir()
    (tmp_path / 'notes').mkdir()
    args = ['--preset=tiny-edm', f'--data={cifar["c8"]}', f'--outdir={tmp_path}', '--batch=16', '--duration=0.000016',
            '--status=16', '--desc=try']
    for _ in range(2):
        result = invoke(args)
        assert result.exit_code == 0, result.output
    name = 'c8-uncond-ddpmpp-edm-gpus1-batch16-fp32-try'
    assert sorted(os.listdir(tmp_path)) == ['00007-older-run', f'00008-{name}', f'00009-{name}', 'notes']
    assert os.path.isfile(tmp_path / f'00009-{name}' / 'training-state-000000.pt')
    assert f'Run directory: {tmp_path / f"00009-{name}"}' in result.output
    result = invoke(args + ['--nosubdir', '--duration=0.000032'])
    assert result.exit_code == 0, result.output
    assert os.path.isfile(tmp_path / 'training-state-000000.pt') # --outdir itself is the run folder
    assert sorted(d for d in os.listdir(tmp_path) if os.path.isdir(tmp_path / d)) == [
        '00007-older-run', f'00008-{name}', f'00009-{name}', 'notes']


def test_bad_desc_is_one_line_and_writes_nothing(cifar, tmp_path):  # noqa: F811
    result = CliRunner().invoke(train.main, ['--preset=tiny-edm', f'--data={cifar["c8"]}', f'--outdir={tmp_path / "runs"}',
                                             '--desc=a/b'])
    assert result.exit_code == 2 and "'--desc': 'a/b' must be a non-empty name without path separators" in result.output
    assert 'Training config' not in result.output
    assert not (tmp_path / 'runs').exists()


def test_bench_option_sets_cudnn_benchmarking():
    cfg = json.loads(invoke(['--preset=tiny-edm', '-n', '--bench=0']).output.split('Training config:', 1)[1].rsplit('Dry run', 1)[0])
    assert cfg['cudnn_benchmark'] is False
    assert train.presets.build_config('tiny-edm').cudnn_benchmark is True


def _run_dir_worker(rank, port, results):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2')
    dist.init(torch.device('cpu'))
    # Each rank lists --outdir at its own moment and may see other folders; rank 0's choice must win.
    run_dir.numbered_run_dir = lambda outdir, name: os.path.join(outdir, f'0000{rank}-{name}')
    cfg = build_config('tiny-edm', data='datasets/c8.zip')
    results[rank] = run_dir.choose_run_dir('runs', cfg, 'x', nosubdir=False)
    dist.shutdown()


def test_numbered_run_dir_is_rank0s_on_every_rank():
    port = free_port()
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_run_dir_worker, args=(port, results), nprocs=2, join=True)
    expected = os.path.join('runs', '00000-c8-uncond-ddpmpp-edm-gpus2-batch32-fp32-x')
    assert dict(results) == {0: expected, 1: expected}
