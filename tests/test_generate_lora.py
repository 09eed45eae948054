"""`python -m medti.generate --lora FILE[:WEIGHT]` and `<lora:NAME:WEIGHT>` on the tiny SD2 pipeline of test_lora.py
(a diffusers folder: our side reads it with minisd.load, the references are the same weights in diffusers).

References, each independent of minisd.lora and medti.files.lora_file:
  * by hand: W += w * alpha / r * up @ down on the diffusers modules, by kohya's names (diffusers module path with
    "." -> "_"), saved as a diffusers folder and generated from without --lora;
  * diffusers: load_lora_weights + set_adapters(weight) + fuse_lora + unload_lora_weights, saved likewise.
Tolerance TOL_LATENT = 1e-5 of the latents' max |value| after 3 Euler-a steps: the merged weights agree to float32
rounding (the same sums in another order), which the sampler carries through; a wrong scale (alpha vs alpha / r,
weight not applied) or a missing layer moves the latents by 1e-2 or more (`moved` below checks the LoRA matters).
"""
import hashlib
import json
import shutil

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_lora import moved, tiny
from test_lora_files import kohya_file

from conftest import rel_err
from medti.generate import main

TOL_LATENT = 1e-5
PROMPT = "chest x-ray"


def make_files(tmp) -> dict:
    """{"base": diffusers folder, "a", "b": kohya LoRA files for it (UNet and text tower, every layer kind)}."""
    pipe, _ = tiny("sd2", tmp)   # saves the folder tmp / "sd2"
    loras = tmp / "loras"
    loras.mkdir()
    return {"tmp": tmp, "base": tmp / "sd2", "a": kohya_file(pipe, loras / "a.safetensors", seed=3),
            "b": kohya_file(pipe, loras / "b.safetensors", seed=4)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("genlora"))


def generate(model, out, *extra, prompt=PROMPT):
    return main(["--model", str(model), "--prompt", prompt, "--steps", "3", "--seed", "5", "--save-latents",
                 "--out", str(out), *extra])


def latent(out):
    return load_file(str(out / "00000.safetensors"))["latent"]


def pixels(out):
    return torch.from_numpy(np.array(Image.open(out / "00000.png"))).float()


def by_hand(files, weights: dict, tmp):
    """A diffusers folder whose weights are W + w * alpha / r * up @ down for every layer of each file, computed
    here on the diffusers modules (kohya names = diffusers module paths with "." -> "_")."""
    tmp.mkdir()
    pipe, _ = tiny("sd2", tmp)
    text = pipe.text_encoder
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in pipe.unet.named_modules()}
    prefix = "" if hasattr(text, "text_model") else "text_model."   # transformers 5 dropped that level
    modules |= {"lora_te_" + (prefix + n).replace(".", "_"): m for n, m in text.named_modules()}
    with torch.no_grad():
        for name, weight in weights.items():
            tensors = load_file(str(files[name]))
            for key in [k for k in tensors if k.endswith(".lora_down.weight")]:
                base = key.removesuffix(".lora_down.weight")
                down, up = tensors[key].flatten(1).double(), tensors[f"{base}.lora_up.weight"].flatten(1).double()
                scale = weight * float(tensors[f"{base}.alpha"]) / down.shape[0]
                layer = modules[base].weight
                layer.copy_((layer.double() + scale * (up @ down).reshape(layer.shape)).float())
    pipe.save_pretrained(tmp / "merged")
    return tmp / "merged"


def by_diffusers(files, weights: dict, tmp):
    """The same merge done by diffusers: load_lora_weights, set_adapters, fuse_lora, unload_lora_weights."""
    tmp.mkdir()
    pipe, _ = tiny("sd2", tmp)
    for name in weights:
        pipe.load_lora_weights(str(files[name]), adapter_name=name)
    pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
    pipe.fuse_lora(components=["unet", "text_encoder"])
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp / "fused")
    return tmp / "fused"


def test_lora_flag_equals_hand_merge_and_diffusers_fuse(files, tmp_path):
    assert generate(files["base"], tmp_path / "plain") == 0
    assert generate(files["base"], tmp_path / "lora", "--lora", f"{files['a']}:0.7") == 0
    ours = latent(tmp_path / "lora")
    assert moved(ours, latent(tmp_path / "plain")) > 1e-2   # the LoRA does move the image
    for name, folder in (("hand", by_hand(files, {"a": 0.7}, tmp_path / "h")),
                         ("diffusers", by_diffusers(files, {"a": 0.7}, tmp_path / "d"))):
        assert generate(folder, tmp_path / name) == 0
        assert rel_err(ours, latent(tmp_path / name)) < TOL_LATENT, name
        assert (pixels(tmp_path / "lora") - pixels(tmp_path / name)).abs().max() <= 1, name   # 8-bit rounding


