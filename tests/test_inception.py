"""minisd.inception and minisd.resize against torch-fidelity's FeatureExtractorInceptionV3, the network torchmetrics'
FrechetInceptionDistance runs, on identical random weights in the release file's layout; and the weights file's
loading, refusals and whereabouts, without a network.

Random weights: a deep net with arbitrary weights makes activations explode or vanish, and then "equal" means
little. So the batch-norm running statistics are calibrated on images like the test's (each layer's mean and
variance measured on the way through), which keeps every layer's output O(1); the tests assert the features' std.
"""
import hashlib
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from conftest import rel_err
from minisd import inception_load
from minisd.config import LoadError
from minisd.errors import INTERFACE
from minisd.inception import BatchNorm, InceptionV3, features
from minisd.inception_load import inception_weights, load_inception
from minisd.resize import resize_like_tf1

# Features: ours vs the reference, max |difference| relative to the reference's largest |value|. Both run the same
# float32 operations (same convolutions, pools, concatenation order and resize arithmetic), but ours in the
# channels_last layout (1.5x faster on the CPU, minisd/inception.py), where oneDNN picks other convolution kernels
# with another summation order: a reordered fp32 sum of K ~ 4,000 terms (448 x 3 x 3, the widest) moves by
# ~sqrt(K) * 6e-8 ~ 4e-6 relative, compounded over ~20 layers in a row (measured: up to 2.5e-5 at 299², Sapphire
# Rapids). 3e-4 is above that with room for other CPUs, and far below what a real mistake gives (measured on these
# weights, relative: count_include_pad=True 0.16, average instead of max pool in Mixed_7c 0.56, torch's antialiased
# resize instead of TF1's 1.2).
FEATURES_RTOL = 3e-4


def images(generator, n: int, height: int, width: int) -> torch.Tensor:
    """uint8 images with structure: a random 6x6 field, smoothly enlarged, plus pixel noise."""
    field = torch.rand(n, 3, 6, 6, generator=generator) * 255
    smooth = F.interpolate(field, size=(height, width), mode="bicubic", align_corners=False)
    return (smooth + 40 * torch.randn(n, 3, height, width, generator=generator)).clamp(0, 255).to(torch.uint8)


def calibrated_state(seed: int = 0) -> dict:
    """A state dict in the release file's layout (470 conv/batch-norm tensors + the unused 1008-way `fc`; no
    `num_batches_tracked`) with random weights and batch-norm statistics measured on `images`."""
    torch.manual_seed(seed)
    model = InceptionV3()   # torch's default conv init; then random batch-norm affines
    bns = [m for m in model.modules() if isinstance(m, BatchNorm)]
    for bn in bns:
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)

    def measure(bn, args):   # before each batch norm runs: its input's per-channel mean and variance
        bn.running_mean.copy_(args[0].mean((0, 2, 3)))
        bn.running_var.copy_(args[0].var((0, 2, 3)))

    hooks = [bn.register_forward_pre_hook(measure) for bn in bns]
    features(model, images(torch.Generator().manual_seed(seed), 2, 299, 299))
    for hook in hooks:
        hook.remove()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = 0.02 * torch.randn(1008, 2048), torch.zeros(1008)
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(calibrated_state(), path)
    return path


@pytest.fixture(scope="module")
def ours(weights_file):
    return load_inception(weights_file)


@pytest.fixture(scope="module")
def reference(weights_file):
    # A local path: the reference then loads it with torch.load and never downloads.
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                       feature_extractor_weights_path=str(weights_file))


