"""One training loop for every recipe: setup -> step -> maintenance.

What the recipes decide differently (encoder, EMA, learning-rate schedule, gradient
cleaning, snapshot names and contents, stats.jsonl format) is asked of a recipe object
(training/recipes.py): EDM (Karras et al. 2022) and EDM2 (Karras et al. 2024).

Every step reseeds the RNG from (seed, rank, cur_nimg) and the data sampler starts
at cur_nimg, so rerunning a command continues exactly where the last training state
stopped. Rank 0 writes every file, atomically.
"""

import json
import logging
import os
import re
import sys
import time

import psutil
import torch

import dataclasses

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence
from torch_utils import training_stats
from training.loss import EDM2Loss  # noqa: F401  (reference pickles name training.training_loop.EDM2Loss)
from training.presets import TrainConfig, check_batch, to_json
from training.recipes import learning_rate_schedule  # noqa: F401  (public name of this module)
from training.recipes import make_recipe
from training.recipes import step_seed  # noqa: F401  (public name of this module)
from training.resume_options import check_resume_options
from training import speed

STATE_FORMAT_VERSION = 1
_ASYNC_PENDING = 'after first step'  # ctx.async_compile until the --compile-async child starts (then the AsyncCompile)
logger = logging.getLogger('edm.training')


class NonFiniteLossError(dnnlib.util.UserError):
    """The training loss became NaN or Inf."""


class DataLoaderWorkerError(dnnlib.util.UserError):
    """A DataLoader worker process died (killed, out of memory)."""

#----------------------------------------------------------------------------
# Reference-format keyword dicts (written to training_options.json).

_SONG_UNET = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
    'adm':    dict(model_type='DhariwalUNet'),
}
_PRECOND_CLASSES = {'vp': 'VPPrecond', 've': 'VEPrecond', 'edm': 'EDMPrecond'}
_LOSS_CLASSES = {'vp': 'VPLoss', 've': 'VELoss', 'edm': 'EDMLoss', 'edm2': 'EDM2Loss', 'cifar-edm2': 'CifarEDM2Loss'}


def network_kwargs(cfg: TrainConfig) -> dnnlib.EasyDict:
    """Network constructor kwargs as EDM train.py / EDM2 train_edm2.py build them."""
    if cfg.arch == 'cifar-edm2':  # FutureXiang/edm2's own U-Nets, named as its YAML files
        from training.recipe_cifar_edm2 import network_kwargs as cifar_network_kwargs
        return cifar_network_kwargs(cfg)
    if cfg.arch == 'edm2':
        kwargs = dnnlib.EasyDict(class_name='training.networks_edm2.Precond', model_channels=cfg.model_channels,
                                 dropout=cfg.dropout)
        if cfg.edm2_config != 'G':  # the published network records no config argument
            kwargs.config = cfg.edm2_config
    else:
        kwargs = dnnlib.EasyDict(class_name=f'training.networks.{_PRECOND_CLASSES[cfg.precond]}', **_SONG_UNET[cfg.arch])
        kwargs.update(model_channels=cfg.model_channels)
    kwargs.channel_mult = list(cfg.channel_mult)
    if cfg.num_blocks is not None:
        kwargs.num_blocks = cfg.num_blocks
    if cfg.attn_resolutions is not None:
        kwargs.attn_resolutions = list(cfg.attn_resolutions)
    if cfg.arch != 'edm2':
        if cfg.augment > 0:
            kwargs.augment_dim = 9
        kwargs.dropout = cfg.dropout
    if cfg.precond in ('edm', 'edm2') and cfg.sigma_data != 0.5:
        kwargs.sigma_data = cfg.sigma_data
    kwargs.use_fp16 = cfg.fp16
    return kwargs


def loss_kwargs(cfg: TrainConfig) -> dnnlib.EasyDict:
    """Loss constructor kwargs; STF wraps the loss of the chosen preconditioning."""
    kwargs = dnnlib.EasyDict()
    if cfg.precond in ('edm', 'edm2', 'cifar-edm2'):
        kwargs.update({k: getattr(cfg, k) for k in ('P_mean', 'P_std') if getattr(cfg, k) is not None})
        if cfg.sigma_data != 0.5:
            kwargs.sigma_data = cfg.sigma_data
    if cfg.random_flip is not None:
        kwargs.flip = cfg.random_flip
    if cfg.stf:
        return dnnlib.EasyDict(class_name='training.loss.STFLoss', base=cfg.precond, rbatch=cfg.rbatch, **kwargs)
    return dnnlib.EasyDict(class_name=f'training.loss.{_LOSS_CLASSES[cfg.precond]}', **kwargs)


