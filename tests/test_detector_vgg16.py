"""--pr-detector=vgg16: NVIDIA's vgg16.pt (the P/R detector of StyleGAN2-ADA and tqch/ddpm-torch) rebuilt in plain
torch. Its key layout and shapes, its preprocessing and layer order against a functional restatement, loading
an archive in that layout without running its TorchScript code, and one-line errors for bad files.

Facts (the real 528 MB file is not used here): keys layers.conv1..conv13, layers.fc1..fc3, lpips0..lpips4
(the mapping genforce's perceptual_model.py applies to vgg16.pt); weights of torchvision's VGG-16; features
= fc2 after ReLU of the input bilinearly resized to 224 x 224 in TF1 style and normalised with the ImageNet
mean/std on [0, 255] (torch-fidelity's FeatureExtractorVGG16 'fc2_relu', which its test matches to
vgg16.pt(x, return_features=True) within 1e-4 on uint8 images of 32 to 512 pixels).
"""

import pickle
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F

import dnnlib
from torch_utils import script_archive
from training import detectors

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py

NARROW = dict(widths=(4, 8, 8, 16, 16), fc_features=64, num_classes=10)  # VGG-16 structure, tiny widths


def narrow_vgg16_archive(path, seed: int = 0) -> detectors.VGG16:
    """A random-weight VGG-16 of NARROW widths saved as a TorchScript archive (torch.jit.trace), as vgg16.pt is."""
    torch.manual_seed(seed)
    net = detectors.VGG16(**NARROW).eval()
    with torch.no_grad():
        for name, param in net.named_parameters():
            param.normal_(0, 0.3 if name.endswith('weight') else 0.1)
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export; vgg16.pt is TorchScript
        warnings.simplefilter('ignore')
        torch.jit.trace(net, torch.zeros(1, 3, 16, 16)).save(str(path))
    return net


def functional_features(state_dict: dict, images: torch.Tensor) -> torch.Tensor:
    """The documented computation written out from the tensors alone."""
    x = detectors.tf1_bilinear_resize(images.to(torch.float32), 224, 224)
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1) * 255
    x = (x - mean) / std
    for index in range(1, 14):
        x = F.relu(F.conv2d(x, state_dict[f'layers.conv{index}.weight'], state_dict[f'layers.conv{index}.bias'], padding=1))
        if index in (2, 4, 7, 10, 13):
            x = F.max_pool2d(x, kernel_size=2, stride=2)
    x = F.relu(F.linear(x.flatten(1), state_dict['layers.fc1.weight'], state_dict['layers.fc1.bias']))
    return F.relu(F.linear(x, state_dict['layers.fc2.weight'], state_dict['layers.fc2.bias']))


@pytest.fixture
def archive(tmp_path):
    path = tmp_path / 'vgg16.pt'
    return path, narrow_vgg16_archive(path)

#----------------------------------------------------------------------------
# Layout and computation.


def test_full_size_layout_is_vgg16_pt():
    with torch.device('meta'):  # shapes only: no 528 MB of weights
        state_dict = detectors.VGG16().state_dict()
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    expected = {}
    for index, (cin, cout) in enumerate(zip([3] + widths[:-1], widths), start=1):
        expected[f'layers.conv{index}.weight'] = (cout, cin, 3, 3)
        expected[f'layers.conv{index}.bias'] = (cout,)
    for name, (fan_out, fan_in) in dict(fc1=(4096, 512 * 7 * 7), fc2=(4096, 4096), fc3=(1000, 4096)).items():
        expected[f'layers.{name}.weight'], expected[f'layers.{name}.bias'] = (fan_out, fan_in), (fan_out,)
    for stage, width in enumerate((64, 128, 256, 512, 512)):
        expected[f'lpips{stage}'] = (width, 1, 1)
    assert {key: tuple(value.shape) for key, value in state_dict.items()} == expected
    assert sum(v.numel() for k, v in state_dict.items() if not k.startswith('lpips')) == 138_357_544  # VGG-16 D


@pytest.mark.parametrize('resolution', [32, 224, 300])
def test_features_follow_the_documented_computation(archive, resolution):
    path, net = archive
    detector = detectors.VGG16Detector(path=str(path))
    images = torch.randint(0, 256, (3, 3, resolution, resolution), dtype=torch.uint8, generator=torch.Generator().manual_seed(resolution))
    features = detector(images)
    expected = functional_features(net.state_dict(), images)
    assert features.shape == (3, 64) and features.dtype == torch.float32 and detector.feature_dim == 64
    assert (features > 0).any() and (features == 0).any()  # after the ReLU, and not degenerate
    # Same operations in the same order on the same CPU: equal up to a few fp32 roundings of the largest value.
    torch.testing.assert_close(features, expected, rtol=0, atol=64 * torch.finfo(torch.float32).eps * expected.abs().max().item())


