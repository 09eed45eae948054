"""The chest X-ray feature networks of medti.evaluate against their references, on identical random weights:
RAD-DINO (a transformers Dinov2Model with a preprocessor_config.json in microsoft/rad-dino's layout, prepared by
transformers' own image processor) and torchxrayvision's DenseNet-121 (its network, its preparation: normalize,
XRayCenterCrop, XRayResizer), plus the one-line refusals of files that are not these networks.

Tolerances: float32 on both sides with the same operations in another order; each bound says what it measured."""
import json

import pytest
import torch
import torchvision
import torchxrayvision as xrv
from PIL import Image
from transformers import AutoImageProcessor, Dinov2Config, Dinov2Model

from conftest import randomize_, rel_err
from medti.quality.features import load_network
from minisd import densenet, densenet_load
from minisd.config import LoadError

# microsoft/rad-dino's processor: BitImageProcessor, shortest edge = crop = the trained size, one grey mean/std
# for the three channels (the model takes grey X-rays copied to RGB).
RAD_DINO_PROCESSOR = {"image_processor_type": "BitImageProcessor", "do_convert_rgb": True, "do_resize": True,
                      "resample": 3, "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255,
                      "do_normalize": True, "image_mean": [0.5307, 0.5307, 0.5307],
                      "image_std": [0.2583, 0.2583, 0.2583]}
TINY_DENSENET = dict(growth_rate=8, block_config=(2, 3), num_init_features=16, bn_size=2)


def rad_dino_release(folder, size: int, **config):
    """A random Dinov2Model saved as RAD-DINO is: transformers' config.json and model.safetensors, and its
    processor file at `size` (the trained image size)."""
    torch.manual_seed(0)
    model = randomize_(Dinov2Model(Dinov2Config(image_size=size, **config))).eval()
    model.save_pretrained(folder)
    processor = {**RAD_DINO_PROCESSOR, "size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return model


def images(*sizes, seed=0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


def pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x[0].permute(1, 2, 0).numpy())


# measured 0 (bit-identical: the same prepared pixels, tests/test_dino.py, and the same float32 operations); 1e-5
# leaves room for another BLAS
@pytest.mark.parametrize("size", [(90, 120), (130, 100), (56, 56), (40, 50)])
def test_rad_dino_equals_transformers_with_its_processor(size, tmp_path):
    """Wider and taller images (shortest edge, then a centre crop), one already at size, one enlarged."""
    ref = rad_dino_release(tmp_path, 56, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    net = load_network("rad-dino", encoder=str(tmp_path))
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    x = images(size)[0]
    with torch.no_grad():
        want = ref(pixel_values=processor(images=pil(x), return_tensors="pt").pixel_values).pooler_output
    assert rel_err(net.extract(net.model, x), want) < 1e-5
    assert net.name == f"rad-dino {tmp_path.name}" and net.dim == 64 and net.official is None


def test_rad_dino_full_size_equals_transformers(tmp_path):
    """microsoft/rad-dino's own sizes (ViT-B/14, 768 wide, 12 layers, 518 px) with random weights."""
    ref = rad_dino_release(tmp_path, 518)
    net = load_network("rad-dino", encoder=str(tmp_path))
    x = images((600, 530))[0]
    with torch.no_grad():
        pixels = AutoImageProcessor.from_pretrained(tmp_path)(images=pil(x), return_tensors="pt").pixel_values
        want = ref(pixel_values=pixels).pooler_output
    assert rel_err(net.extract(net.model, x), want) < 1e-5   # 12 layers of float32: measured 0 here


def xrv_prepared(x: torch.Tensor) -> torch.Tensor:
    """torchxrayvision's README on an 8-bit image: normalize(img, 255), mean of the channels, crop, resize."""
    img = xrv.datasets.normalize(x[0].permute(1, 2, 0).numpy(), 255).mean(2)[None, ...]
    transform = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)])
    return torch.from_numpy(transform(img))


# 0.026 of 1024 at most (2.5e-5 relative), measured: scipy filters and interpolates in float64, we in float32.
@pytest.mark.parametrize("size", [(300, 260), (512, 700), (224, 224), (1000, 999), (200, 210), (100, 37)])
def test_xrv_preparation_equals_torchxrayvision(size):
    """Shrinking (Gaussian then linear, odd and even margins), the native size, enlarging (the border blended with
    0, as scipy's "constant" mode does)."""
    x = images(size, seed=1)[0]
    ours, want = densenet.prepare(x)[0], xrv_prepared(x)
    assert ours.shape == want.shape == (1, 224, 224)
    assert (ours - want).abs().max() <= 0.05


def xrv_reference(seed: int = 0, **config) -> xrv.models.DenseNet:
    """xrv's DenseNet with random weights and batch-norm statistics (the defaults 0/1 would hide a swap)."""
    torch.manual_seed(seed)
    ref = randomize_(xrv.models.DenseNet(**config)).eval()
    for module in ref.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return ref