def augment_kwargs(cfg: TrainConfig) -> dnnlib.EasyDict | None:
    """The EDM augmentation setup (train.py): p = --augment, 9-dim augment labels."""
    if cfg.augment <= 0:
        return None
    return dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=cfg.augment, xflip=1e8, yflip=1, scale=1,
                           rotate_frac=1, aniso=1, translate_frac=1)


def optimizer_kwargs(cfg: TrainConfig) -> dnnlib.EasyDict:
    """Adam as in the references (EDM: betas 0.9/0.999, EDM2: 0.9/0.99)."""
    return dnnlib.EasyDict(class_name='torch.optim.Adam', lr=cfg.lr, betas=list(cfg.adam_betas), eps=1e-8)


def dataset_kwargs(cfg: TrainConfig) -> dnnlib.EasyDict:
    """ImageFolderDataset kwargs (resolution and max_size are filled in once the data is opened)."""
    return dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=cfg.data, use_labels=cfg.cond,
                           xflip=cfg.xflip, cache=cfg.cache)

#----------------------------------------------------------------------------
# Setup.


def open_dataset(cfg: TrainConfig):
    """Open and check the dataset; (dataset, reference dataset_kwargs). ValueError names the flag."""
    if not cfg.data:
        raise ValueError('--data is required: pass a dataset folder or .zip made by dataset_tool.py')
    kwargs = dataset_kwargs(cfg)
    try:
        dataset = dnnlib.util.construct_class_by_name(**kwargs)
    except FileNotFoundError as err:
        raise FileNotFoundError(f'--data={cfg.data}: {err}') from None
    except (OSError, ValueError) as err:
        raise ValueError(f'--data={cfg.data}: {err}') from None
    if cfg.resolution is not None and dataset.resolution != cfg.resolution:
        raise ValueError(f'--data={cfg.data} holds {dataset.resolution}x{dataset.resolution} images, but '
                         f'--preset={cfg.preset} trains at {cfg.resolution}x{cfg.resolution}; '
                         f'convert the data with dataset_tool.py --resolution or pick a matching preset')
    if cfg.cond and not dataset.has_labels:
        raise ValueError(f'--cond=True, but --data={cfg.data} has no labels in dataset.json; use --cond=False')
    kwargs.resolution = dataset.resolution
    kwargs.max_size = len(dataset)
    return dataset, kwargs


