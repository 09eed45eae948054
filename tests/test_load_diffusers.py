"""minisd.load(folder) on diffusers Stable Diffusion folders (minisd/diffusers.py), against the diffusers pipeline
loaded from the same folder: tiny SD1 and SD2 pipelines built with diffusers' and transformers' own classes and
random weights (conftest.randomize_), saved by `save_pretrained` as safetensors, fp16 variant and .bin.

Tolerance, as in test_components.py: max abs error <= 1e-4 of the reference's max |value|, fp32. Both sides compute
the same operations in another order (SDPA vs explicit softmax, fused q/k/v vs three matmuls), so they agree to
float32 rounding over the depth (measured: the run's summary table); a wrong mapping (swapped q/k, reversed VAE
levels, the wrong pad id or text layer) gives errors of 1e-2 to 1. Weights read from the fp16 and .bin files are
compared exactly (bit for bit) with the fp32 safetensors load.
"""
import inspect
import json
import shutil

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import minisd
from conftest import randomize_, rel_err
from minisd import diffusers as folders
from minisd import diffusers_keys as names
from minisd.config import LoadError
from minisd.paths import weights_dir

TOL = 1e-4
# No literal "!": transformers' SD2 tokenizer maps it to the pad id 0, OpenCLIP (the truth for SD2, and minisd) to
# 748 (FACTS.md); padding itself agrees.
PROMPTS = ["a prompt", "an x-ray of a chest, frontal view"]


def clip_tokenizer(tmp, pad: str) -> CLIPTokenizer:
    """transformers' CLIPTokenizer on CLIP's vocabulary (ours, specials under OpenAI's names), SD1's or SD2's pad."""
    vocab = json.loads((weights_dir() / "clip_vocab.json").read_text())
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    return CLIPTokenizer(vocab=str(tmp / "vocab.json"), merges=str(weights_dir() / "clip_merges.txt"), pad_token=pad,
                         model_max_length=77)   # as the hub files state it