@pytest.mark.parametrize("config", [TINY_DENSENET, {}], ids=["tiny", "densenet121"])
def test_xrv_densenet_equals_torchxrayvision(config, tmp_path):
    """Our features of uint8 images = xrv's features2 on xrv's own preparation. The file is the state dict xrv's
    network saves once loaded (op_threshs included, as densenet_load.CONVERT writes it)."""
    ref = xrv_reference(**config)
    ref.op_threshs = torch.rand(18)
    torch.save(ref.state_dict(), tmp_path / "xrv.pt")
    ours = densenet_load.load_densenet(tmp_path / "xrv.pt", densenet.DenseNetConfig(**config))
    batch = torch.cat(images((256, 256), (256, 256), seed=2))
    with torch.no_grad():
        want = ref.features2(torch.stack([xrv_prepared(x[None]) for x in batch]))
    # measured 2e-6: the same float32 network; the preparations differ by <= 2.5e-5 of their range (above)
    assert rel_err(densenet.features(ours, batch), want) < 1e-4
    assert want.shape[1] == ours.feature_dim


def test_xrv_through_load_network(tmp_path):
    ref = xrv_reference()
    torch.save(ref.state_dict(), tmp_path / "weights.pt")
    net = load_network("xrv", encoder=str(tmp_path / "weights.pt"))
    assert net.name == "xrv weights.pt" and net.dim == 1024 and net.official is None


def test_refusals_are_one_line(tmp_path):
    """Missing weights (offline or not: there is no download), the release's pickled model, another network's
    file, and a folder of another network for RAD-DINO."""
    with pytest.raises(LoadError, match=r"xrv features need torchxrayvision's densenet121-res224-all weights as "
                       r"tensors: save its tensors once with torchxrayvision \(python -c .*; it downloads https://"):
        load_network("xrv")
    whole = tmp_path / "release.pt"
    torch.save(xrv_reference(**TINY_DENSENET), whole)   # the release's form: a pickled model object
    with pytest.raises(LoadError, match="release pickles the whole model, which minisd does not unpickle"):
        load_network("xrv", encoder=str(whole))
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(LoadError, match="unknown key conv.weight -- not torchxrayvision's DenseNet-121"):
        load_network("xrv", encoder=str(tmp_path / "other.pt"))
    rad_dino_release(tmp_path / "rd", 28, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = json.loads((tmp_path / "rd" / "config.json").read_text())
    (tmp_path / "rd" / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    with pytest.raises(LoadError, match=r"model_type \"vit\", not \"dinov2\" .* microsoft/rad-dino release .* "
                       r"to encoder="):
        load_network("rad-dino", encoder=str(tmp_path / "rd"))
    (tmp_path / "rd" / "preprocessor_config.json").unlink()
    with pytest.raises(LoadError, match="no preprocessor_config.json; a microsoft/rad-dino folder holds"):
        load_network("rad-dino", encoder=str(tmp_path / "rd"))


def test_rad_dino_offline_says_what_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(LoadError, match=r"microsoft/rad-dino: not downloaded yet and HF_HUB_OFFLINE is set; .*fetch "
                       r"config.json and model.safetensors and preprocessor_config.json from .*/microsoft/rad-dino"):
        load_network("rad-dino")


def test_a_processor_at_another_size_is_refused(tmp_path):
    rad_dino_release(tmp_path, 28, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    processor["crop_size"] = {"height": 14, "width": 14}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(LoadError, match=r"crop_size \[14, 14\] is not config.json's image_size 28"):
        load_network("rad-dino", encoder=str(tmp_path))


def test_side_by_side_through_the_cli(tmp_path, capsys):
    """--features dinov2,xrv: each network's figures in report.json's by_features and report.md's table, each
    equal to the metrics on that network's own features; PRDC beside FID/KID/PR."""
    from test_evaluate import _uint8, _write_set
    from transformers import Dinov2Config as Config

    from medti import evaluate
    from medti.quality import metrics
    torch.manual_seed(0)
    randomize_(Dinov2Model(Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=14,
                                  image_size=98))).save_pretrained(tmp_path / "dino")
    torch.save(xrv_reference().state_dict(), tmp_path / "xrv.pt")
    real, fake = _write_set(tmp_path / "r", 8, seed=1), _write_set(tmp_path / "f", 8, seed=2)
    out = tmp_path / "o"
    args = ["--real", str(real), "--fake", str(fake), "--out", str(out), "--kid-subset-size", "4"]
    assert evaluate.main([*args, "--features", "dinov2,xrv", "--encoder", f"dinov2={tmp_path / 'dino'}",
                          "--encoder", f"xrv={tmp_path / 'xrv.pt'}"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["by_features"]) == ["dinov2", "xrv"] and report["features"] == "dinov2 dino"
    net = load_network("xrv", encoder=str(tmp_path / "xrv.pt"))
    ours = report["by_features"]["xrv"]
    want = metrics.prdc(net.extract(net.model, _uint8(real)), net.extract(net.model, _uint8(fake)), k=5)
    assert {k: ours["prdc"][k] for k in want} == pytest.approx(want, abs=1e-12)   # float32 features, same code
    assert ours["features"] == "xrv xrv.pt" and "| xrv xrv.pt |" in (out / "report.md").read_text()
    assert "PRDC coverage" in (out / "report.md").read_text()
    for bad, says in ((["--features", "xrv"], "xrv features need torchxrayvision's densenet121-res224-all"),
                      (["--features", "dinov2,xrv", "--encoder", str(tmp_path / "dino")],
                       "say which of dinov2, xrv it is for, e.g. --encoder xrv="),
                      (["--features", "xrv,radd"], "'radd' is unknown; give one or more of")):
        assert evaluate.main([*args, *bad]) == 2   # a user error
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and says in errors[0], errors
