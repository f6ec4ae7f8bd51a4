"""Compute model flops: NVlabs/edm2 count_flops.py, with its output table, over training/flops.py.

As in the EDM2 paper, one multiply-add counts as one flop; `python -m training.flops` reports
2 FLOPs per multiply-add instead. Elementwise ops are listed under 'Other' with no flops.
"""

import os

import click

import dnnlib
from torch_utils import misc
from training import flops


@click.command()
@click.argument('net', metavar='PKL|URL', type=str)
@click.option('--device', help='Where to measure GPU memory (cuda); other devices only count', metavar='STR', type=str, default='auto', show_default=True)
@click.option('--trust-pickle', 'trust', help='Load pickles that run their embedded code', is_flag=True)
@dnnlib.util.cli_errors
def cli(net, device, trust):
    """Compute model flops.

    Example:

    \b
    python count_flops.py https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-s-2147483-0.130.pkl
    """
    if os.environ.get('WORLD_SIZE', '1') != '1':
        raise click.ClickException('Distributed execution is not supported')
    click.echo(f'Loading network from {net} ...')
    module = flops.load_network(net, trust=trust)  # On the meta device: shapes only.
    device = misc.choose_device(device)
    mem = flops.peak_memory_per_sample(module.to_empty(device=device), device) if device.type == 'cuda' else None
    click.echo(flops.format_edm2_report(flops.op_breakdown(module), mem))


main = cli

if __name__ == '__main__':
    cli()
