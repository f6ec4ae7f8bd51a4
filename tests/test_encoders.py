"""training.encoders and dataset_tool.py encode/decode, with a tiny randomly initialized AutoencoderKL."""

import copy
import json
import os
import pickle
import time

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
from dataset_tool import cmdline
from torch_utils import persistence
from training.dataset import ImageFolderDataset
from training.encoders import StabilityVAEEncoder, StandardRGBEncoder

#----------------------------------------------------------------------------

_tiny_vae_cache = {}

@pytest.fixture
def tiny_vae(tmp_path_factory):
    """Folder of a diffusers AutoencoderKL with SD's layout (4 latent channels, 8x downsampling), 8 channels wide."""
    if 'path' not in _tiny_vae_cache:
        import diffusers
        torch.manual_seed(0)
        vae = diffusers.models.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4, norm_num_groups=4)
        path = tmp_path_factory.mktemp('vae') / 'tiny-vae'
        vae.save_pretrained(path)
        _tiny_vae_cache['path'] = str(path)
    return _tiny_vae_cache['path']

def run_tool(*args):
    return CliRunner().invoke(cmdline, [str(a) for a in args], catch_exceptions=False)

def read_folder(root):
    return {os.path.relpath(os.path.join(r, f), root): open(os.path.join(r, f), 'rb').read()
            for r, _dirs, files in os.walk(root) for f in files}

#----------------------------------------------------------------------------
# Encoder classes.

def test_standard_rgb_encoder():
    enc = StandardRGBEncoder()
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    latents = enc.encode(pixels)
    assert latents.dtype == torch.float32 and latents.min() == -1 and latents.max() == 1
    assert torch.equal(enc.decode(latents), pixels)
    assert torch.equal(enc.decode(latents + 0.49 / 127.5), pixels)  # rounds to nearest
    assert persistence.is_persistent(enc) and enc.init_kwargs == {}

def test_vae_encoder_constructor_and_pickling(tiny_vae):
    enc = StabilityVAEEncoder(vae_name=tiny_vae, batch_size=4)
    np.testing.assert_array_equal(enc.scale, np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28]))
    np.testing.assert_array_equal(enc.bias, -np.float32([5.81, 3.25, 0.12, -2.15]) * enc.scale)
    enc.init(torch.device('cpu'))
    assert enc._vae is not None
    clone = pickle.loads(pickle.dumps(enc))  # reference format, source embedded
    assert clone._vae is None and clone.init_kwargs == {'vae_name': tiny_vae, 'batch_size': 4}
    assert copy.deepcopy(enc)._vae is None
    assert len(pickle.dumps(enc)) < 50_000  # the VAE weights are never pickled

    # What the safe loader does with a reference pickle: rebuild from the recorded init kwargs.
    kwargs = dict(vae_name='stabilityai/sd-vae-ft-mse', raw_mean=[1, 2, 3, 4], raw_std=[2, 2, 2, 2], final_std=1.0, batch_size=2)
    rebuilt = persistence.rebuild(StabilityVAEEncoder, {'_init_args': (), '_init_kwargs': kwargs, '_vae': None})
    assert rebuilt.batch_size == 2 and rebuilt._vae is None
    np.testing.assert_allclose(rebuilt.bias, [-0.5, -1, -1.5, -2])

def test_vae_encoder_math(tiny_vae):
    enc = StabilityVAEEncoder(vae_name=tiny_vae, batch_size=3)
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=[5, 3, 16, 16], dtype=np.uint8))
    raw = enc.encode_pixels(pixels)
    assert raw.shape == (5, 8, 2, 2) and raw.dtype == torch.float32
    assert torch.all(raw[:, 4:] > 0)  # posterior std
    assert torch.equal(enc.encode_pixels(pixels), raw)  # deterministic
    one_by_one = StabilityVAEEncoder(vae_name=tiny_vae, batch_size=1).encode_pixels(pixels)
    torch.testing.assert_close(one_by_one, raw, rtol=1e-5, atol=1e-6)  # batch size does not matter

    # Final latents: whitened posterior samples; decoding inverts the whitening before the VAE decoder.
    noise = torch.randn(5, 4, 2, 2)
    final = enc.encode_latents(raw, noise=noise)
    scale, bias = torch.tensor(enc.scale).reshape(1, 4, 1, 1), torch.tensor(enc.bias).reshape(1, 4, 1, 1)
    torch.testing.assert_close(final, (raw[:, :4] + noise * raw[:, 4:]) * scale + bias)
    assert enc._const(final, enc.scale).data_ptr() == enc._const(raw, enc.scale).data_ptr()  # one upload per device
    torch.manual_seed(1)
    sampled = enc.encode_latents(raw.contiguous())  # as loaded from a dataset; randn_like follows memory format
    torch.manual_seed(1)
    torch.testing.assert_close(sampled, enc.encode_latents(raw, noise=torch.randn(5, 4, 2, 2)))
    decoded = enc.decode(final)
    assert decoded.shape == (5, 3, 16, 16) and decoded.dtype == torch.uint8
    expected = enc._vae.decode(raw[:, :4] + noise * raw[:, 4:])['sample'].clamp(0, 1).mul(255).to(torch.uint8)
    assert (decoded.int() - expected.int()).abs().max() <= 1

