"""`python -m medti.generate --condition-image` on a tiny image-conditioned model: variations of a case and
interpolations between two (medti/generation/variations.py), against the pieces they are made of and diffusers.

The model is the conftest's tiny SD2-shaped model saved with the `image_condition` metadata naming a local encoder
folder by its name only, as a training save writes it, so every run passes the folder with --encoder. The encoder
is test_image_conditioning's random DINOv2-with-registers release, 32 wide like the UNet's context.

Tolerances: the CLI against medti.generation.pipeline.sample on the same tokens is exact (--no-pack: the same float
operations in the same order, on one thread count: conftest); against diffusers, 1e-4 of the latents' scale, the
sampler comparisons' tolerance (test_image_conditioning.py says why it covers the token error of 1e-6).
"""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from safetensors.torch import load_file
from test_dino import image
from test_image_conditioning import (
    CFG,
    PIXELS,
    STEPS,
    encoder_release,
    reference_latents,
    reference_tokens,
    with_image_metadata,
)
from test_names import readable

import minisd
from conftest import TINY_CONFIG, rel_err, write_official
from medti.dataset.folder import load_dataset
from medti.files.images import load_image
from medti.generate import main
from medti.generation.pipeline import InitImage, SampleSettings, sample
from medti.medical.window import PRESETS, parse_window
from medti.training.objective import to_uint8