def resolve_epochs(cfg: TrainConfig, dataset) -> TrainConfig:
    """--epochs -> total_nimg, --chkpt-intv -> snapshot_nimg and checkpoint_nimg: full batches per pass over the
    un-flipped images (ddpm-torch drops the last one)."""
    if cfg.epochs is None and cfg.chkpt_intv is None:
        return cfg
    images = len(dataset) // (2 if cfg.xflip else 1)
    if images < cfg.batch_size:
        raise ValueError(f'--data={cfg.data} holds {images} images, fewer than one batch (--batch={cfg.batch_size})')
    changes = {}
    if cfg.epochs is not None:
        changes['total_nimg'] = int(round(cfg.epochs * (images // cfg.batch_size))) * cfg.batch_size
    if cfg.chkpt_intv is not None:
        interval = max(int(round(cfg.chkpt_intv * (images // cfg.batch_size))), 1) * cfg.batch_size
        changes.update(snapshot_nimg=interval, checkpoint_nimg=interval)
    return dataclasses.replace(cfg, **changes)


def _init_runtime(cfg: TrainConfig, device: torch.device, recipe) -> None:
    """Seeds, TF32 policy (off, as in the references) and determinism."""
    recipe.seed_rng(dist.get_rank())
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and not cfg.deterministic
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False


def _init_logging(run_dir: str) -> None:
    """log.txt (append) and stdout on rank 0; silence on other ranks."""
    logger.setLevel(logging.INFO)
    logger.propagate = False
    _close_logging()
    if dist.get_rank() == 0:
        formatter = logging.Formatter('%(message)s')
        with dnnlib.util.writing(os.path.join(run_dir, 'log.txt')):
            log_file = _LogFile(os.path.join(run_dir, 'log.txt'), mode='a')
        for handler in (log_file, logging.StreamHandler(sys.stdout)):
            handler.setFormatter(formatter)
            logger.addHandler(handler)


class _LogFile(logging.FileHandler):
    """log.txt; when a write fails (disk full) it says so in one line, not a traceback per message."""

    def handleError(self, record) -> None:
        if not getattr(self, '_failed', False):
            err = sys.exc_info()[1]
            mapped = dnnlib.util.write_error(err, self.baseFilename) if err is not None else None
            print(f'Warning: {mapped or err}; log.txt misses the lines from here on', file=sys.stderr, flush=True)
        self._failed = True


def _close_logging() -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def _write_json(path: str, data) -> None:
    with dnnlib.util.atomic_write(path, 'wt') as f:
        json.dump(data, f, indent=2)


_RUN_FILES = r'training-state-\d+\.pt|network-snapshot-[\w.-]+\.(?:pkl|pt)|[\w-]+\.json|fid-ref\.npz'  # what atomic writes put in run_dir


def setup(cfg: TrainConfig, run_dir: str, device: torch.device) -> dnnlib.EasyDict:
    """Everything the loop needs, in an EasyDict: data, networks, optimizer, EMA, restored state."""
    cfg = speed.resolve_switches(cfg, device)
    ctx = dnnlib.EasyDict(cfg=cfg, run_dir=run_dir, device=device, rank=dist.get_rank(), world=dist.get_world_size())
    ctx.recipe = make_recipe(cfg)
    ctx.batch_gpu, ctx.rounds = check_batch(cfg, ctx.world)
    changes = check_resume_options(find_latest_state(run_dir) or cfg.resume, to_json(cfg), cfg.allow_option_change)
    _init_runtime(cfg, device, ctx.recipe)
    ctx.dataset, ctx.dataset_kwargs = open_dataset(cfg)
    if cfg.epochs is not None or cfg.chkpt_intv is not None:  # epochs count images once the dataset size is known
        ctx.cfg = cfg = resolve_epochs(cfg, ctx.dataset)
        ctx.recipe = make_recipe(cfg)
    ctx.encoder, ctx.encoder_kwargs = ctx.recipe.make_encoder(ctx.dataset)
    stale = []
    if ctx.rank == 0:
        with dnnlib.util.writing(run_dir):
            os.makedirs(run_dir, exist_ok=True)
        stale = dnnlib.util.remove_stale_temp_files(run_dir, targets=_RUN_FILES)  # left by writes that a kill interrupted
    dist.barrier()
    _init_logging(run_dir)
    if stale:
        logger.info(f'Removed {len(stale)} temporary file(s) of interrupted writes: {_first([os.path.basename(p) for p in stale])}')
    if changes:
        logger.warning(f'Resuming with changed options (--allow-option-change): {"; ".join(changes)}')
    _build_modules(ctx)
    ctx.update(cur_nimg=0, total_elapsed_time=0.0, bad_loss=torch.zeros([], dtype=torch.bool, device=device))
    ctx.state_path = _restore(ctx)
    ctx.options = dnnlib.EasyDict(
        dataset_kwargs=ctx.dataset_kwargs, encoder_kwargs=ctx.encoder_kwargs, network_kwargs=ctx.network_kwargs,
        loss_kwargs=ctx.recipe.options_kwargs(), optimizer_kwargs=optimizer_kwargs(cfg), augment_kwargs=augment_kwargs(cfg),
        seed=cfg.seed, batch_size=cfg.batch_size, batch_gpu=cfg.batch_gpu, total_nimg=cfg.total_nimg)
    if ctx.rank == 0:
        _write_json(os.path.join(run_dir, 'training_options.json'), ctx.options)
        _write_json(os.path.join(run_dir, 'run_config.json'), to_json(cfg))
    _make_iterators(ctx)
    if not cfg.first_step:
        ctx.recipe.prepare(ctx)  # e.g. DDPM --eval: a missing detector fails now, not at the first snapshot
    return ctx


def _build_modules(ctx) -> None:
    """Network (+ compile, DDP), loss, augmentation, optimizer and EMA."""
    cfg, device = ctx.cfg, ctx.device
    image, _label = ctx.dataset[0]
    image = torch.as_tensor(image).to(device).unsqueeze(0)
    if ctx.encoder is not None:
        image = ctx.encoder.encode_latents(image)
    interface = dict(img_resolution=image.shape[-1], img_channels=image.shape[1], label_dim=ctx.dataset.label_dim)
    ctx.network_kwargs = ctx.recipe.network_kwargs(interface)
    ctx.network_interface = ctx.recipe.network_interface(interface)
    net = build_network(ctx.network_kwargs, ctx.network_interface, cfg, device)
    if ctx.rank == 0:
        with torch.no_grad():
            inputs = ctx.recipe.summary_inputs(ctx.batch_gpu, image.shape[1:], ctx.dataset.label_dim, device)
            misc.print_module_summary(net, inputs, max_nesting=2)
    ctx.net = net
    ctx.loss_fn = dnnlib.util.construct_class_by_name(**ctx.recipe.loss_kwargs())
    aug = augment_kwargs(cfg)
    ctx.augment_pipe = dnnlib.util.construct_class_by_name(**aug) if aug is not None else None
    opt_kwargs = optimizer_kwargs(cfg)
    if device.type == 'cuda':
        opt_kwargs.fused = True
    else:
        opt_kwargs.foreach = True  # one multi-tensor update instead of a Python loop per parameter
    ctx.optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **opt_kwargs)
    ctx.ema = ctx.recipe.make_ema(net)
    # Compiled last: the EMA copies above must not copy compiled blocks.
    ctx.async_compile = _ASYNC_PENDING if _compiles_async(ctx) else None
    compile_now = cfg.compile and ctx.async_compile is None
    train_net = compile_for_training(net, device) if compile_now else net
    ctx.ddp = train_net
    if ctx.world > 1:
        ctx.ddp = torch.nn.parallel.DistributedDataParallel(train_net, device_ids=[device] if device.type == 'cuda' else None)


def build_network(network_kwargs: dict, network_interface: dict, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The run's network, in training mode on `device` (also built by the --compile-async child)."""
    net = dnnlib.util.construct_class_by_name(**network_kwargs, **network_interface)
    net.train().requires_grad_(True).to(device)
    if cfg.channels_last:  # data stays NCHW, so randn_like draws the same noise as the reference
        net.to(memory_format=torch.channels_last)
    return net


def compile_for_training(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """What --compile calls instead of `net` (the --compile-async child compiles the same)."""
    return speed.compile_network(net, options=speed.train_compile_options(net, device))


def _compiles_async(ctx) -> bool:
    """--compile-async applies: one process, and a step the child can rebuild (STF's references it cannot)."""
    cfg = ctx.cfg
    if cfg.compile_async and not cfg.compile:
        logger.warning('--compile-async does nothing without --compile or --fast (or where the device cannot compile)')
    if not (cfg.compile and cfg.compile_async) or cfg.first_step:
        return False
    if ctx.world > 1 or cfg.stf:
        logger.warning('--compile-async runs with one process and without --stf; compiling before the first step')
        return False
    return True


def _advance_async_compile(ctx) -> None:
    """After a step: start the --compile-async child, or switch to the compiled network once it is done."""
    from training import async_compile
    if ctx.async_compile == _ASYNC_PENDING:
        no_room = async_compile.room_for_child(ctx.device)
        if no_room is not None:
            logger.warning(f'--compile-async: {no_room}; compiling in this process instead')
            return _switch_to_compiled(ctx)
        ctx.async_compile = async_compile.AsyncCompile(async_compile.make_job(ctx, *ctx.pop('example_batch')))
        logger.info(f'Compiling the network in a background process while training eagerly '
                    f'(its log: {ctx.async_compile.log_path})')
        return None
    failure = ctx.async_compile.poll()
    if failure is None:
        return None
    if failure:
        logger.warning(f'--compile-async: {failure}; compiling in this process instead')
    else:
        logger.info(f'Background compile done after {time.time() - ctx.async_compile.start_time:.0f} s; '
                    f'switching to the compiled network')
    return _switch_to_compiled(ctx)


def _switch_to_compiled(ctx) -> None:
    ctx.ddp = compile_for_training(ctx.net, ctx.device)
    ctx.async_compile = None


def find_latest_state(run_dir: str) -> str | None:
    """Newest training-state-*.pt in run_dir (by the number in its name), or None."""
    if not os.path.isdir(run_dir):
        return None
    found = [(int(m.group(1)), f) for f in os.listdir(run_dir) if (m := re.fullmatch(r'training-state-(\d+)\.pt', f))]
    return os.path.join(run_dir, max(found)[1]) if found else None


def _restore(ctx) -> str | None:
    """Resume from the newest state in the run dir, else --resume, else --transfer weights."""
    cfg = ctx.cfg
    path = find_latest_state(ctx.run_dir) or cfg.resume
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'--resume={path}: no such training state')
        logger.info(f'Resuming from "{path}"...')
        state = read_training_state(path, trust=cfg.trust_pickle)
        load_training_state(ctx, state, path)
        return path
    if cfg.transfer:
        logger.info(f'Loading network weights from "{cfg.transfer}"...')
        what = ctx.recipe.load_transfer(ctx)
        logger.info(f'Initialised the network from the {what} weights of "{cfg.transfer}"')
        ctx.ema.reset()
    return None


def read_training_state(path: str, trust: bool = False) -> dict:
    """A training-state-*.pt as a dict, read without running code from it unless `trust` (--trust-pickle)."""
    state = persistence.load_torch_file(path, trust=trust, what='training state')
    if not isinstance(state, dict) or state.get('format_version') != STATE_FORMAT_VERSION:
        version = state.get('format_version') if isinstance(state, dict) else None
        raise ValueError(f'{path}: not a training state of this version (format_version {version!r}, expected '
                         f'{STATE_FORMAT_VERSION}); resume it with the code that wrote it, or start a new --outdir')
    missing = [key for key in ('net', 'ema', 'optimizer', 'cur_nimg') if key not in state]
    if missing:
        raise ValueError(f'{path}: training state lacks {", ".join(missing)}; the file is incomplete')
    return state


def _first(items: list, count: int = 3) -> str:
    """'a, b, c, ... (N)' with at most `count` items: keeps mismatch messages short."""
    shown = ', '.join(str(x) for x in items[:count])
    return shown + (f', ... ({len(items)} in all)' if len(items) > count else '')


_NETWORK_FIELDS = ('arch', 'precond', 'edm2_config', 'model_channels', 'channel_mult', 'num_blocks',
                   'attn_resolutions', 'resolution', 'cond', 'fp16', 'ema_stds')


def state_mismatch(ctx, state: dict) -> str | None:
    """What differs between the stored network/EMA and the ones this run builds; None when they fit."""
    ours = ctx.net.state_dict()
    theirs = state['net'] if isinstance(state['net'], dict) else {}
    missing = [key for key in ours if key not in theirs]
    unexpected = [key for key in theirs if key not in ours]
    shapes = [f'{key} {list(theirs[key].shape)} in the file, {list(ours[key].shape)} here' for key in ours
              if key in theirs and isinstance(theirs[key], torch.Tensor) and theirs[key].shape != ours[key].shape]
    parts = [f'{len(missing)} tensors missing ({_first(missing)})'] if missing else []
    parts += [f'{len(unexpected)} unexpected ({_first(unexpected)})'] if unexpected else []
    parts += [f'{len(shapes)} of other shape ({_first(shapes, 2)})'] if shapes else []
    stored_emas = state['ema'].get('emas') if isinstance(state['ema'], dict) else None
    our_emas = len(getattr(ctx.ema, 'emas', []))
    if stored_emas is not None and our_emas and len(stored_emas) != our_emas:
        parts.append(f'{len(stored_emas)} EMA profiles in the file, {our_emas} here')
    if not parts:
        return None
    stored, run = state.get('config') or {}, to_json(ctx.cfg)
    differing = [f'{key}={stored[key]!r} in the file, {run[key]!r} here' for key in _NETWORK_FIELDS
                 if key in stored and key in run and stored[key] != run[key]]
    expected = ', '.join(f'{key}={run[key]!r}' for key in _NETWORK_FIELDS[:5] if key in run)
    return ('; '.join(parts) + '. ' + (f'Options: {_first(differing, 3)}' if differing else f'This run expects {expected}'))


def load_training_state(ctx, state: dict, path: str) -> None:
    """Copy a training state into the run's network, EMA and optimizer; one clear line if it does not fit."""
    mismatch = state_mismatch(ctx, state)
    if mismatch is not None:
        message = f'{path}: training state of another network than this run builds: {mismatch}'
        raise ValueError((message if len(message) <= 900 else message[:897] + '...') +
                         '. Rerun with the options it was trained with, or use another --outdir')
    try:
        ctx.net.load_state_dict(state['net'])
        ctx.ema.load_state_dict(state['ema'])
        ctx.optimizer.load_state_dict(state['optimizer'])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f'{path}: training state does not fit this run ({type(err).__name__}: '
                         f'{dnnlib.util.text_line(err, 300)})') from None
    for group in ctx.optimizer.param_groups:
        group['fused'] = ctx.optimizer.defaults.get('fused')
    ctx.cur_nimg = int(state['cur_nimg'])
    ctx.total_elapsed_time = float(state.get('total_elapsed_time', 0))


def _make_iterators(ctx) -> None:
    """Data iterators that start at cur_nimg (and, for STF, the extra reference images)."""
    cfg = ctx.cfg
    def loader(sampler, batch):
        workers = dict(worker_init_fn=dist.ignore_stop_signals, prefetch_factor=2) if cfg.workers > 0 else {}
        with dist.stop_signals_held():  # workers ignore preemption signals; the main process checkpoints
            data_iter = iter(torch.utils.data.DataLoader(
                dataset=ctx.dataset, sampler=sampler, batch_size=batch, num_workers=cfg.workers,
                pin_memory=(ctx.device.type == 'cuda'), **workers))
        dist.defer_worker_failures()
        return data_iter
    ctx.data_iter = loader(ctx.recipe.data_sampler(ctx.dataset, ctx.rank, ctx.world, ctx.cur_nimg), ctx.batch_gpu)
    # STF fork: --rbatch reference images per GPU, that GPU's training images included.
    ctx.ref_extra = (cfg.rbatch - ctx.batch_gpu * ctx.rounds) if cfg.stf else 0
    ctx.ref_iter = None
    if ctx.ref_extra > 0:
        steps_done = ctx.cur_nimg // cfg.batch_size
        sampler = misc.InfiniteSampler(dataset=ctx.dataset, rank=ctx.rank, num_replicas=ctx.world, seed=cfg.seed + 1,
                                       window_size=None, start_idx=steps_done * ctx.ref_extra * ctx.world)
        ctx.ref_iter = loader(sampler, ctx.ref_extra)

#----------------------------------------------------------------------------
# One optimizer step.


def _to_device(ctx, images, labels):
    """(images in model space, labels) on the device: uint8 pixels -> [-1, 1] (EDM) or encoder latents (EDM2).
    The DataLoader pins its batches, so neither copy makes the host wait for the GPU (the reference's do)."""
    images = images.to(ctx.device, non_blocking=True)
    images = ctx.encoder.encode_latents(images) if ctx.encoder is not None else images.to(torch.float32) / 127.5 - 1
    return images, labels.to(ctx.device, non_blocking=True)


def train_step(ctx) -> None:
    """Accumulate gradients over rounds (no_sync until the last), then update weights and EMA."""
    cfg = ctx.cfg
    ctx.recipe.seed_rng(ctx.rank, ctx.cur_nimg)
    ctx.optimizer.zero_grad(set_to_none=True)
    batches = [_next_batch(ctx.data_iter) for _ in range(ctx.rounds)]
    batches = [_to_device(ctx, images, labels) for images, labels in batches]
    refs = _stf_references(ctx, batches) if cfg.stf else [{}] * ctx.rounds
    batch_gpu_total = ctx.batch_gpu * ctx.rounds
    net = speed.autocast_calls(ctx.ddp, ctx.device, enabled=cfg.bf16)
    if ctx.get('async_compile') == _ASYNC_PENDING:
        ctx.example_batch = batches[0]  # the shapes the --compile-async child compiles for
    for round_idx, (images, labels) in enumerate(batches):
        with misc.ddp_sync(ctx.ddp, sync=(round_idx == ctx.rounds - 1)):
            loss_sum = loss_backward(net, ctx.loss_fn, images, labels, ctx.augment_pipe, refs[round_idx],
                                     cfg.loss_scaling / batch_gpu_total)
            ctx.bad_loss |= ~torch.isfinite(loss_sum)
    _apply_update(ctx)


def loss_backward(net, loss_fn, images, labels, augment_pipe, refs: dict, scale: float) -> torch.Tensor:
    """Per-image losses of one round (reported to Loss/loss), backpropagated as sum * scale; returns the sum."""
    loss = loss_fn(net=net, images=images, labels=labels, augment_pipe=augment_pipe, **refs).to(torch.float32)
    training_stats.report('Loss/loss', loss)
    loss_sum = loss.sum()
    loss_sum.mul(scale).backward()
    return loss_sum.detach()


def _next_batch(data_iter):
    """Next batch; a dead DataLoader worker surfaces here, before the step has changed any state."""
    try:
        return next(data_iter)
    except RuntimeError as err:
        if 'DataLoader worker' not in str(err):
            raise
        raise DataLoaderWorkerError(dist.worker_failure() or dnnlib.util.text_line(err)) from None


def _stf_references(ctx, batches) -> list[dict]:
    """Per round: the other rounds' images plus the extra reference images (STF reference batch)."""
    extra_images = extra_labels = None
    if ctx.ref_iter is not None:
        extra_images, extra_labels = _next_batch(ctx.ref_iter)
        extra_images, extra_labels = _to_device(ctx, extra_images, extra_labels)
    refs = []
    for round_idx in range(len(batches)):
        others = [b for i, b in enumerate(batches) if i != round_idx]
        images = [b[0] for b in others] + ([extra_images] if extra_images is not None else [])
        labels = [b[1] for b in others] + ([extra_labels] if extra_labels is not None else [])
        refs.append(dict(ref_images=torch.cat(images) if images else None,
                         ref_labels=torch.cat(labels) if labels else None))
    return refs


def _apply_update(ctx) -> None:
    """The recipe's learning rate and gradient cleaning, the optimizer step, the recipe's EMA update."""
    lr = ctx.recipe.learning_rate(ctx.cur_nimg)
    for group in ctx.optimizer.param_groups:
        group['lr'] = float(lr)  # a Python float, so the state loads with weights_only=True
    ctx.recipe.clean_gradients(ctx.net.parameters())
    ctx.optimizer.step()
    prev_nimg = ctx.cur_nimg
    ctx.cur_nimg += ctx.cfg.batch_size
    ctx.recipe.update_ema(ctx.ema, prev_nimg, ctx.cur_nimg)

#----------------------------------------------------------------------------
# Maintenance: status, snapshots, checkpoints, stopping.


def _crossed(prev_nimg: int, cur_nimg: int, interval: int | None) -> bool:
    """True when [prev_nimg, cur_nimg) steps over a multiple of interval."""
    return interval is not None and interval > 0 and cur_nimg // interval > prev_nimg // interval


def _check_finite(ctx) -> None:
    """Stop with a clear message (and write nothing) once the loss became NaN/Inf."""
    if not dist.all_reduce_any(bool(ctx.bad_loss.item()), device=ctx.device if ctx.device.type == 'cuda' else None):
        return
    last = find_latest_state(ctx.run_dir)
    msg = (f'training loss became NaN/Inf before kimg {ctx.cur_nimg / 1e3:.1f}; stopping without saving. '
           f'Last good training state: {last or "none"}. Try a lower --lr or enable --fp16 loss scaling less aggressively')
    logger.error(f'Error: {msg}')
    raise NonFiniteLossError(msg)


def _status(ctx) -> None:
    """One status line (log.txt) and one stats.jsonl record; reduces stats across ranks."""
    cfg, now = ctx.cfg, time.time()
    ctx.total_elapsed_time += now - ctx.prev_status_time
    dt, dn = now - ctx.prev_status_time, max(ctx.cur_nimg - ctx.prev_status_nimg, 1)
    proc = psutil.Process(os.getpid())
    cpu_gb = sum(p.memory_info().rss for p in [proc] + proc.children(recursive=True)) / 2**30
    cuda = ctx.device.type == 'cuda'
    gpu_gb = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if cuda else 0.0
    res_gb = torch.cuda.max_memory_reserved(ctx.device) / 2**30 if cuda else 0.0
    r = training_stats.report0
    r('Progress/tick', ctx.cur_tick)
    r('Progress/kimg', ctx.cur_nimg / 1e3)
    r('Timing/total_sec', ctx.total_elapsed_time)
    r('Timing/sec_per_tick', dt)
    r('Timing/sec_per_kimg', ctx.train_time / dn * 1e3)
    r('Timing/maintenance_sec', dt - ctx.train_time)
    r('Resources/cpu_mem_gb', cpu_gb)
    r('Resources/peak_gpu_mem_gb', gpu_gb)
    r('Resources/peak_gpu_mem_reserved_gb', res_gb)
    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    collector = training_stats.default_collector
    collector.update()
    pct = 100 * ctx.cur_nimg / cfg.total_nimg
    eta = ctx.train_time / dn * max(cfg.total_nimg - ctx.cur_nimg, 0)
    logger.info(' '.join([
        f'Status: kimg {ctx.cur_nimg / 1e3:<9.1f} [{pct:5.1f}%]',
        f'time {dnnlib.util.format_time(ctx.total_elapsed_time):<12s}',
        f'sec/tick {dt:<8.2f} sec/kimg {ctx.train_time / dn * 1e3:<7.3f} img/s {dn / max(ctx.train_time, 1e-9):<8.1f}',
        f'loss {collector.mean("Loss/loss"):<8.4f} cpumem {cpu_gb:<6.2f} gpumem {gpu_gb:<6.2f} reserved {res_gb:<6.2f}',
        f'ETA {dnnlib.util.format_time(eta)}']))
    if ctx.rank == 0:
        _append_stats(ctx, collector)
    ctx.update(cur_tick=ctx.cur_tick + 1, prev_status_time=now, prev_status_nimg=ctx.cur_nimg, train_time=0.0)


def _append_stats(ctx, collector) -> None:
    """One stats.jsonl line in the recipe's format, flushed."""
    line = ctx.recipe.stats_line(collector.as_dict())
    path = os.path.join(ctx.run_dir, 'stats.jsonl')
    with dnnlib.util.writing(path), open(path, 'at') as f:
        f.write(line + '\n')
        f.flush()


def save_snapshot(ctx) -> list[str]:
    """network-snapshot pickle(s) in the reference format of the recipe (rank 0)."""
    if ctx.rank != 0:
        return []
    paths = ctx.recipe.save_snapshot(ctx)
    logger.info(f'Saved {", ".join(os.path.basename(p) for p in paths)}')
    return paths


def save_checkpoint(ctx) -> str | None:
    """training-state-*.pt: state_dicts of net, EMA and optimizer, cur_nimg, resolved config."""
    if ctx.world > 1:
        misc.check_ddp_consistency(ctx.net)
    if ctx.rank != 0:
        return None
    state = dict(format_version=STATE_FORMAT_VERSION, cur_nimg=ctx.cur_nimg, total_elapsed_time=ctx.total_elapsed_time,
                 net=ctx.net.state_dict(), ema=ctx.ema.state_dict(), optimizer=ctx.optimizer.state_dict(),
                 config=to_json(ctx.cfg), network_kwargs=dict(ctx.network_kwargs, **ctx.network_interface))
    path = os.path.join(ctx.run_dir, f'training-state-{ctx.recipe.kimg_name(ctx.cur_nimg)}.pt')
    with dnnlib.util.atomic_write(path, 'wb') as f:
        torch.save(state, f)
    logger.info(f'Saved {os.path.basename(path)}')
    return path


def _on_lost_worker(ctx, err: DataLoaderWorkerError) -> None:
    """A worker died before the step changed anything: save the state (one process), then stop;
    that is a clean exit when a stop signal came, else an error."""
    if ctx.world == 1:
        _check_finite(ctx)
        ctx.state_path = save_checkpoint(ctx) or ctx.state_path
    if dist.should_stop():
        logger.info(f'Stop requested; a DataLoader worker is gone ({err}). Saved the training state; exiting.')
        ctx.stopped = True
        return
    saved = f'saved {ctx.state_path}; ' if ctx.world == 1 else ''
    raise DataLoaderWorkerError(f'{err}; {saved}rerun the same command to continue')


def maintenance(ctx, prev_nimg: int) -> bool:
    """After a step: status, stop requests, snapshots and checkpoints. Returns True when training is over."""
    cfg = ctx.cfg
    done = ctx.cur_nimg >= cfg.total_nimg
    status = done or _crossed(prev_nimg, ctx.cur_nimg, cfg.status_nimg)
    status |= bool(cfg.status_nimg) and ctx.cur_tick == 0 and ctx.recipe.first_status_after_one_step
    stop = dist.should_stop() if ctx.world == 1 else (status and dist.all_reduce_any(dist.should_stop()))
    if stop and not done:
        logger.info('Stop requested: saving a training state and exiting.')
        done = ctx.stopped = True
    snapshot = done or _crossed(prev_nimg, ctx.cur_nimg, cfg.snapshot_nimg)
    checkpoint = done or _crossed(prev_nimg, ctx.cur_nimg, cfg.checkpoint_nimg)
    if status or snapshot or checkpoint:
        _check_finite(ctx)
    if snapshot and cfg.snapshot_nimg is not None and not ctx.stopped:
        status |= ctx.recipe.evaluate(ctx)  # e.g. DDPM --eval: its FID goes into this status line
    if status or done:
        _status(ctx)
    if snapshot and cfg.snapshot_nimg is not None:
        save_snapshot(ctx)
    if checkpoint:
        ctx.state_path = save_checkpoint(ctx) or ctx.state_path
    if snapshot or checkpoint:
        dist.barrier()
    return done

#----------------------------------------------------------------------------


def training_loop(cfg: TrainConfig, run_dir: str, device: torch.device | None = None) -> dnnlib.EasyDict:
    """Train until cfg.total_nimg or a stop signal; returns EasyDict(cur_nimg, stopped, state_path, run_dir, net, ema, optimizer)."""
    device = device if device is not None else dist.device_for_rank(misc.choose_device(cfg.device))
    ctx = None
    try:
        ctx = setup(cfg, run_dir, device)
        cfg = ctx.cfg  # --epochs resolved against the dataset
        ctx.update(stopped=False, cur_tick=0, prev_status_time=time.time(), prev_status_nimg=ctx.cur_nimg, train_time=0.0)
        if ctx.cur_nimg >= cfg.total_nimg:
            logger.info(f'Already trained for {ctx.cur_nimg / 1e3:.1f} kimg (--duration reached); nothing to do.')
        else:
            logger.info(f'Training from {ctx.cur_nimg / 1e3:.1f} kimg to {cfg.total_nimg / 1e3:.1f} kimg '
                        f'on {ctx.world} x {device} (batch {cfg.batch_size}, {ctx.batch_gpu} per round, '
                        f'{ctx.rounds} round(s); TF32 off)...')
            done = False
            while not done:
                start, prev_nimg = time.time(), ctx.cur_nimg
                try:
                    train_step(ctx)
                except DataLoaderWorkerError as err:
                    _on_lost_worker(ctx, err)
                    break
                ctx.train_time += time.time() - start
                if ctx.async_compile is not None:
                    _advance_async_compile(ctx)
                if cfg.first_step:
                    logger.info(f'First optimizer step done (--first-step, loss finite: {not bool(ctx.bad_loss)}); '
                                f'stopping without saving.')
                    break
                done = maintenance(ctx, prev_nimg)
            logger.info('Stopped; rerun the same command to continue.' if ctx.stopped else 'Done.')
        return dnnlib.EasyDict(cur_nimg=ctx.cur_nimg, stopped=ctx.stopped, state_path=ctx.state_path, run_dir=run_dir,
                               net=ctx.net, ema=ctx.ema, optimizer=ctx.optimizer)
    finally:
        if ctx is not None and hasattr(ctx.get('async_compile'), 'close'):
            ctx.async_compile.close()
        _close_logging()