#----------------------------------------------------------------------------
# dataset_tool.py encode / decode.

@pytest.fixture
def png_dataset(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / 'src'
    for name in ['a/0.png', 'a/1.png', 'b/2.png', 'b/3.png', 'b/4.png']:
        os.makedirs(os.path.dirname(src / name), exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, size=[16, 16, 3], dtype=np.uint8)).save(src / name)
    return src

def test_encode_decode(tiny_vae, png_dataset, tmp_path):
    latents = tmp_path / 'latents'
    result = run_tool('encode', '--source', png_dataset, '--dest', latents, '--model', tiny_vae, '--batch', 2, '--workers', 0)
    assert result.exit_code == 0, result.output
    files = read_folder(latents)
    names = [f'00000/img-mean-std-{i:08d}.npy' for i in range(5)]
    assert sorted(files) == sorted(names + ['dataset.json'])
    assert json.loads(files['dataset.json']) == {'labels': [[n, l] for n, l in zip(names, [0, 0, 1, 1, 1])]}
    ds = ImageFolderDataset(str(latents))
    assert ds.image_shape == [8, 2, 2] and ds.label_dim == 2
    expected = StabilityVAEEncoder(vae_name=tiny_vae).encode_pixels(
        torch.from_numpy(np.array(PIL.Image.open(png_dataset / 'b' / '3.png'))).permute(2, 0, 1)[None])
    np.testing.assert_allclose(ds[3][0], expected[0].numpy(), rtol=1e-5, atol=1e-6)
    # --precision=tf32 (the reference's cuDNN default) changes only CUDA convolutions: the same bytes on the CPU.
    result = run_tool('encode', '--source', png_dataset, '--dest', tmp_path / 'tf32', '--model', tiny_vae, '--batch', 2,
                      '--workers', 0, '--precision', 'tf32')
    assert result.exit_code == 0, result.output
    assert read_folder(tmp_path / 'tf32') == files

    # Resume after an interruption: only the missing file is made again, identically; batch size does not matter.
    os.remove(latents / 'dataset.json')
    os.remove(latents / names[3])
    assert run_tool('encode', '--source', png_dataset, '--dest', latents, '--model', tiny_vae, '--batch', 1, '--workers', 0).exit_code == 0
    resumed = read_folder(latents)
    assert resumed.keys() == files.keys()
    np.testing.assert_allclose(np.load(latents / names[3]), ds[3][0], rtol=1e-5, atol=1e-6)
    result = run_tool('encode', '--source', png_dataset, '--dest', latents, '--model', tiny_vae, '--workers', 0)
    assert result.exit_code != 0 and 'finished dataset' in result.output

    # Decode: one PNG per latent, labels kept, identical for any batch size (per-image seeds).
    outputs = []
    for batch, dest in [(1, tmp_path / 'dec1.zip'), (4, tmp_path / 'dec4')]:
        assert run_tool('decode', '--source', latents, '--dest', dest, '--model', tiny_vae, '--batch', batch, '--workers', 0).exit_code == 0
        dec = ImageFolderDataset(str(dest))
        assert len(dec) == 5 and dec.image_shape == [3, 16, 16] and dec.label_dim == 2
        outputs.append(np.stack([dec[i][0] for i in range(5)]))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert not os.path.exists(str(tmp_path / 'dec1.zip') + '.partial')

def test_encode_writes_in_the_background_and_stops_on_a_failed_write(tiny_vae, png_dataset, tmp_path, monkeypatch):
    """The latents are written by a background thread while the next batch encodes; a write that fails stops
    the tool with one line, after the batches already queued, and leaves no dataset.json (a rerun resumes)."""
    import threading
    from training import dataset_encode
    real_write, threads = dataset_encode._write_file_atomic, []
    def write(path, data):
        threads.append(threading.current_thread().name)
        if len(threads) == 3:
            raise dnnlib.util.WriteError(f'no space left on device while writing {path}')
        real_write(path, data)
    monkeypatch.setattr(dataset_encode, '_write_file_atomic', write)
    latents = tmp_path / 'latents'
    result = CliRunner().invoke(cmdline, ['encode', '--source', str(png_dataset), '--dest', str(latents), '--model',
                                          str(tiny_vae), '--batch', '2', '--workers', '0'])
    assert result.exit_code != 0 and 'no space left on device while writing' in result.output
    assert len(threads) == 3 and all(name.startswith('dataset-writer') for name in threads)
    assert not (latents / 'dataset.json').exists() and len(read_folder(latents)) == 2


