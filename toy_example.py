"""2D toy example from the paper "Guiding a Diffusion Model with a Bad Version of Itself".

Thin command line over training/toy.py: `train` a toy model, `plot` the sample
distributions with and without guidance (the paper's Fig. 2), and `measure` how many
samples land outside the ground-truth support with no guidance, CFG and autoguidance.
`ddpm` trains a DDPM on the 2-D toy data of tqch/ddpm-torch (training/toy_ddpm.py).
"""

import os

import click

import dnnlib

# Imported on first use: --help and option errors come back without loading torch.
misc = dnnlib.util.LazyModule('torch_utils.misc')
toy = dnnlib.util.LazyModule('training.toy')
_REFERENCE_NAMES = ('GaussianMixture', 'MPLinear', 'MPSiLU', 'ToyModel', 'gt')  # reference pickles name toy_example.X


def __getattr__(name):
    if name in _REFERENCE_NAMES:
        return getattr(toy, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

#----------------------------------------------------------------------------

def _device(name):
    return misc.choose_device(name)

def _resolve(role, value, device, trust, **train_overrides):
    """Model for --net/--gnet/--ucond: the given pickle/URL, else the cached or freshly trained default."""
    if value is not None:
        return toy.load_model(value, device, trust=trust)
    return toy.default_model(role, device, log=click.echo, **train_overrides)

def _cpu_overrides(device, batch):
    # The reference batch (4096) makes the default main model take ~15 minutes on 2 CPU cores; 1024 takes ~1.5.
    if batch is not None:
        return dict(batch_size=batch)
    return dict(batch_size=toy.CPU_BATCH_SIZE) if device.type == 'cpu' else {}

#----------------------------------------------------------------------------

@click.group()
def cmdline():
    """2D toy example from the paper "Guiding a Diffusion Model with a Bad Version of Itself".

    Examples:

    \b
    # Visualize sampling distributions using autoguidance (trains and caches
    # the default models first when they are not cached).
    python toy_example.py plot

    \b
    # Same, but save the plot as PNG instead of displaying it.
    python toy_example.py plot --save=out.png

    \b
    # Same, but with the reference's pretrained models, using autoguidance / CFG.
    python toy_example.py plot \\
        --net=https://nvlabs-fi-cdn.nvidia.com/edm2/toy-example/clsA-layers04-dim64/iter4096.pkl \\
        --gnet=https://nvlabs-fi-cdn.nvidia.com/edm2/toy-example/clsA-layers04-dim32/iter0512.pkl \\
        --guidance=3
    python toy_example.py plot \\
        --net=https://nvlabs-fi-cdn.nvidia.com/edm2/toy-example/clsA-layers04-dim64/iter4096.pkl \\
        --gnet=https://nvlabs-fi-cdn.nvidia.com/edm2/toy-example/clsAB-layers04-dim32/iter0512.pkl \\
        --guidance=4

    \b
    # Retrain the main model and save snapshots.
    python toy_example.py train --outdir=toy-example/clsA-layers04-dim64 --cls=A --layers=4 --dim=64 --viz=false

    \b
    # Outside-support fraction and NLL: no guidance vs CFG vs autoguidance.
    python toy_example.py measure

    \b
    # DDPM on 2-D toy data (tqch/ddpm-torch train_toy.py) with a scatter plot.
    python toy_example.py ddpm --dataset=swissroll --epochs=100 --save=swissroll.png
    """
    if os.environ.get('WORLD_SIZE', '1') != '1':
        raise click.ClickException('Distributed execution is not supported.')

#----------------------------------------------------------------------------

@cmdline.command()
@click.option('--outdir',   help='Output directory for snapshots', metavar='DIR', type=str, default=None)
@click.option('--cls',      help='Target classes', type=click.Choice(['A', 'B', 'AB']), default='A', show_default=True)
@click.option('--layers',   help='Number of hidden layers', metavar='INT', type=click.IntRange(min=0), default=4, show_default=True)
@click.option('--dim',      help='Hidden dimension', metavar='INT',       type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--iters',    help='Training iterations', metavar='INT',    type=click.IntRange(min=1), default=4096, show_default=True)
@click.option('--batch',    help='Batch size', metavar='INT',             type=click.IntRange(min=1), default=4096, show_default=True)
@click.option('--snap',     help='Snapshot interval in iterations', metavar='INT', type=click.IntRange(min=1), default=256, show_default=True)
@click.option('--seed',     help='Random seed', metavar='INT',            type=int, default=0, show_default=True)
@click.option('--viz',      help='Visualize progress?  [default: if a display exists]', metavar='BOOL', type=bool, default=None)
@click.option('--device',   help='Device: auto|cpu|cuda|mps', metavar='STR', type=str, default='auto', show_default=True)
@dnnlib.util.cli_errors
def train(outdir, cls, layers, dim, iters, batch, snap, seed, viz, device):
    """Train a 2D toy model with the given parameters."""
    device = _device(device)
    viz = toy.has_display() if viz is None else viz
    if outdir is not None:
        click.echo(f'Will save snapshots to {outdir}')
    pkl_pattern = os.path.join(outdir, 'iter%04d.pkl') if outdir is not None else None
    click.echo(f'Training on {device}...')
    res = toy.do_train(classes=cls, num_layers=layers, hidden_dim=dim, total_iter=iters, batch_size=batch, seed=seed,
        pkl_pattern=pkl_pattern, pkl_iter=snap, viz_iter=(32 if viz else None), device=device)
    click.echo(f'Final loss {res.loss[-min(len(res.loss), 32):].mean():.4f} (mean of the last iterations).')
    click.echo('Done.')

#----------------------------------------------------------------------------

_net_option   = click.option('--net',  help='Main model  [default: cached or trained clsA-layers04-dim64]', metavar='PKL|URL', type=str, default=None)
_gnet_option  = click.option('--gnet', help='Guiding model  [default: autoguidance, clsA-layers04-dim32]', metavar='PKL|URL', type=str, default=None)
_device_option = click.option('--device', help='Device: auto|cpu|cuda|mps', metavar='STR', type=str, default='auto', show_default=True)
_trust_option = click.option('--trust-pickle', help='Allow pickles to run their embedded code', is_flag=True)
_batch_option = click.option('--train-batch', 'batch', help='Batch size when training default models  [default: 4096, CPU 1024]',
    metavar='INT', type=click.IntRange(min=1), default=None)

@cmdline.command()
@_net_option
@_gnet_option
@click.option('--guidance', help='Guidance weight', metavar='FLOAT', type=float, default=3, show_default=True)
@click.option('--save',     help='Save figure, do not display', metavar='PNG|PDF', type=str, default=None)
@click.option('--samples',  help='Samples in the wide panels (zoomed: a quarter)', metavar='INT', type=click.IntRange(min=16), default=1<<14, show_default=True)
@click.option('--grid',     help='Density grid resolution', metavar='INT', type=click.IntRange(min=8), default=400, show_default=True)
@_device_option
@_trust_option
@_batch_option
@dnnlib.util.cli_errors
def plot(net, gnet, guidance, save, samples, grid, device, trust_pickle, batch):
    """Visualize sampling distributions with and without guidance."""
    device = _device(device)
    if save is None and not toy.has_display():
        raise click.ClickException('no display to show the figure on; pass --save=out.png')
    click.echo('Loading models...')
    net = _resolve('net', net, device, trust_pickle, **_cpu_overrides(device, batch))
    gnet = _resolve('gnet', gnet, device, trust_pickle, **_cpu_overrides(device, batch))
    click.echo('Drawing plots...')
    toy.plot_figure(net, gnet, guidance=guidance, save=save, num_samples=samples, grid_resolution=grid, device=device)
    click.echo(f'Saved to {save}' if save is not None else 'Displayed.')
    click.echo('Done.')

#----------------------------------------------------------------------------

@cmdline.command()
@_net_option
@_gnet_option
@click.option('--ucond',        help='Unconditional model for CFG  [default: clsAB-layers04-dim32]', metavar='PKL|URL', type=str, default=None)
@click.option('--guidance',     help='Autoguidance weight', metavar='FLOAT', type=float, default=3, show_default=True)
@click.option('--cfg-guidance', help='Classifier-free guidance weight', metavar='FLOAT', type=float, default=4, show_default=True)
@click.option('--samples',      help='Number of samples per method', metavar='INT', type=click.IntRange(min=1), default=1<<14, show_default=True)
@click.option('--seed',         help='Seed of the initial noise', metavar='INT', type=int, default=1, show_default=True)
@_device_option
@_trust_option
@_batch_option
@dnnlib.util.cli_errors
def measure(net, gnet, ucond, guidance, cfg_guidance, samples, seed, device, trust_pickle, batch):
    """Outside-support fraction and NLL under the ground truth for each guidance method."""
    device = _device(device)
    overrides = _cpu_overrides(device, batch)
    net, gnet, ucond = (_resolve(role, value, device, trust_pickle, **overrides) for role, value in
        [('net', net), ('gnet', gnet), ('ucond', ucond)])
    rows = toy.measure(net, gnet, ucond, guidance=guidance, cfg_guidance=cfg_guidance, num_samples=samples, seed=seed,
        device=device)
    click.echo(f'{samples} samples each. Outside = GT log p_A(x; 0) more than 2.12^2 below its maximum (the figure outline).')
    click.echo(f'{"method":<26} {"w":>5} {"outside %":>10} {"NLL mean":>10} {"NLL median":>11}')
    for row in rows:
        click.echo(f'{row.method:<26} {row.guidance:>5g} {100 * row.outside:>10.2f} {row.nll_mean:>10.3f} {row.nll_median:>11.3f}')

#----------------------------------------------------------------------------

def _toy_stream(dataset, size, batch_size, seed, resample):
    """train_toy.py's DataStreamer: size points served in batches (training/toy_data.py)."""
    from training.toy_data import ToyDataStream
    if size % batch_size != 0:
        raise click.BadParameter(f'--size={size} is not a multiple of --batch-size={batch_size}', param_hint='--size')
    return ToyDataStream(dataset, batch_size=batch_size, num_batches=size // batch_size, seed=seed, resample=resample)

@cmdline.command()
@click.option('--dataset',         help='2-D toy dataset', type=click.Choice(['gaussian8', 'gaussian25', 'swissroll']), default='gaussian8', show_default=True)
@click.option('--size',            help='Points per epoch', metavar='INT', type=click.IntRange(min=1), default=100_000, show_default=True)
@click.option('--batch-size',      help='Batch size', metavar='INT', type=click.IntRange(min=1), default=1000, show_default=True)
@click.option('--resample',        help='Fresh points every epoch', is_flag=True)
@click.option('--epochs',          help='Training epochs', metavar='INT', type=click.IntRange(min=1), default=100, show_default=True)
@click.option('--lr',              help='Adam learning rate', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option('--timesteps',       help='Diffusion steps T', metavar='INT', type=click.IntRange(min=1), default=100, show_default=True)
@click.option('--beta-schedule',   help='Beta schedule', type=click.Choice(['quad', 'linear', 'warmup10', 'warmup50', 'jsd']), default='linear', show_default=True)
@click.option('--beta-start',      help='First beta', metavar='FLOAT', type=click.FloatRange(min=0, max=1, min_open=True), default=1e-3, show_default=True)
@click.option('--beta-end',        help='Last beta', metavar='FLOAT', type=click.FloatRange(min=0, max=1, min_open=True), default=0.2, show_default=True)
@click.option('--model-mean-type', help='Network output', type=click.Choice(['mean', 'x_0', 'eps']), default='eps', show_default=True)
@click.option('--model-var-type',  help='Model variance', type=click.Choice(['learned', 'fixed-small', 'fixed-large']), default='fixed-large', show_default=True)
@click.option('--loss-type',       help='Loss', type=click.Choice(['kl', 'mse']), default='mse', show_default=True)
@click.option('--mid-features',    help='Decoder width', metavar='INT', type=click.IntRange(min=2), default=128, show_default=True)
@click.option('--num-temporal-layers', help='Decoder layer repeats', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--samples',         help='Samples for the plot and the histogram KL', metavar='INT', type=click.IntRange(min=1), default=10_000, show_default=True)
@click.option('--seed',            help='Random seed (data, model, samples)', metavar='INT', type=click.IntRange(min=0), default=1234, show_default=True)
@click.option('--save',            help='Save the data/sample scatter plot here', metavar='PNG|PDF', type=str, default=None)
@_device_option
@dnnlib.util.cli_errors
def ddpm(dataset, size, batch_size, resample, epochs, lr, timesteps, beta_schedule, beta_start, beta_end, model_mean_type,
         model_var_type, loss_type, mid_features, num_temporal_layers, samples, seed, save, device):
    """Train a DDPM on 2-D toy data and plot its samples (tqch/ddpm-torch train_toy.py)."""
    from training import toy_ddpm
    device = _device(device)
    diffusion = toy_ddpm.toy_diffusion(timesteps, beta_schedule, beta_start, beta_end, model_mean_type, model_var_type,
                                       loss_type)
    stream = _toy_stream(dataset, size, batch_size, seed, resample)
    click.echo(f'Training a DDPM on {dataset} ({size} points, {epochs} epochs) on {device}...')
    res = toy_ddpm.train_toy_ddpm(stream, diffusion, epochs=epochs, lr=lr, mid_features=mid_features,
                                  num_layers=num_temporal_layers, seed=seed, device=device, log=click.echo)
    points = toy_ddpm.sample_toy_ddpm(res.model, diffusion, samples, seed=seed, device=device).cpu().numpy()
    data = next(iter(_toy_stream(dataset, samples, samples, seed + 1, False))).numpy()
    click.echo(f'Histogram KL(data || samples): {toy_ddpm.histogram_kl(points, data):.4f}')
    if save is not None:
        toy_ddpm.plot_toy_ddpm(data, points, save, title=f'{dataset}, T={timesteps}, {model_mean_type}/{model_var_type}/{loss_type}')
        click.echo(f'Saved to {save}')
    click.echo('Done.')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cmdline()
