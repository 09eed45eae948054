"""medti.files.lora_file against diffusers' own LoRA loader (StableDiffusionLoraLoaderMixin.load_lora_weights, which
converts kohya keys itself: loaders/lora_conversion_utils.py) on the tiny SD1 and SD2 models of test_lora.py:
  * a file we write loads in diffusers and gives the same UNet and text-tower output as ours;
  * a kohya-layout file made here (per-layer ranks, alpha != rank, conv-shaped SD1 projections, UNet and text keys)
    and a diffusers/PEFT file saved by diffusers give ours the same output as diffusers reading them;
  * bad files are refused in one line naming the file, leaving the model unchanged.
Tolerance TOL of test_lora.py (float32 rounding over the depth; a wrong scale or a swapped layer gives 1e-2 to 1).
"""
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from test_lora import ALPHA, RANK, TEXT_LAYERS, TOL, UNET_LAYERS, inputs, moved, randomize_adapters_, text_ids, tiny

import minisd
from conftest import rel_err
from medti.files import lora_file, lora_names
from medti.files.lora_file import LoRAFileError
from minisd import lora


def outputs(unet, tower):
    x, t, context = inputs()
    with torch.no_grad():
        return unet(x, t, context), tower(text_ids())


def theirs(pipe):
    x, t, context = inputs()
    with torch.no_grad():
        return pipe.unet(x, t, encoder_hidden_states=context).sample, pipe.text_encoder(text_ids()).last_hidden_state


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_our_file_loads_in_diffusers(kind, tmp_path):
    pipe, sd = tiny(kind, tmp_path)
    before = theirs(pipe)
    lora.attach(sd.unet, lora.targets(sd.unet, lora.UNET_TARGETS), RANK, ALPHA)
    lora.attach(sd.text.tower, lora.targets(sd.text.tower, lora.TEXT_TARGETS), RANK, ALPHA)
    randomize_adapters_(sd.unet)
    randomize_adapters_(sd.text.tower, 2)
    path = tmp_path / "lora.safetensors"
    lora_file.write(path, sd.unet, sd.text.tower, meta={"base_model": "tiny", "step": 7})
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert {k: meta[k] for k in ("format", "rank", "alpha", "targets", "base_model", "step", "ss_network_dim")} == \
        {"format": "kohya-lora", "rank": "4", "alpha": "8", "targets": "attention,ff,proj,text,text_ff",
         "base_model": "tiny",
         "step": "7", "ss_network_dim": "4"}
    assert all(k.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_",
                             "lora_te_text_model_encoder_layers_")) for k in keys)
    assert " rank 4, targets attention,ff,proj,text,text_ff, base tiny;" in lora_file.info(path)
    ours = outputs(sd.unet, sd.text.tower)
    pipe.load_lora_weights(str(path))
    ref = theirs(pipe)
    assert moved(ref[0], before[0]) > 1e-2 and moved(ref[1], before[1]) > 1e-2   # diffusers did take the adapters
    assert rel_err(ours[0], ref[0]) < TOL
    assert rel_err(ours[1], ref[1]) < TOL
    # and back into a fresh model of ours: the same numbers exactly (float32 file)
    _, again = tiny(kind, tmp_path)
    assert lora_file.read(path, again.unet, again.text.tower)["step"] == "7"
    reread = outputs(again.unet, again.text.tower)
    assert torch.equal(reread[0], ours[0]) and torch.equal(reread[1], ours[1])


def kohya_file(pipe, path, seed: int = 3):
    """A kohya-layout file for every UNet and text-tower layer of the reference models: rank 2 in attn1 and 4
    elsewhere (kohya's per-block ranks), alpha 3 (!= rank), 1x1 convs stored conv-shaped, as sd-scripts does."""
    gen, tensors = torch.Generator().manual_seed(seed), {}
    layers = [("lora_unet_", n, m) for n, m in pipe.unet.named_modules() if n.endswith(tuple(UNET_LAYERS))]
    text = pipe.text_encoder
    prefix = "" if hasattr(text, "text_model") else "text_model."   # transformers 5 dropped that level
    layers += [("lora_te_", prefix + n, m) for n, m in text.named_modules() if n.endswith(tuple(TEXT_LAYERS))]
    for head, name, module in layers:
        rank, extra = (2 if ".attn1." in name else 4), module.weight.shape[2:]
        key = head + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = 0.3 * torch.randn(rank, module.weight.shape[1], *extra, generator=gen)
        tensors[f"{key}.lora_up.weight"] = 0.3 * torch.randn(module.weight.shape[0], rank, *extra, generator=gen)
        tensors[f"{key}.alpha"] = torch.tensor(3.0)
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_kohya_file_reads_as_in_diffusers(kind, tmp_path):
    pipe, sd = tiny(kind, tmp_path)
    path = kohya_file(pipe, tmp_path / "kohya.safetensors")
    before = theirs(pipe)
    lora_file.read(path, sd.unet, sd.text.tower)
    ranks = {a.rank for a in lora.adapters(sd.unet).values()}
    assert ranks == {2, 4} and {a.alpha for a in lora.adapters(sd.text.tower).values()} == {3.0}
    pipe.load_lora_weights(str(path), adapter_name="kohya")
    ours, ref = outputs(sd.unet, sd.text.tower), theirs(pipe)
    assert moved(ref[0], before[0]) > 1e-2 and moved(ref[1], before[1]) > 1e-2
    assert rel_err(ours[0], ref[0]) < TOL
    assert rel_err(ours[1], ref[1]) < TOL
    # A strength (A1111's <lora:name:0.6>) is diffusers' adapter weight: the same scale on every delta.
    lora.set_weight(sd.unet, 0.6)
    lora.set_weight(sd.text.tower, 0.6)
    pipe.set_adapters("kohya", adapter_weights=0.6)
    ours, ref = outputs(sd.unet, sd.text.tower), theirs(pipe)
    assert rel_err(ours[0], ref[0]) < TOL
    assert rel_err(ours[1], ref[1]) < TOL


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_diffusers_peft_file_reads_as_in_diffusers(kind, tmp_path):
    """The file diffusers' training scripts write: PEFT keys (lora_A/lora_B), alpha in `lora_adapter_metadata`."""
    pipe, sd = tiny(kind, tmp_path)
    unet_cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=UNET_LAYERS, init_lora_weights=False)
    text_cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TEXT_LAYERS, init_lora_weights=False)
    pipe.unet.add_adapter(unet_cfg)
    pipe.text_encoder.add_adapter(text_cfg)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "peft", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=text_cfg.to_dict())
    path = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert any(".lora_A.weight" in k for k in f.keys())
    lora_file.read(path, sd.unet, sd.text.tower)
    assert {a.alpha for a in lora.adapters(sd.unet).values()} == {ALPHA}
    ours, ref = outputs(sd.unet, sd.text.tower), theirs(pipe)
    assert rel_err(ours[0], ref[0]) < TOL
    assert rel_err(ours[1], ref[1]) < TOL


