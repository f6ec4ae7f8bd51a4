"""Tests of training/flops.py: parameter and FLOP counts against the papers' figures."""

import torch
from click.testing import CliRunner

from training import flops, networks


def test_reference_figures_ddpmpp_cifar10():
    params, count = flops.count_flops(flops.build_preset('ddpmpp-cifar10'))
    assert round(params / 1e6, 1) == 55.7
    assert round(count / 1e9, 1) == 42.4


def test_reference_figures_edm2_img512_s():
    params, count = flops.count_flops(flops.build_preset('edm2-img512-s'))
    assert round(params / 1e6, 1) == 280.2
    assert round(count / 1e9, 1) == 201.6


def test_count_flops_scales_with_batch_and_runs_on_real_tensors():
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=2, model_type='DhariwalUNet',
        model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[]).train()
    params, one = flops.count_flops(net)
    _, four = flops.count_flops(net, batch=4)
    assert params == sum(p.numel() for p in net.parameters()) and one > 0 and four == 4 * one
    assert net.training  # count_flops restores the mode
    _, backbone = flops.count_flops(net.model)
    assert backbone == one


def test_cli_prints_counts_and_rejects_unknown_names(tmp_path):
    runner = CliRunner()
    result = runner.invoke(flops.main, ['ddpmpp-cifar10'])
    assert result.exit_code == 0, result.output
    assert 'params:     55.74 M' in result.output and 'GFLOP:      42.38' in result.output
    result = runner.invoke(flops.main, ['no-such-net'])
    assert result.exit_code == 1 and 'edm2-img512-s' in result.output