MARKER = "DOE_JANE_MRN777"   # a patient's name in the source's file and folder names: no shared output may hold it
SETTINGS = SampleSettings(width=PIXELS, height=PIXELS, steps=STEPS, cfg=CFG, sampler="dpmpp_2m")


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    refs, _ = tiny
    root = tmp_path_factory.mktemp("variations")
    encoder = root / "dino-local"
    ref_encoder = encoder_release(encoder)
    entry = json.dumps({"encoder": encoder.name, "width": 32, "count": 5, "tokens": "global", "projection": False})
    model = with_image_metadata(write_official(root / "model.safetensors", **refs), {"image_condition": entry})
    (root / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    cases = root / MARKER
    cases.mkdir()
    for seed in (0, 1):   # already the generated size, so --preprocess center leaves the pixels as they are
        Image.fromarray(image(PIXELS, PIXELS, seed)[0].permute(1, 2, 0).numpy()).save(cases / f"{MARKER}_{seed}.png")
    sd = minisd.load(model, config=root / "tiny.json", encoder=encoder)
    return dict(refs=refs, root=root, model=model, encoder=encoder, ref_encoder=ref_encoder, sd=sd,
                a=cases / f"{MARKER}_0.png", b=cases / f"{MARKER}_1.png")


def run(files, out, *extra, model=None, encoder=True):
    return main(["--model", str(model or files["model"]), "--config", str(files["root"] / "tiny.json"),
                 *(["--encoder", str(files["encoder"])] if encoder else []), "--size", str(PIXELS),
                 "--steps", str(STEPS), "--cfg", str(CFG),
                 "--sampler", "dpmpp_2m", "--no-pack", "--save-latents", "--out", str(out), *extra])


def latents(out, count: int) -> torch.Tensor:
    return torch.stack([load_file(out / f"{i:05d}.safetensors")["latent"] for i in range(count)])


def pixels(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].contiguous()


def records(out) -> list:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_variations_are_the_pipeline_on_the_case_tokens_and_diffusers(files, tmp_path):
    out = tmp_path / "out"
    assert run(files, out, "--condition-image", str(files["a"]), "--n", "2", "--seed", "10", "--grid",
               "--format", "dicom") == 0
    sd, case = files["sd"], pixels(files["a"])
    # one image per UNet call, as the CLI's default --batch 0 samples them
    ours = torch.cat([sample(sd, sd.image(case), sd.image.null(1), [1.0], [seed], SETTINGS) for seed in (10, 11)])
    assert torch.equal(latents(out, 2), ours)
    tokens = reference_tokens(files["ref_encoder"], files["encoder"], case)[0]
    err = rel_err(latents(out, 2), reference_latents(files["refs"], "dpmpp_2m", "eps", tokens))
    assert err <= 1e-4, f"CLI variations against diffusers: relative error {err:.2e}"
    digest = sha(files["a"])
    for rec in records(out):
        assert rec["condition"] == [{"pseudonym": "img-" + digest[:12], "sha256": digest}] and rec["prompt"] == ""
    assert Image.open(out / "grid.png").size[0] == 3 * PIXELS   # the case, then its two variations
    shared = [p for p in out.rglob("*") if p.is_file() and ".private." not in p.name]
    assert len(shared) >= 8 and not [p.name for p in shared if MARKER.encode() in readable(p)]
    assert str(files["a"]).encode() in (out / "names.private.tsv").read_bytes()


def test_mix_is_the_pipeline_on_lerped_tokens(files, tmp_path):
    out = tmp_path / "mix"
    assert run(files, out, "--condition-image", str(files["a"]), "--condition-image", str(files["b"]),
               "--mix", "0,0.4,1", "--seed", "5", "--grid") == 0
    sd = files["sd"]
    mixed = sd.image.mix(pixels(files["a"]), pixels(files["b"]), [0.0, 0.4, 1.0])
    expected = torch.cat([sample(sd, mixed[c:c + 1], sd.image.null(1), [1.0], [5], SETTINGS) for c in range(3)])
    assert torch.equal(latents(out, 3), expected)
    assert [rec["mix"] for rec in records(out)] == [0.0, 0.4, 1.0]
    assert [c["sha256"] for c in records(out)[1]["condition"]] == [sha(files["a"]), sha(files["b"])]
    assert Image.open(out / "grid.png").size[0] == 5 * PIXELS   # a | three fractions | b


def test_a_dicom_case_is_read_as_training_reads_it(files, tmp_path):
    """A real CT file (pydicom's test data): the context is the one of the image training would cache."""
    folder = tmp_path / MARKER
    folder.mkdir()
    dicom = folder / f"{MARKER}.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), dicom)
    out = tmp_path / "out"
    assert run(files, out, "--condition-image", str(dicom), "--window", "40,400") == 0
    data = load_dataset(folder, PIXELS, "center", window=parse_window("40,400"))
    sd = files["sd"]
    expected = sample(sd, sd.image(to_uint8(data.images)), sd.image.null(1), [1.0], [0], SETTINGS)
    assert torch.equal(latents(out, 1), expected)
    assert records(out)[0]["condition"][0]["sha256"] == sha(dicom)


def test_img2img_of_a_variation_is_the_pipeline_with_the_init_image(files, tmp_path):
    assert run(files, tmp_path, "--condition-image", str(files["a"]), "--init-image", str(files["b"]),
               "--strength", "0.6") == 0
    sd = files["sd"]
    init = InitImage(load_image(files["b"], PIXELS, PIXELS), None, 0.6)
    expected = sample(sd, sd.image(pixels(files["a"])), sd.image.null(1), [1.0], [0], SETTINGS, init)
    assert torch.equal(latents(tmp_path, 1), expected)


def test_resume_continues_and_refuses_another_case(files, tmp_path, capsys):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert run(files, out, "--condition-image", str(files["a"]), "--n", "1") == 0
    first = (out / "00000.png").read_bytes()
    assert run(files, out, "--condition-image", str(files["a"]), "--n", "2", "--resume") == 0
    assert run(files, fresh, "--condition-image", str(files["a"]), "--n", "2") == 0
    assert (out / "00000.png").read_bytes() == first
    assert (out / "00001.png").read_bytes() == (fresh / "00001.png").read_bytes()
    capsys.readouterr()
    assert run(files, out, "--condition-image", str(files["b"]), "--n", "2", "--resume") == 2
    err = capsys.readouterr().err
    assert "--condition-image" in err and f"(now img-{sha(files['b'])[:12]})" in err and MARKER not in err


def nifti(path, depth: int = 6):
    """A small volume (nibabel, the field's reader): `depth` axial slices of 64 x 64, each its own pattern."""
    import nibabel
    data = np.stack([image(PIXELS, PIXELS, k)[0, 0].numpy() for k in range(depth)], axis=-1).astype(np.int16)
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), str(path))
    return path


