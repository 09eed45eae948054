"""`python -m medti.lora merge | info` on the tiny SD2 pipeline and LoRA files of test_generate_lora.py.

merge must write what `medti.generate --lora` samples from: in fp32 the same weights bit for bit (the same merge
code, the same rounding), so the same latents exactly; fp16 (the default) is that checkpoint rounded once.
diffusers' from_single_file reads it offline given the base's diffusers folder as `config` (no download: the
folder holds every config), and its UNet and text tower give the outputs of diffusers' own fuse_lora, to TOL of
test_lora.py (float32 rounding over the depth; measured: 0, since peft's merge adds the same fp32 products in the
same order as ours).
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_generate_lora import by_diffusers, generate, latent, make_files
from test_lora import TOL, inputs, moved, text_ids

import minisd
from conftest import rel_err
from medti.lora import main
from minisd.diffusers_config import read_config


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("loracli"))


def merge(files, out, *extra):
    return main(["merge", "--model", str(files["base"]), "--lora", f"{files['a']}:0.7", "--lora",
                 f"{files['b']}:-0.5", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def merged(files, tmp_path_factory):
    """(fp32 file, fp16 file, config JSON) merged from the base with a at 0.7 and b at -0.5."""
    tmp = tmp_path_factory.mktemp("merged")
    assert merge(files, tmp / "m32.safetensors", "--dtype", "fp32") == 0
    assert merge(files, tmp / "m16.safetensors") == 0
    (tmp / "m.json").write_text(json.dumps(read_config(files["base"])))   # the base's config in minisd's format
    return tmp / "m32.safetensors", tmp / "m16.safetensors", tmp / "m.json"


def test_merged_checkpoint_samples_what_lora_does(files, merged, tmp_path):
    m32, m16, config = merged
    assert generate(files["base"], tmp_path / "lora", "--lora", f"{files['a']}:0.7", "--lora",
                    f"{files['b']}:-0.5") == 0
    assert generate(m32, tmp_path / "merged", "--config", str(config)) == 0
    assert torch.equal(latent(tmp_path / "lora"), latent(tmp_path / "merged"))
    ours32, ours16 = load_file(str(m32)), load_file(str(m16))
    assert ours32.keys() == ours16.keys() and all(ours16[k].dtype == torch.float16 for k in ours16)
    assert all(torch.equal(ours16[k], v.half()) for k, v in ours32.items())   # one rounding, after the merge
    minisd.load(m16, config=config)   # loads strictly: every key of the official layout, nothing else
    with safe_open(str(m16), framework="pt") as f:
        meta = f.metadata()
    # the base and the LoRAs by name, no path: a merged checkpoint is made to be shared
    assert meta["format"] == "medti-merged-lora" and meta["base_model"] == Path(files["base"]).name
    assert [(r["name"], r["weight"], r["file"]) for r in json.loads(meta["loras"])] == [
        ("a", 0.7, Path(files["a"]).name), ("b", -0.5, Path(files["b"]).name)]
    assert str(tmp_path.parent).encode() not in m16.read_bytes()[:100_000]   # the header, where metadata is
    assert len(meta["base_sha256"]) == 64 and meta["dtype"] == "fp16"


def test_merged_checkpoint_reads_in_diffusers_from_single_file(files, merged, tmp_path):
    from diffusers import StableDiffusionPipeline
    single = StableDiffusionPipeline.from_single_file(str(merged[0]), config=str(files["base"]),
                                                      local_files_only=True, safety_checker=None)
    fused = StableDiffusionPipeline.from_pretrained(by_diffusers(files, {"a": 0.7, "b": -0.5}, tmp_path / "d"))
    base = StableDiffusionPipeline.from_pretrained(files["base"])
    x, t, context = inputs()
    with torch.no_grad():
        plain = base.unet(x, t, encoder_hidden_states=context).sample
        assert moved(single.unet(x, t, encoder_hidden_states=context).sample, plain) > 1e-2   # the merged weights
        for ours, ref in ((single.unet(x, t, encoder_hidden_states=context).sample,
                           fused.unet(x, t, encoder_hidden_states=context).sample),
                          (single.text_encoder(text_ids()).last_hidden_state,
                           fused.text_encoder(text_ids()).last_hidden_state)):
            assert rel_err(ours, ref) < TOL


def test_merge_refuses_to_overwrite_and_leaves_nothing_on_error(files, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep")
    assert merge(files, out) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert merge(files, out, "--force") == 0 and out.read_bytes() != b"keep"
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    for bad, words in (([f"{tmp_path / 'junk.safetensors'}"], "not a readable LoRA file"),
                       ([f"{files['a']}:x1"], "'x1' is not a number"), ([f"{tmp_path / 'no.safetensors'}"],
                                                                       "no such file")):
        new = tmp_path / "new.safetensors"
        assert main(["merge", "--model", str(files["base"]), "--lora", *bad, "--out", str(new)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: --lora") and words in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.safetensors", "m.safetensors"]   # no temp file


def test_info(files, capsys):
    assert main(["info", str(files["a"])]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{files['a']}: ") and "rank 2,4" in out