def test_layout_is_the_reference_modules(weights_file, reference):
    """Our names and shapes are the reference module's (less its `num_batches_tracked` counters, which the release
    file lacks too); the reference also loaded our file strictly."""
    ref = {k: tuple(v.shape) for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    file = {k: tuple(v.shape) for k, v in torch.load(weights_file, weights_only=True).items()}
    assert file == ref and len(file) == 472


@pytest.mark.parametrize("n, height, width", [(2, 299, 299), (1, 64, 80), (1, 512, 512)])
def test_features_equal_the_reference(ours, reference, n, height, width):
    x = images(torch.Generator().manual_seed(height), n, height, width)
    got = features(ours, x)
    (want,) = reference(x)
    assert got.shape == (n, 2048) and got.dtype == torch.float32
    assert 0.1 < want.std() < 10, f"features' std {want.std():.3g}: not O(1), the comparison would be vacuous"
    assert rel_err(got, want) <= FEATURES_RTOL
    if n == 2:   # the images are told apart by far more than the tolerance
        assert (want[0] - want[1]).abs().max() > 100 * FEATURES_RTOL * want.abs().max()


def test_antialias_equals_torchmetrics_default(ours, weights_file):
    """`antialias=True` is torchmetrics 1.9's default resize; the default is TF1's. The two differ clearly, which
    also shows that the tolerance above would catch a wrong resize."""
    from torchmetrics.image.fid import NoTrainInceptionV3
    metric_net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_file),
                                    antialias=True)
    x = images(torch.Generator().manual_seed(5), 1, 512, 384)
    want = metric_net(x)
    assert rel_err(features(ours, x, antialias=True), want) <= FEATURES_RTOL
    assert (features(ours, x) - want).abs().max() > 100 * FEATURES_RTOL * want.abs().max()


@pytest.mark.parametrize("shape, size", [((2, 3, 512, 512), (299, 299)), ((1, 3, 64, 80), (299, 299)),
                                         ((1, 3, 37, 517), (224, 224)), ((1, 2, 5, 7), (13, 3)),
                                         ((1, 3, 299, 299), (299, 299))])
def test_resize_is_tf1s_bit_for_bit(shape, size):
    """Down, up, mixed and odd sizes. Exact equality: the same float32 operations in the same order (the coordinate
    i * float32(in / out), floor, the blend along the width then the height), so no rounding can differ."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 255
    want = interpolate_bilinear_2d_like_tensorflow1x(x, size=size, align_corners=False)
    assert torch.equal(resize_like_tf1(x, size), want)
    if size != tuple(shape[2:]):   # and it is not torch's half-pixel-centred bilinear
        torch_resize = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        assert (torch_resize - want).abs().max() > 1


def test_resize_identity_and_uint8_only(ours):
    x = torch.rand(1, 3, 299, 299, dtype=torch.float64) * 255
    assert torch.equal(resize_like_tf1(x, 299), x)
    with pytest.raises(TypeError, match="uint8"):
        features(ours, x)


def test_other_layouts_of_the_same_weights_load(tmp_path, weights_file, ours, reference):
    """A .safetensors copy, and a state dict saved from torch-fidelity's module (it has `num_batches_tracked`)."""
    state = torch.load(weights_file, weights_only=True)
    save_file(state, tmp_path / "w.safetensors")
    torch.save(reference.state_dict(), tmp_path / "from_module.pth")
    for path in (tmp_path / "w.safetensors", tmp_path / "from_module.pth"):
        loaded = load_inception(path)
        assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
        for k, v in ours.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), (path, k)


def one_line_error(func, *args) -> str:
    token = INTERFACE.set("cli")   # messages name flags as a CLI user typed them
    try:
        with pytest.raises(LoadError) as info:
            func(*args)
    finally:
        INTERFACE.reset(token)
    message = str(info.value)
    assert "\n" not in message
    return message


