"""The image conditioning's projection, its file, and condition dropout (minisd/image_conditioning.py).

The projection path is SD2's: a 768-wide DINO encoder (ViT-B's width, one layer) into a UNet whose context is 1024
wide. The model around it is tiny (conftest's UNet and VAE with context_dim 1024, a one-layer 1024-wide text tower),
built with minisd.build; what is checked is the projection, its seeded start, its file and the refusals.
"""
import json

import pytest
import torch
from safetensors.torch import save_file
from test_dino import image
from test_image_conditioning import encoder_release, reference_tokens

import minisd
from conftest import TINY_CONFIG, rel_err
from minisd.config import LoadError
from minisd.dino_load import load_encoder
from minisd.image_conditioning import attach
from minisd.load import state_dict

WIDE = {**TINY_CONFIG, "unet": {**TINY_CONFIG["unet"], "context_dim": 1024},
        "text": {"tower": "openai", "hidden_size": 1024, "intermediate_size": 64, "num_hidden_layers": 1,
                 "num_attention_heads": 16, "vocab_size": 1000}}


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """(SD2-like tiny model made image-conditioned by a 768-wide encoder, the reference encoder, its folder,
    a saved file of the model)."""
    folder = tmp_path_factory.mktemp("vitb")
    ref = encoder_release(folder, width=768, heads=12, layers=1, size=28)
    torch.manual_seed(0)
    sd = minisd.build(minisd.load_config(WIDE), device="cpu")
    attach(sd, str(folder), load_encoder(folder), seed=7)
    path = tmp_path_factory.mktemp("wide") / "model.safetensors"
    save_file(state_dict(sd), str(path), metadata=sd.image.metadata())
    return sd, ref, folder, path


def images():
    return torch.cat([image(60, 50, 0), image(60, 50, 1)])


@torch.no_grad()
def test_projection_maps_the_tokens_into_the_context(wide):
    sd, ref, folder, _ = wide
    proj = sd.image.proj
    assert sd.image.cfg.projection and proj.weight.shape == (1024, 768) and proj.bias.shape == (1024,)
    assert set(k for k in state_dict(sd) if k.startswith("image_proj.")) == {"image_proj.weight", "image_proj.bias"}
    # context = tokens @ W^T + b, in float64 from transformers' tokens. Tolerance 1e-5: a 768-term float32 dot
    # product rounds to about sqrt(768) ulps of its scale (~3e-6); the tokens themselves agree to 1e-6.
    tokens = reference_tokens(ref, folder, images())[0].double()
    expected = tokens @ proj.weight.double().T + proj.bias.double()
    context = sd.image(images())
    assert context.shape == (2, 5, 1024) and rel_err(context, expected) < 1e-5
    # interpolation: the projection is affine, so the lerp of the tokens projected = the lerp of the contexts, up to
    # the rounding of the 768-term dot products on each side (the bound above; measured 1e-6)
    mixed = sd.image.mix(images()[:1], images()[1:], [0.3])
    assert rel_err(mixed, torch.lerp(context[:1], context[1:], 0.3)) < 1e-5
    assert sd.image.null(2).shape == (2, 5, 1024) and not sd.image.null(2).any()


def test_projection_start_is_seeded_and_stated(wide, tmp_path):
    """weight ~ N(0, 1/768), bias 0, from the seed alone. The sample std of 786,432 draws is within 0.1 % of the
    true one at 1 sigma (sigma / sqrt(2n)); 1 % is 12 sigma."""
    sd, _, folder, _ = wide
    weight = sd.image.proj.weight.detach()
    assert abs(weight.std().item() * 768 ** 0.5 - 1) < 0.01 and abs(weight.mean().item()) < 1e-3
    assert not sd.image.proj.bias.any()
    again = minisd.build(minisd.load_config(WIDE), device="cpu")
    attach(again, str(folder), sd.image.encoder, seed=7)
    other = minisd.build(minisd.load_config(WIDE), device="cpu")
    attach(other, str(folder), sd.image.encoder, seed=8)
    assert torch.equal(again.image.proj.weight, weight) and not torch.equal(other.image.proj.weight, weight)


def test_no_projection_where_the_widths_agree(wide, tmp_path):
    """A 32-wide encoder into the 32-wide tiny UNet: the tokens go in as they are; nothing is saved for them."""
    folder = tmp_path / "enc32"
    encoder_release(folder, size=28)
    sd = minisd.build(minisd.load_config(TINY_CONFIG), device="cpu")
    attach(sd, str(folder), load_encoder(folder))
    assert sd.image.proj is None and not sd.image.cfg.projection
    assert not any(k.startswith("image_proj.") for k in state_dict(sd))
    assert torch.equal(sd.image(images()), sd.image.tokens(images()))
    with pytest.raises(ValueError, match="image-conditioned already"):
        attach(sd, str(folder), sd.image.encoder)