def test_encode_reads_in_worker_processes_ahead_and_names_an_unreadable_image(tiny_vae, png_dataset, tmp_path):
    """With reader processes (--workers 2, the default) the latents are those of a run without them; the batches
    are gathered in a background thread. An unreadable image stops the tool with one line naming the file, before
    dataset.json is written."""
    one = tmp_path / 'one'
    assert run_tool('encode', '--source', png_dataset, '--dest', one, '--model', tiny_vae, '--batch', 2, '--workers', 0).exit_code == 0
    two = tmp_path / 'two'
    assert run_tool('encode', '--source', png_dataset, '--dest', two, '--model', tiny_vae, '--batch', 2).exit_code == 0
    assert read_folder(two) == read_folder(one)
    (png_dataset / 'b' / '3.png').write_bytes(b'not a png')
    result = CliRunner().invoke(cmdline, ['encode', '--source', str(png_dataset), '--dest', str(tmp_path / 'bad'),
                                          '--model', str(tiny_vae), '--batch', '2'])
    assert result.exit_code != 0 and not (tmp_path / 'bad' / 'dataset.json').exists()
    last = result.output.strip().splitlines()[-1]
    assert last.startswith('Error: cannot read') and '3.png' in last and 'Traceback' not in result.output


def test_encode_split_over_ranks(tiny_vae, png_dataset, tmp_path, monkeypatch):
    """Each rank encodes every world_size-th image; rank 0 (run last here) checks completeness and packs the zip."""
    from torch_utils import distributed
    from training.dataset_encode import encode_dataset
    single = tmp_path / 'single'
    encode_dataset(str(png_dataset), str(single), model=tiny_vae, workers=0, progress=False)
    dest = tmp_path / 'split.zip'
    monkeypatch.setattr(distributed, 'init', lambda device=None: None)  # no process group: barriers are no-ops
    monkeypatch.setattr(distributed, 'get_world_size', lambda: 2)
    monkeypatch.setattr(distributed, 'get_rank', lambda: 1)
    encode_dataset(str(png_dataset), str(dest), model=tiny_vae, workers=0, progress=False)
    partial = read_folder(str(dest) + '.partial')
    assert sorted(partial) == ['00000/img-mean-std-00000001.npy', '00000/img-mean-std-00000003.npy']
    assert not os.path.exists(dest)
    monkeypatch.setattr(distributed, 'get_rank', lambda: 0)
    encode_dataset(str(png_dataset), str(dest), model=tiny_vae, workers=0, progress=False)
    assert not os.path.exists(str(dest) + '.partial')
    ds_single, ds_split = ImageFolderDataset(str(single)), ImageFolderDataset(str(dest))
    assert len(ds_split) == 5
    for i in range(5):
        np.testing.assert_allclose(ds_split[i][0], ds_single[i][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(ds_split[i][1], ds_single[i][1])

def test_missing_model(png_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    start = time.time()
    result = run_tool('encode', '--source', png_dataset, '--dest', tmp_path / 'out', '--workers', 0)
    assert result.exit_code != 0 and time.time() - start < 30
    last = result.output.strip().splitlines()[-1]
    assert last.startswith('Error: ') and 'stabilityai/sd-vae-ft-mse' in last and 'HF_HUB_OFFLINE' in last
    assert 'local diffusers folder' in last and not os.path.exists(tmp_path / 'out')
    result = run_tool('decode', '--source', png_dataset, '--dest', tmp_path / 'out', '--model', tmp_path / 'no-vae')
    assert result.exit_code != 0 and '.npy' in result.output  # the source is checked first
    result = run_tool('encode', '--source', png_dataset, '--dest', tmp_path / 'out', '--model', tmp_path / 'no-vae')
    assert result.exit_code != 0 and 'no-vae' in result.output and 'not found' in result.output

#----------------------------------------------------------------------------


def test_encode_and_decode_default_to_the_reference_tf32_numerics():
    """dataset_tool.py encode|decode default to --precision=tf32 (torch's default, under which the reference encoder
    runs on a GPU); off CUDA tf32 is plain fp32, and the bf16 refusal names it."""
    import inspect
    import dataset_tool
    from training import dataset_encode
    for fn in (dataset_encode.encode_dataset, dataset_encode.decode_dataset):
        assert inspect.signature(fn).parameters['precision'].default == 'tf32'
    for command in ('encode', 'decode'):
        help_text = CliRunner().invoke(dataset_tool.cmdline, [command, '--help']).output
        assert '[default: tf32]' in ' '.join(help_text.split())
    with pytest.raises(ValueError, match=r'needs a CUDA device; use --precision=tf32 \(the default\) on cpu'):
        dataset_encode._setup('cpu', 'bf16')