@pytest.fixture(scope="module")
def others(files):
    """A text model (the same weights without the metadata), another network's encoder, a broken image, a volume."""
    root = files["root"]
    text = write_official(root / "text.safetensors", **files["refs"])
    encoder_release(root / "dino-wide", width=48)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return dict(text=text, wide=root / "dino-wide", broken=root / "broken.png", volume=nifti(root / "volume.nii.gz"))


def test_a_volume_gives_its_middle_slice(files, others, tmp_path):
    assert run(files, tmp_path, "--condition-image", str(others["volume"])) == 0
    data = load_dataset(others["volume"].parent, PIXELS, "center", slices="middle:1")   # what training would read
    [row] = [i for i, name in enumerate(data.names) if name.startswith("volume.nii.gz")]
    sd = files["sd"]
    expected = sample(sd, sd.image(to_uint8(data.images[row:row + 1])), sd.image.null(1), [1.0], [0], SETTINGS)
    assert torch.equal(latents(tmp_path, 1), expected)


@pytest.mark.parametrize("case,words", [
    ("text-model", "text.safetensors is a text model (its file states no image condition); give --prompt"),
    ("prompt-only", "is image-conditioned (encoder dino-local): it reads no prompt; give --condition-image"),
    ("prompt-and-image", "--prompt and --condition-image were given together"),
    ("mix-one", "give exactly two --condition-image, not 1"),
    ("mix-range", "--mix 0.5,1.5: each fraction must be in [0, 1]"),
    ("mix-text", "--mix 'a,b': expected numbers"),
    ("unreadable", "--condition-image {broken}: not an image PIL can read"),
    ("missing", "--condition-image {root}/nope.png: no such file"),
    ("other-encoder", "--encoder {wide}: gives 5 tokens of width 48"),
    ("no-encoder", "pass that folder as --encoder"),
    ("several-slices", "gives 6 slices of this volume; a condition is one image"),
    ("window-alone", "--window is for an image-conditioned model's --condition-image"),
    ("negative", "--negative: an image-conditioned model reads no prompt"),
])
def test_refusals_are_one_line_before_any_image(files, others, tmp_path, capsys, case, words):
    a, root = str(files["a"]), str(files["root"])
    argv = {"text-model": ["--condition-image", a], "prompt-only": ["--prompt", "x"],
            "prompt-and-image": ["--prompt", "x", "--condition-image", a],
            "mix-one": ["--condition-image", a, "--mix", "0.5"],
            "mix-range": ["--condition-image", a, "--condition-image", a, "--mix", "0.5,1.5"],
            "mix-text": ["--condition-image", a, "--condition-image", a, "--mix", "a,b"],
            "unreadable": ["--condition-image", str(others["broken"])],
            "missing": ["--condition-image", f"{root}/nope.png"],
            "other-encoder": ["--condition-image", a, "--encoder", str(others["wide"])],
            "no-encoder": ["--condition-image", a],
            "several-slices": ["--condition-image", str(others["volume"]), "--slices", "all"],
            "window-alone": ["--prompt", "x", "--window", "lung"],
            "negative": ["--condition-image", a, "--negative", "blurry"]}[case]
    model = others["text"] if case in ("text-model", "window-alone") else None
    given = "--encoder" in argv or case in ("text-model", "window-alone", "no-encoder")   # else the model's own
    capsys.readouterr()
    assert run(files, tmp_path / "out", *argv, model=model, encoder=not given) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert words.format(**others, root=root) in err, err
    assert not list(tmp_path.rglob("*.png"))


def test_window_help_names_every_preset(capsys):
    """--help lists the window names --window accepts (it named 4 of the 7 that training and generation read)."""
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())   # argparse wraps the text: compare it unwrapped
    assert f"CENTER,WIDTH or {', '.join(PRESETS)}" in help_text
