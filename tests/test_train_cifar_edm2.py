"""train.py --preset=cifar-edm2-*: the reference's hyper-parameters and schedule in the shared training loop,
exact resume, and checkpoints in the reference layout (FutureXiang/edm2 train.py)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.test_probe import write_split
from tests.test_train import assert_states_equal, load_state, train
from torch_utils import persistence
from training import networks_cifar_edm2
from training import recipe_cifar_edm2 as rc
from training import training_loop as tl
from training.presets import build_config
from training.recipes import make_recipe

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def test_presets_hold_the_reference_configs():
    for name, ref in rc.REFERENCE_CONFIGS.items():
        cfg = build_config(f'cifar-edm2-{name}')
        steps = 521 if ref.dataset == 'tinyimagenet' else 98
        assert (cfg.recipe, cfg.edm2_config, cfg.cond, cfg.batch_size, cfg.lr) == ('cifar-edm2', ref.config, False, ref.batch_size, ref.lrate)
        assert cfg.total_nimg == ref.n_epoch * steps * ref.batch_size
        assert (cfg.lr_warmup_epochs, cfg.lr_tref_epochs, cfg.ema_beta, cfg.random_flip) == \
            (200, ref.tref_epoch or ref.n_epoch, 0.9993, ref.dataset != 'tinyimagenet')
        assert (cfg.P_mean, cfg.P_std, cfg.adam_betas, cfg.xflip, cfg.augment) == (-1.2, 1.2, (0.9, 0.999), False, 0.0)
        # The network the recipe builds is the reference's YAML section.
        kwargs = tl.network_kwargs(cfg)
        expected = ref.network_kwargs()
        assert {k: kwargs[k] for k in ('config', 'n_channels', 'ch_mults', 'is_attn', 'dropout', 'n_blocks')} == \
            {k: expected[k] for k in ('config', 'n_channels', 'ch_mults', 'is_attn', 'dropout', 'n_blocks')}


def test_learning_rate_per_step_follows_the_epoch_schedule():
    recipe = make_recipe(build_config('cifar-edm2-cifar10-e'))
    lr = lambda step: recipe.learning_rate(step * 512)  # noqa: E731
    assert lr(0) == pytest.approx(2e-2 / 200) and lr(97) == lr(0)       # 98 steps in epoch 0
    assert lr(98) == pytest.approx(2 * 2e-2 / 200)                    # epoch 1
    assert lr(98 * 1600) == pytest.approx(2e-2 / 2)                   # epoch 1600: sqrt(1600 / 400) = 2
    recipe_c = make_recipe(build_config('cifar-edm2-cifar10-c'))
    assert recipe_c.learning_rate(98 * 999 * 512) == 4e-4             # C: constant to the end


def test_bad_options_are_one_line_errors(tmp_path):
    import train as train_script
    cases = [(['--preset=cifar-edm2-cifar10-e', '--cond=1'], 'unconditional'),
             (['--preset=cifar-edm2-cifar10-e', '--xflip=1'], 'flips each image at random'),
             (['--preset=cifar-edm2-cifar10-c', '--cbase=48'], 'multiple of 32'),
             (['--preset=cifar-edm2-cifar10-e', '--arch=ddpmpp'], '--arch=ddpmpp')]
    for args, message in cases:
        result = CliRunner().invoke(train_script.main, [*args, f'--data={tmp_path}', f'--outdir={tmp_path / "run"}', '--dry-run'])
        assert result.exit_code != 0 and message in result.output, result.output
    with pytest.raises(ValueError, match='need a cifar-edm2-\\* preset'):
        build_config('tiny-edm', ema_beta=0.99)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp('cifar_edm2') / 'train', 32, with_labels=False)


def test_resume_is_exact(data, tmp_path):
    common = dict(data=data, status_nimg=None, snapshot_nimg=None, checkpoint_nimg=None, batch_size=16, epoch_images=32)
    train(tmp_path / 'full', 'tiny-cifar-edm2', total_nimg=128, **common)
    train(tmp_path / 'split', 'tiny-cifar-edm2', total_nimg=64, **common)
    train(tmp_path / 'split', 'tiny-cifar-edm2', total_nimg=128, **common)
    full, split = load_state(tmp_path / 'full'), load_state(tmp_path / 'split')
    assert int(full['ema']['step']) == 8 and bool(full['ema']['initted'])
    assert_states_equal(full, split)


def test_snapshots_in_both_formats(data, tmp_path):
    result = train(tmp_path / 'run', 'tiny-cifar-edm2', data=data, total_nimg=128, batch_size=16, epoch_images=32,
                   snapshot_nimg=128, status_nimg=64)
    assert result.cur_nimg == 128
    tiny = dict(img_resolution=8, n_channels=32, ch_mults=[1, 1], is_attn=[False, True], n_blocks=2, dropout=0.0)
    # 8 steps of 2 per epoch: epochs 0-3 done, the reference names the checkpoint by the last one.
    ref = networks_cifar_edm2.load_reference_checkpoint(tmp_path / 'run' / 'ckpts' / 'model_3.pth', 'cifar10-e', **tiny)
    snapshot = persistence.load_pickle(tmp_path / 'run' / 'network-snapshot-000000.pkl')
    for (key, a), b in zip(ref.state_dict().items(), snapshot['ema'].state_dict().values()):
        assert torch.equal(a, b), key
    online = networks_cifar_edm2.load_reference_checkpoint(tmp_path / 'run' / 'ckpts' / 'model_3.pth', 'cifar10-e',
                                                           weights='model', **tiny)
    assert any(not torch.equal(a, b) for a, b in zip(online.parameters(), ref.parameters()))
    stats = [json.loads(line) for line in (tmp_path / 'run' / 'stats.jsonl').read_text().splitlines()]
    lrs = [s['Loss/learning_rate']['mean'] for s in stats]
    # tiny preset: warm-up 2 epochs, then 1e-2 / sqrt(max(epoch / 4, 1)); the two ticks cover epochs 0-1 and 2-3.
    assert lrs == pytest.approx([np.mean([5e-3, 5e-3, 1e-2, 1e-2]), 1e-2], rel=1e-6)