def test_prompt_tag_equals_flag(files, tmp_path):
    assert generate(files["base"], tmp_path / "flag", "--lora", f"{files['a']}:0.7") == 0
    assert generate(files["base"], tmp_path / "tag", "--lora-dir", str(files["a"].parent),
                    prompt=f"{PROMPT} <lora:a:0.7>") == 0
    assert torch.equal(latent(tmp_path / "flag"), latent(tmp_path / "tag"))
    # a --lora file is found by its stem too; flag and tag mentions of one file add up (0.3 + 0.4 = 0.7)
    assert generate(files["base"], tmp_path / "both", "--lora", f"{files['a']}:0.3",
                    prompt=f"<lora:a:0.4>{PROMPT}") == 0
    assert rel_err(latent(tmp_path / "both"), latent(tmp_path / "flag")) < TOL_LATENT
    text = Image.open(tmp_path / "tag" / "00000.png").text["parameters"]
    assert text.splitlines()[0] == f"{PROMPT} <lora:a:0.7>"   # the prompt keeps its tags, as A1111's infotext does


def test_two_loras_in_either_order(files, tmp_path):
    a, b = f"{files['a']}:0.7", f"{files['b']}:-0.5"
    assert generate(files["base"], tmp_path / "ab", "--lora", a, "--lora", b) == 0
    assert generate(files["base"], tmp_path / "ba", "--lora", b, "--lora", a) == 0
    assert rel_err(latent(tmp_path / "ab"), latent(tmp_path / "ba")) < TOL_LATENT
    assert generate(by_hand(files, {"a": 0.7, "b": -0.5}, tmp_path / "h"), tmp_path / "hand") == 0
    assert rel_err(latent(tmp_path / "ab"), latent(tmp_path / "hand")) < TOL_LATENT


