"""Post-hoc EMA reconstruction: combine stored power function EMA snapshots into new EMA profiles
(EDM2 Sec. 3.2). The math lives in training/phema.py; this script only parses options."""

import os
import warnings

import click
import tqdm

import dnnlib

phema = dnnlib.util.LazyModule('training.phema')  # imported on first use: --help comes back without torch

#----------------------------------------------------------------------------

def _std_list(ctx, param, value):
    """Click callback: parse '0.010,0.015,...,0.250' into a list of relative stds."""
    if value is None:
        return None
    try:
        return phema.parse_std_list(value)
    except ValueError as err:
        raise click.BadParameter(f'{value!r}: {err}') from None


def _list_inputs(in_dir, in_prefix, in_std, out_prefix):
    """Input snapshots of --indir; without --inprefix, earlier outputs (--outprefix files) are left out."""
    in_pkls = phema.list_input_pickles(in_dir=in_dir, in_prefix=in_prefix, in_std=in_std)
    if in_prefix is None and any(pkl.prefix != out_prefix for pkl in in_pkls):
        in_pkls = [pkl for pkl in in_pkls if pkl.prefix != out_prefix]
    if len(in_pkls) == 0:
        filters = ''.join(f', {name}={value}' for name, value in [('--inprefix', in_prefix), ('--instd', in_std)] if value is not None)
        raise click.ClickException(f'No input snapshots found in --indir={in_dir}{filters}; '
            'expected files named like network-snapshot-0001024-0.050.pkl (<prefix>-<kimg>-<std>.pkl)')
    return in_pkls

#----------------------------------------------------------------------------

@click.command()
@click.option('--indir', 'in_dir',          help='Directory with the input snapshots (e.g. a training run)', metavar='DIR', type=str, required=True)
@click.option('--inprefix', 'in_prefix',    help='Only inputs with this filename prefix  [default: any but --outprefix]', metavar='STR', type=str, default=None)
@click.option('--instd', 'in_std',          help='Only inputs with these relative stds  [default: any]', metavar='LIST', type=str, default=None, callback=_std_list)
@click.option('--outdir', 'out_dir',        help='Where to save the reconstructed snapshots', metavar='DIR', type=str, required=True)
@click.option('--outprefix', 'out_prefix',  help='Output filename prefix', metavar='STR', type=str, default='phema', show_default=True)
@click.option('--outstd', 'out_std',        help='Relative stds to reconstruct, e.g. 0.010,0.015,...,0.250', metavar='LIST', type=str, required=True, callback=_std_list)
@click.option('--outkimg', 'out_kimg',      help='Training time to reconstruct at  [default: latest input]', metavar='KIMG', type=click.IntRange(min=1), default=None)
@click.option('--skip', 'skip_existing',    help='Skip outputs that already exist', is_flag=True)
@click.option('--batch', 'max_batch_size',  help='Outputs held in memory at once (each batch reads all inputs)', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--trust-pickle', 'trust_pickle', help='Let input pickles run their embedded code (unknown classes)', is_flag=True)
@click.option('--plot', 'plot_path',        help='Also save a PNG of stored and reconstructed EMA profiles', metavar='PNG', type=str, default=None)
@dnnlib.util.cli_errors
def cmdline(in_dir, in_prefix, in_std, out_kimg, plot_path, **opts):
    """Perform post-hoc EMA reconstruction.

    Examples:

    \b
    # Reconstruct a new EMA profile with std=0.150 from the raw snapshots of a run
    python reconstruct_phema.py --indir=raw-snapshots/edm2-img512-xs \\
        --outdir=out --outstd=0.150

    \b
    # Reconstruct 49 EMA profiles, streaming over the input snapshots 7 times
    python reconstruct_phema.py --indir=raw-snapshots/edm2-img512-xs \\
        --outdir=out --outstd=0.010,0.015,...,0.250 --batch=8

    \b
    # Reconstruct at the latest snapshot of a training run and plot the profiles
    python reconstruct_phema.py --indir=training-runs/00000-edm2-img512-xs \\
        --outdir=out --outstd=0.150 --plot=out/profiles.png
    """
    if os.environ.get('WORLD_SIZE', '1') != '1':
        raise click.ClickException('Distributed execution is not supported; run reconstruct_phema.py without torchrun')
    if plot_path is not None:
        dnnlib.util.require('matplotlib', '--plot')  # before the reconstruction, not after it
    out_nimg = phema.kimg_to_nimg(out_kimg) if out_kimg is not None else None
    in_pkls = _list_inputs(in_dir, in_prefix, in_std, opts['out_prefix'])
    warnings.formatwarning = lambda message, *_args, **_kwargs: f'Warning: {message}\n'  # e.g. inputs of two runs
    rec = phema.reconstruct_phema(in_pkls=in_pkls, out_nimg=out_nimg, **opts)
    for _step in tqdm.tqdm(rec, unit='step'):
        pass
    if plot_path is not None:
        in_nimg = [pkl.nimg for pkl in rec.in_pkls]
        in_std = [pkl.std for pkl in rec.in_pkls]
        phema.plot_ema_profiles(in_nimg, in_std, rec.out_nimg, opts['out_std'], plot_path)
        print(f'Saved profile plot to {plot_path}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cmdline()

#----------------------------------------------------------------------------