def test_resize_is_tf1_bilinear():
    small = torch.arange(4.0).reshape(1, 1, 1, 4).expand(1, 3, 4, 4)
    # TF1 alignment (no half-pixel centres): output column i samples input column i * 4 / 8, clamped at the edge.
    row = detectors.tf1_bilinear_resize(small, 8, 8)[0, 0, 0]
    torch.testing.assert_close(row, torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0]), rtol=0, atol=1e-6)


#----------------------------------------------------------------------------
# Loading: weights only, no code.


def test_archive_loads_without_running_its_code(archive, monkeypatch, tmp_path):
    path, net = archive
    def refuse(*args, **kwargs):
        raise AssertionError('the detector must not load TorchScript code or unpickle with torch.load here')
    monkeypatch.setattr(torch.jit, 'load', refuse)
    monkeypatch.setattr(torch, 'load', refuse)
    tensors = script_archive.read_tensors(str(path))
    for key, value in net.state_dict().items():
        assert torch.equal(tensors[key], value), key
    detector = detectors.VGG16Detector(path=str(path))
    for key, value in net.state_dict().items():
        assert torch.equal(detector.model.state_dict()[key], value), key


def test_state_dict_file_in_the_same_layout_loads(archive, tmp_path):
    path, net = archive
    torch.save(net.state_dict(), tmp_path / 'vgg16.pth')
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(detectors.VGG16Detector(path=str(tmp_path / 'vgg16.pth'))(images),
                       detectors.VGG16Detector(path=str(path))(images))


def _forged_archive(path, payload: bytes) -> None:
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('vgg16/data.pkl', payload)
        archive.writestr('vgg16/constants.pkl', pickle.dumps(()))
        archive.writestr('vgg16/code/__torch__.py', 'def forward(self): pass\n')


def test_bad_files_are_one_line_errors(archive, tmp_path):
    path, net = archive
    noise = tmp_path / 'noise.pt'
    noise.write_bytes(b'not a weights file' * 10)
    wrong_layout = tmp_path / 'wrong_layout.pt'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.jit.trace(torch.nn.Linear(48, 4096), torch.zeros(1, 48)).save(str(wrong_layout))
    wrong_shape = tmp_path / 'wrong_shape.pth'
    state_dict = dict(net.state_dict())
    state_dict['layers.conv5.weight'] = state_dict['layers.conv5.weight'][:, :4]
    torch.save(state_dict, wrong_shape)
    forged = tmp_path / 'forged.pt'  # a data.pkl that would call os.system when unpickled by pickle.load
    _forged_archive(forged, b"cos\nsystem\n(S'echo pwned'\ntR.")
    no_data = tmp_path / 'no_data.pt'
    with zipfile.ZipFile(no_data, 'w') as z:
        z.writestr('x/code/__torch__.py', '')
    cases = [(noise, 'neither a TorchScript archive nor a state_dict'),
             (wrong_layout, 'not the VGG-16 layout of vgg16.pt: missing layers.conv1.weight'),
             (wrong_shape, 'layers.conv5.weight has shape (8, 4, 3, 3), expected (8, 8, 3, 3)'),
             (forged, 'data.pkl refers to os.system, which a weights file does not need; refused'),
             (no_data, 'without the one <name>/data.pkl')]
    for bad, message in cases:
        with pytest.raises(dnnlib.util.UserError) as info:
            detectors.VGG16Detector(path=str(bad))
        text = str(info.value)
        assert message in text and '\n' not in text and text.startswith(f'{bad}: cannot load the VGG-16 detector'), text


def test_archive_reader_refuses_unknown_storages_and_truncated_data(archive, tmp_path):
    unknown = tmp_path / 'unknown.pt'
    _forged_archive(unknown, b"\x80\x02(X\x07\x00\x00\x00storageq\x00tQ.")  # persistent id ('storage',)
    with pytest.raises(script_archive.ArchiveError, match='unknown storage reference'):
        script_archive.read_tensors(str(unknown))
    path, _net = archive
    truncated = tmp_path / 'truncated.pt'
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(truncated, 'w') as target:
        for name in source.namelist():
            data = source.read(name)
            target.writestr(name, data[:3] if name.endswith('/data/0') else data)
    with pytest.raises(script_archive.ArchiveError, match=r'storage .*/data/0 holds 3 bytes, fewer than'):
        script_archive.read_tensors(str(truncated))