def addnet_hash(path) -> str:
    """kohya's / A1111's LoRA hash, computed here: sha256 of what follows the safetensors header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def test_parameters_and_manifest_record_each_lora(files, tmp_path):
    assert generate(files["base"], tmp_path, "--lora", f"{files['a']}:0.7", "--lora-dir", str(files["a"].parent),
                    "--format", "dicom", prompt=f"{PROMPT} <lora:b:0.25>") == 0
    text = Image.open(tmp_path / "00000.png").text["parameters"]
    assert text in pydicom.dcmread(tmp_path / "00000.dcm").ImageComments   # the DICOM's comments list the same
    settings = text.splitlines()[-1]
    assert f'Lora hashes: "a: {addnet_hash(files["a"])[:12]}, b: {addnet_hash(files["b"])[:12]}"' in settings
    assert 'Lora weights: "a: 0.7, b: 0.25"' in settings
    record = json.loads((tmp_path / "manifest.jsonl").read_text())
    assert [(r["name"], r["sha256"], r["weight"]) for r in record["loras"]] == [
        (n, hashlib.sha256(files[n].read_bytes()).hexdigest(), w) for n, w in (("a", 0.7), ("b", 0.25))]


def sd1_lora(files, tmp):
    """A LoRA made for SD1: its cross-attention to_k reads 768-wide text (this model's text is 32 wide)."""
    with safe_open(str(files["a"]), framework="pt") as f:
        key = next(k for k in f.keys() if "attn2_to_k.lora_down" in k).removesuffix(".lora_down.weight")
    save_file({f"{key}.lora_down.weight": torch.randn(4, 768), f"{key}.lora_up.weight": torch.randn(32, 4)},
              str(tmp / "sd1.safetensors"))
    return tmp / "sd1.safetensors"


def sd1_by_metadata(files, tmp):
    """Shapes that fit this tiny model, but kohya's metadata says SD1 (ss_v2 False)."""
    save_file(load_file(str(files["a"])), str(tmp / "v1.safetensors"), metadata={"ss_v2": "False"})
    return tmp / "v1.safetensors"


# case -> (flags, prompt, words the one-line error must hold); "{tmp}" / "{a}": the test's folder / LoRA file a
MISTAKES = {
    "missing": (["--lora", "{tmp}/none.safetensors:0.5"], PROMPT, "--lora {tmp}/none.safetensors:0.5: no such file"),
    "junk": (["--lora", "{tmp}/junk.safetensors"], PROMPT, "not a readable LoRA file"),
    "sd1": (["--lora", "{tmp}/sd1.safetensors"], PROMPT, "768 (SD1.x)"),
    "sd1-meta": (["--lora", "{tmp}/v1.safetensors"], PROMPT, "made for SD1 (its metadata ss_v2 is False); this model"),
    "no-file-tag": ([], f"{PROMPT} <lora:nothere:0.5>", "--prompt tag <lora:nothere:0.5>: no LoRA file named"),
    "nan-flag": (["--lora", "{a}:nan"], PROMPT, "--lora {a}:nan: weight 'nan' is not finite"),
    "word-flag": (["--lora", "{a}:strong"], PROMPT, "weight 'strong' is not a number"),
    "inf-tag": ([], f"{PROMPT} <lora:a:inf>", "--prompt tag <lora:a:inf>: weight 'inf' is not finite"),
    "te-unet-tag": ([], f"{PROMPT} <lora:a:1:0.5>", "<lora:NAME:TE:UNET>, are not supported"),
    "dir": (["--lora-dir", "{tmp}/nowhere"], PROMPT, "--lora-dir {tmp}/nowhere: not a folder"),
    "negative": (["--negative", "<lora:a:1> blurry"], PROMPT, "--negative: <lora:a:1> belongs in --prompt"),
    # values that made NaN images blamed on the model: each is refused in one line naming the file
    "alpha-nan": (["--lora", "{tmp}/alpha-nan.safetensors"], PROMPT, "has alpha nan; kohya stores one finite"),
    "alpha-vector": (["--lora", "{tmp}/alpha-vector.safetensors"], PROMPT, "has alpha of shape [3]"),
    "alpha-huge": (["--lora", "{tmp}/alpha-huge.safetensors"], PROMPT, "has alpha 1e+38 on rank 4, a scale of"),
    "int-weights": (["--lora", "{tmp}/int-weights.safetensors"], PROMPT, "holds torch.int64/torch.float32 weights"),
    "weight-huge": (["--lora", "{a}:1e30"], PROMPT, "weight 1e+30 is beyond +-100"),
    "tag-weight-huge": ([], f"{PROMPT} <lora:a:-1e30>", "--prompt tag <lora:a:-1e30>: weight -1e+30 is beyond"),
}


def damaged_loras(files, tmp):
    """Copies of LoRA a with one thing wrong in every layer: alpha NaN, a vector or 1e38; integer lora_down."""
    tensors = load_file(str(files["a"]))
    alphas = [k for k in tensors if k.endswith(".alpha")]
    assert alphas   # the file stores alpha per layer, as kohya does
    for name, value in (("alpha-nan", torch.tensor(float("nan"))), ("alpha-vector", torch.ones(3)),
                        ("alpha-huge", torch.tensor(1e38))):
        save_file({**tensors, **{k: value.clone() for k in alphas}}, str(tmp / f"{name}.safetensors"))
    downs = {k: (v * 100).long() for k, v in tensors.items() if k.endswith("lora_down.weight")}
    save_file({**tensors, **downs}, str(tmp / "int-weights.safetensors"))


@pytest.mark.parametrize("case", MISTAKES)
def test_lora_mistakes_are_one_line_and_write_nothing(files, tmp_path, capsys, case):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    sd1_lora(files, tmp_path), sd1_by_metadata(files, tmp_path), damaged_loras(files, tmp_path)
    flags, prompt, words = MISTAKES[case]
    fill = {"tmp": tmp_path, "a": files["a"]}
    flags, words = [f.format(**fill) for f in flags], words.format(**fill)
    out = tmp_path / "out"
    assert generate(files["base"], out, "--lora-dir", str(files["a"].parent), *flags, prompt=prompt) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err, err
    assert not out.exists()   # nothing written, no empty folder left


@pytest.mark.parametrize("name", ["../outside/evil", "*", "**", "sub/a", "{abs}/outside/evil", "a?", "[a]", ".."])
def test_a_tag_names_a_file_directly_inside_lora_dir(files, tmp_path, capsys, name):
    """A `<lora:NAME>` tag may come from someone else's prompt list: it must not reach a file outside the folders
    the user named (`../`, an absolute path), pick whatever a wildcard matches, or go into subfolders. A valid LoRA
    sits at each place such a name could reach, so a lookup that followed the name would apply it and exit 0."""
    lora_dir, outside = tmp_path / "loras", tmp_path / "outside"
    (lora_dir / "sub").mkdir(parents=True)
    outside.mkdir()
    for place in (lora_dir / "a.safetensors", lora_dir / "sub" / "a.safetensors", outside / "evil.safetensors"):
        shutil.copy(files["a"], place)
    tag = f"<lora:{name.format(abs=tmp_path)}:0.5>"
    out = tmp_path / "out"
    assert generate(files["base"], out, "--lora-dir", str(lora_dir), prompt=f"{PROMPT} {tag}") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a file name" in err and "Traceback" not in err, err
    assert not out.exists()