def pipeline(kind: str, tmp):
    """A tiny random pipeline: "sd1" (quick_gelu text, head count 2, conv projections), "sd2" (gelu text, head
    width 16, linear projections) or "inpaint" (SD1 with a 9-channel UNet). 32 groups, as minisd's norms have."""
    sd2 = kind == "sd2"
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=9 if kind == "inpaint" else 4, block_out_channels=(32, 64), layers_per_block=1,
        attention_head_dim=(2, 4) if sd2 else 2, use_linear_projection=sd2, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=77,
                                        hidden_act="gelu" if sd2 else "quick_gelu"))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction" if sd2 else "epsilon")
    cls = StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionPipeline
    return cls(vae=randomize_(vae, 1), text_encoder=randomize_(text, 2), unet=randomize_(unet, 3),
               tokenizer=clip_tokenizer(tmp, "!" if sd2 else "<|endoftext|>"), scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> folder: sd1, sd2, inpaint as safetensors; sd1-fp16 (variant), sd1-bin (pickles)."""
    tmp, out = tmp_path_factory.mktemp("diffusers"), {}
    for kind in ("sd1", "sd2", "inpaint"):
        torch.manual_seed(0)
        pipe = pipeline(kind, tmp)
        pipe.save_pretrained(tmp / kind)
        out[kind] = tmp / kind
        if kind == "sd1":
            pipe.save_pretrained(tmp / "sd1-bin", safe_serialization=False)
            # variant= only names the files; the pipeline is cast first, as the hub's fp16 variants were made.
            pipe.to(torch.float16).save_pretrained(tmp / "sd1-fp16", variant="fp16")
            out["sd1-fp16"], out["sd1-bin"] = tmp / "sd1-fp16", tmp / "sd1-bin"
    return out


@pytest.mark.parametrize("kind", ["sd1", "sd2", "inpaint"])
def test_outputs_match_the_diffusers_pipeline(saved, kind):
    cls = StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionPipeline
    ref = cls.from_pretrained(saved[kind], local_files_only=True, safety_checker=None)
    sd = minisd.load(saved[kind])
    assert sd.config.text.tower == ("openclip" if kind == "sd2" else "openai")
    assert (sd.config.prediction, sd.config.resolution) == ("v" if kind == "sd2" else "eps", 16)
    assert sd.config.inpainting == (kind == "inpaint")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # Text: the pipeline's own prompt encoding (its tokenizer's padding: SD1 end token, SD2 "!" = id 0).
        theirs = ref.encode_prompt(PROMPTS, "cpu", 1, False)[0]
        assert rel_err(sd.text(PROMPTS), theirs) < TOL
        x = torch.randn(2, sd.config.unet.in_channels, 8, 8, generator=gen)
        t, context = torch.tensor([10.0, 700.0]), torch.randn(2, 77, 32, generator=gen)
        assert rel_err(sd.unet(x, t, context), ref.unet(x, t, encoder_hidden_states=context).sample) < TOL
        z = torch.randn(1, 4, 4, 4, generator=gen)
        assert rel_err(sd.vae.decode(z), ref.vae.decode(z).sample) < TOL


@pytest.mark.parametrize("variant", ["sd1-fp16", "sd1-bin"])
def test_fp16_variant_and_bin_weights(saved, variant):
    """The other weight files give the same tensors: fp16 ones exactly the fp32 weights rounded to fp16."""
    expected, got = minisd.load(saved["sd1"]), minisd.load(saved[variant])
    file, _ = folders.open_folder(saved[variant])
    assert {file.dtype(key) for key in file.keys} == {"F16" if variant.endswith("fp16") else "F32"}
    rounding = (lambda t: t.half().float()) if variant.endswith("fp16") else (lambda t: t)
    for module in ("unet", "vae"):
        mine = getattr(got, module).state_dict()
        for name, tensor in getattr(expected, module).state_dict().items():
            assert torch.equal(mine[name], rounding(tensor)), name
    assert torch.equal(got.text.tower.token_embedding.weight, rounding(expected.text.tower.token_embedding.weight))


def test_sharded_weights(saved, tmp_path):
    """diffusers' sharded form (an index.json whose weight_map names the shard of every tensor) loads the same."""
    folder = tmp_path / "sd2"
    shutil.copytree(saved["sd2"], folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(folder / "unet", max_shard_size="100KB")
    assert len(list((folder / "unet").glob("*.safetensors"))) > 2
    expected, got = minisd.load(saved["sd2"]).unet.state_dict(), minisd.load(folder).unet.state_dict()
    assert all(torch.equal(got[k], t) for k, t in expected.items())


def test_folder_file_reads_lazily_under_official_names(saved):
    file, cfg = folders.open_folder(saved["sd2"])
    name = "first_stage_model.decoder.mid.attn_1.q.weight"
    assert file.shape(name) == (64, 64, 1, 1) and file.get(name).shape == (64, 64, 1, 1)
    qkv = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    assert file.shape(qkv) == (96, 32) and file.dtype(qkv) == "F32"
    assert cfg.text.layers == 3 and cfg.unet.num_head_channels == 16


@pytest.mark.parametrize("cls, table", [
    (UNet2DConditionModel, names.UNET_MAPPED | set(names.UNET_FIXED) | names.UNET_IGNORED),
    (AutoencoderKL, names.VAE_MAPPED | set(names.VAE_FIXED) | names.VAE_IGNORED)])
def test_every_diffusers_parameter_is_in_a_table(cls, table):
    """A config diffusers writes never hits "unknown field" merely by having a field."""
    assert set(inspect.signature(cls.__init__).parameters) - {"self"} <= table


def edit_json(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def broken(saved, tmp_path, kind="sd1", **edits):
    """A copy of a saved folder with JSON files edited: {relative path with / as __: function(data) -> data}."""
    folder = tmp_path / kind
    shutil.copytree(saved[kind], folder)
    for relative, change in edits.items():
        edit_json(folder / relative.replace("__", "/"), change)
    return folder


def assert_refused(folder, *words, **kwargs):
    with pytest.raises(LoadError) as info:
        minisd.load(folder, **kwargs)
    message = str(info.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_refused_missing_component(saved, tmp_path):
    folder = broken(saved, tmp_path)
    shutil.rmtree(folder / "vae")
    assert_refused(folder, "has no vae/ folder, which model_index.json names")


@pytest.mark.parametrize("file, change, words", [
    ("scheduler__scheduler_config.json", lambda d: d | {"_class_name": "FlowMatchEulerDiscreteScheduler"},
     ["scheduler_config.json", "FlowMatchEulerDiscreteScheduler"]),
    ("scheduler__scheduler_config.json", lambda d: d | {"beta_schedule": "linear"},
     ["scheduler_config.json", "beta_schedule 'linear'"]),
    ("scheduler__scheduler_config.json", lambda d: d | {"prediction_type": "sample"}, ["prediction_type 'sample'"]),
    ("unet__config.json", lambda d: d | {"class_embed_type": "timestep"},
     ["unet/config.json", "class_embed_type 'timestep' is not supported by minisd"]),
    ("unet__config.json", lambda d: d | {"norm_num_groups": 16}, ["unet/config.json", "norm_num_groups 16"]),
    ("unet__config.json", lambda d: d | {"new_field": 1}, ["unet/config.json", "unknown field new_field"]),
    ("vae__config.json", lambda d: d | {"shift_factor": 0.1}, ["vae/config.json", "shift_factor 0.1"]),
    ("model_index.json", lambda d: d | {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]},
     ["model_index.json", "SDXL"]),
    ("model_index.json", lambda d: d | {"_class_name": "KandinskyPipeline"}, ["model_index.json", "Kandinsky"]),
    ("text_encoder__config.json", lambda d: d | {"model_type": "t5"}, ["text_encoder/config.json", "t5", "not CLIP"]),
    ("text_encoder__config.json", lambda d: d | {"hidden_act": "relu"}, ["text_encoder/config.json", "relu"]),
    ("tokenizer__tokenizer_config.json", lambda d: d | {"pad_token": "!"}, ["tokenizer", "pad_token '!'"]),
])
def test_refused_config(saved, tmp_path, file, change, words):
    assert_refused(broken(saved, tmp_path, **{file: change}), *words)


def test_refused_tokenizer_vocabulary(saved, tmp_path):
    """Hub layout (vocab.json + merges.txt) with one entry changed: refused naming it."""
    folder = broken(saved, tmp_path)
    vocab = clip_tokenizer(tmp_path, "<|endoftext|>").get_vocab()
    shutil.copy(weights_dir() / "clip_merges.txt", folder / "tokenizer" / "merges.txt")
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    assert minisd.load(folder).config.text.tower == "openai"   # the hub layout itself is accepted
    vocab["hello</w>"], vocab["world</w>"] = vocab["world</w>"], vocab["hello</w>"]
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    assert_refused(folder, "tokenizer", "vocabulary differs", "hello</w>")


def test_refused_added_tokens(saved, tmp_path):
    folder = broken(saved, tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer.add_tokens(["<cxr>"])
    tokenizer.save_pretrained(folder / "tokenizer")
    assert_refused(folder, "tokenizer", "added tokens ['<cxr>']", "--embeddings")


def test_refused_unmapped_weight(saved, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = broken(saved, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file(load_file(weights) | {"mid_block.resnets.0.extra.weight": torch.zeros(1)}, weights)
    assert_refused(folder, "unet", "mid_block.resnets.0.extra.weight does not map")


def test_refused_missing_weight(saved, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = broken(saved, tmp_path)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if k != "decoder.conv_out.bias"}, weights)
    assert_refused(folder, "missing key first_stage_model.decoder.conv_out.bias")


def test_refused_with_a_config(saved):
    assert_refused(saved["sd1"], "states its own configuration", config="sd15")