def wrong_files(tmp_path, weights_file):
    """name -> (file, what the message must say)."""
    import torchvision
    state = torch.load(weights_file, weights_only=True)
    cases = {"torchvision-inception.pth": (torchvision.models.inception_v3(weights=None, init_weights=False)
                                           .state_dict(), "unknown keys, e.g. AuxLogits"),
             "linear.pth": (torch.nn.Linear(2, 3).state_dict(), "470 keys missing, e.g. Conv2d_1a_3x3.conv.weight"),
             "shape.pth": ({**state, "Mixed_7c.branch_pool.conv.weight": torch.zeros(192, 2048, 3, 3)},
                           "Mixed_7c.branch_pool.conv.weight has shape [192, 2048, 3, 3], not [192, 2048, 1, 1]"),
             "list.pth": ([torch.zeros(3)], "holds a list, not a state dict"),
             "module.pth": (torch.nn.Linear(2, 3), "not a readable weights file (UnpicklingError")}
    files = {}
    for name, (obj, expected) in cases.items():
        torch.save(obj, tmp_path / name)
        files[name] = (tmp_path / name, expected)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weights_file.read_bytes()[: 1 << 20])
    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    files["truncated"] = (truncated, "not a readable weights file")
    files["bad.safetensors"] = (bad_safetensors, "not a readable weights file")
    files["missing"] = (tmp_path / "absent.pth", "no such file")
    return files


def test_wrong_files_give_one_line(tmp_path, weights_file):
    """Another network's weights (torchvision's Inception-v3 has the same layer names), a wrong shape, no state dict,
    a pickled object (refused by weights_only), a truncated or corrupt file, no file: one line each, naming the file
    and where to get the right one."""
    for name, (path, expected) in wrong_files(tmp_path, weights_file).items():
        message = one_line_error(load_inception, path)
        assert message.startswith(f"{path}: ") and expected in message, (name, message)
        assert f"fetch {inception_load.URL} and pass it with --inception FILE" in message, name


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch.hub cache (TORCH_HOME), and no proxy."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_weights_location(torch_home, tmp_path, monkeypatch):
    """A given path is used as is (and must exist); else torch-fidelity's own cache file, found without a probe."""
    given = tmp_path / "mine.pth"
    given.write_bytes(b"x")
    assert inception_weights(given) == given
    assert "--inception " in one_line_error(inception_weights, tmp_path / "absent.pth")
    monkeypatch.setattr(inception_load, "hub_reachable", lambda url: pytest.fail("probed although cached"))
    torch_home.mkdir(parents=True)
    (torch_home / inception_load.FILENAME).write_bytes(b"x")
    assert inception_weights() == torch_home / inception_load.FILENAME == inception_load.cache_path()


def test_offline_says_what_to_fetch_at_once(torch_home, monkeypatch):
    """The real probe against a port nothing listens on (refused at once): a one-line error in well under its 3 s."""
    monkeypatch.setattr(inception_load, "URL", "http://127.0.0.1:9/" + inception_load.FILENAME)
    start = time.monotonic()
    message = one_line_error(inception_weights)
    assert time.monotonic() - start < 2
    assert "127.0.0.1 cannot be reached" in message and f"fetch {inception_load.URL}" in message
    assert "--inception FILE" in message and not torch_home.exists()


def test_download_lands_in_the_cache_only_if_its_hash_fits(torch_home, tmp_path, monkeypatch, capsys):
    """A file:// URL stands in for the release. A wrong sha256 prefix leaves nothing behind; the right one is renamed
    into torch-fidelity's cache, where torchmetrics would look too."""
    release = tmp_path / "release.pth"
    release.write_bytes(b"stand-in for the weights" * 1000)
    monkeypatch.setattr(inception_load, "URL", release.as_uri())
    monkeypatch.setattr(inception_load, "hub_reachable", lambda url: True)
    assert "sha256 does not start with 6726825d" in one_line_error(inception_weights)
    assert list(torch_home.iterdir()) == []
    prefix = hashlib.sha256(release.read_bytes()).hexdigest()[:8]
    monkeypatch.setattr(inception_load, "OFFICIAL_SHA256_PREFIX", prefix)
    path = inception_weights()
    assert path == torch_home / inception_load.FILENAME and path.read_bytes() == release.read_bytes()
    assert list(torch_home.iterdir()) == [path] and "downloading" in capsys.readouterr().err
    assert inception_load.is_official(path)
    monkeypatch.setattr(inception_load, "OFFICIAL_SHA256_PREFIX", "6726825d")
    assert not inception_load.is_official(path)