def refused(path, unet, tower, *words):
    with pytest.raises(LoRAFileError) as err:
        lora_file.read(path, unet, tower)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and all(w in message for w in words), message
    assert not lora.adapters(unet) and not lora.adapters(tower)   # checked before anything was attached


def test_bad_files_are_refused_in_one_line(tmp_path):
    pipe, sd = tiny("sd2", tmp_path)
    unet, tower = sd.unet, sd.text.tower
    names = lora_names.kohya_names(unet, tower)
    to_k = names["unet.input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora"]
    good = {f"{to_k}.lora_down.weight": torch.randn(4, 32), f"{to_k}.lora_up.weight": torch.randn(32, 4)}

    def file(name, tensors):
        save_file(tensors, str(tmp_path / name))
        return tmp_path / name

    refused(file("unknown.safetensors", {**good, "model.diffusion_model.x.weight": torch.zeros(1)}), unet, tower,
            "model.diffusion_model.x.weight", "not a kohya")
    refused(file("layer.safetensors", {"lora_unet_nowhere.lora_down.weight": torch.zeros(4, 32),
                                       "lora_unet_nowhere.lora_up.weight": torch.zeros(32, 4)}), unet, tower,
            "lora_unet_nowhere", "not an adaptable layer")
    refused(file("half.safetensors", {f"{to_k}.lora_down.weight": torch.randn(4, 32)}), unet, tower,
            to_k, "no lora_up")
    # made for SD1 (its cross-attention reads 768-wide text), read onto a model whose text is 32 wide
    refused(file("sd1.safetensors", {f"{to_k}.lora_down.weight": torch.randn(4, 768),
                                     f"{to_k}.lora_up.weight": torch.randn(32, 4)}), unet, tower,
            "do not fit", "768 (SD1.x)", "this model's text is 32")
    refused(file("nan.safetensors", {**good, f"{to_k}.lora_up.weight": torch.full((32, 4), float("nan"))}), unet,
            tower, to_k, "NaN")
    text = names["text.transformer.resblocks.0.attn.lora_q"]
    text_file = file("text.safetensors", {f"{text}.lora_down.weight": torch.randn(4, 32),
                                          f"{text}.lora_up.weight": torch.randn(32, 4)})
    with pytest.raises(LoRAFileError, match="no text tower given"):
        lora_file.read(text_file, unet)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    refused(tmp_path / "junk.safetensors", unet, tower, "not a readable LoRA file")
    lora_file.read(file("good.safetensors", good), unet, tower)
    with pytest.raises(LoRAFileError, match="already has a LoRA adapter") as err:
        lora_file.read(tmp_path / "good.safetensors", unet, tower)
    assert "\n" not in str(err.value)
    with pytest.raises(LoRAFileError, match="no LoRA adapters attached"):
        lora_file.write(tmp_path / "none.safetensors", lora.remove(unet))


@pytest.mark.parametrize("preset, text", [("sd15", 72), ("sd2", 138)])
def test_full_size_kohya_names(preset, text):
    """Full-size names on the meta device: kohya's trainer logs "create LoRA for U-Net: 192 modules" and, for
    the text encoder, 72 (SD1: 12 layers x q/k/v/out/fc1/fc2) or 138 (SD2's 23 layers) with its default targets,
    which are ours with every kind selected; spot checks of the diffusers block numbering."""
    sd = minisd.build(minisd.load_config(preset))
    names = lora_names.kohya_names(sd.unet, sd.text.tower)
    assert len(set(names.values())) == len(names)
    assert (sum(k.startswith("unet.") for k in names), sum(k.startswith("text.") for k in names)) == (192, text)
    spots = {"unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora":
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
             "unet.input_blocks.8.1.proj_out.lora": "lora_unet_down_blocks_2_attentions_1_proj_out",
             "unet.middle_block.1.transformer_blocks.0.ff.net.0.proj.lora":
             "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
             "unet.output_blocks.3.1.transformer_blocks.0.attn2.to_out.0.lora":
             "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0",
             "unet.output_blocks.11.1.transformer_blocks.0.ff.net.2.lora":
             "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2"}
    assert {k: names[k] for k in spots} == spots
    last = {"sd15": ("text.encoder.layers.11.self_attn.q_proj.lora", 11),
            "sd2": ("text.transformer.resblocks.22.attn.lora_q", 22)}[preset]   # SD2: q, a row block of in_proj
    assert names[last[0]] == f"lora_te_text_model_encoder_layers_{last[1]}_self_attn_q_proj"