@torch.no_grad()
def test_saved_file_loads_back(wide):
    sd, _, folder, path = wide
    loaded = minisd.load(path, config=WIDE, encoder=folder)
    # a local encoder folder is stated by its name alone: the file is shared, and no path may leave with it
    assert loaded.image.cfg == sd.image.cfg and loaded.image.cfg.encoder == folder.name
    assert str(folder.parent) not in json.dumps(sd.image.metadata())
    assert torch.equal(loaded.image.proj.weight, sd.image.proj.weight)
    assert torch.equal(loaded.image(images()), sd.image(images()))
    with pytest.raises(LoadError, match=f"local encoder folder.*name \\({folder.name}\\): pass that folder as encoder"):
        minisd.load(path, config=WIDE)   # the name alone is not where the folder is


def rewrite(wide, tmp_path, drop=(), replace=None, metadata=None):
    """The saved model with keys left out, tensors replaced, or other metadata."""
    sd = wide[0]
    state = {k: v for k, v in state_dict(sd).items() if k not in drop}
    state.update(replace or {})
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path), metadata=sd.image.metadata() if metadata is None else metadata)
    return path


def entry(**changes):
    data = {"encoder": "x", "width": 768, "count": 5, "tokens": "global", "projection": True, **changes}
    return {"image_condition": json.dumps({k: v for k, v in data.items() if v is not None})}


BAD = {
    "projection of another width": (dict(replace={"image_proj.weight": torch.zeros(1024, 64)}),
                                    "image_proj.weight has shape [1024, 64], expected [1024, 768] -- the encoder "
                                    "width its metadata"),
    "projection without metadata": (dict(metadata={}), "unexpected key image_proj.bias -- this looks like an "
                                    "image-conditioned model whose metadata lost its image_condition entry"),
    "metadata without projection": (dict(drop=("image_proj.weight", "image_proj.bias")),
                                    "missing key image_proj.bias (and 1 more)"),
    "projection false": (dict(metadata=entry(projection=False)), "image_condition says projection false, but encoder "
                         "width 768 into unet.context_dim 1024 needs one"),
    "not JSON": (dict(metadata={"image_condition": "{"}), "metadata image_condition is not a JSON object"),
    "unknown field": (dict(metadata=entry(patches=True)), "has unknown field patches"),
    "missing field": (dict(metadata=entry(count=None)), "has no field count"),
    "width as text": (dict(metadata=entry(width="768")), "image_condition.width must be a positive int, not \"768\""),
    "other tokens": (dict(metadata=entry(tokens="patch")), "image_condition.tokens \"patch\" is not a rule"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_files_are_one_line(wide, tmp_path, case):
    changes, words = BAD[case]
    path = rewrite(wide, tmp_path, **changes)
    with pytest.raises(LoadError) as info:
        minisd.load(path, config=WIDE)
    message = str(info.value)
    assert message.startswith(str(path)) and words in message and "\n" not in message


def test_encoder_of_another_release_is_refused(wide, tmp_path):
    _, _, _, path = wide
    encoder_release(tmp_path / "enc32", size=28)
    with pytest.raises(LoadError, match=r"encoder=.*enc32: gives 5 tokens of width 32; the model was trained on 5 of "
                                        r"width 768 from .* -- pass a copy of that release"):
        minisd.load(path, config=WIDE, encoder=tmp_path / "enc32")


def test_text_model_has_no_image_conditioning(tiny, tmp_path):
    _, sd = tiny
    assert sd.image is None
    with pytest.raises(LoadError, match="a text-conditioned model .* leave out encoder="):
        minisd.load(sd.path, config=TINY_CONFIG, encoder=tmp_path)


def test_drop_rate_and_seed(wide):
    """Each row becomes the null with probability p, from the generator: over n = 20,000 rows at p = 0.1 the count
    is Binomial(n, p), mean 2,000, sd 42.4; the bound is 5 sd (a false failure once in 1.7 million seeds)."""
    sd = wide[0]
    n, p = 20_000, 0.1
    context = torch.arange(1.0, n + 1)[:, None, None].expand(n, 5, 1024)   # no row is zero before
    out = sd.image.drop(context, p, torch.Generator().manual_seed(3))
    dropped = (out == 0).all(dim=(1, 2))
    assert abs(int(dropped.sum()) - n * p) <= 5 * (n * p * (1 - p)) ** 0.5
    assert torch.equal(out[~dropped], context[~dropped]) and not out[dropped].any()
    assert torch.equal(sd.image.drop(context, p, torch.Generator().manual_seed(3)), out)          # seeded
    assert not torch.equal(sd.image.drop(context, p, torch.Generator().manual_seed(4)), out)
    assert torch.equal(sd.image.drop(context, 0.0, torch.Generator()), context)
    assert not sd.image.drop(context, 1.0, torch.Generator()).any()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="p must be a probability"):
            sd.image.drop(context, bad, torch.Generator())
