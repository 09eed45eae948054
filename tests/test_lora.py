"""minisd.lora against diffusers + peft: the same tiny random SD1 and SD2 models on both sides (diffusers/transformers
pipelines saved and read by minisd.load, as in test_load_diffusers.py), the same random adapter weights (peft's
init_lora_weights=False: up is NOT zero, so a wrong mapping, scale or transposition shows), fp32.

Tolerance TOL = 1e-4 of the reference's max |value|, as test_components.py: both sides compute the same operations
in another order (SDPA vs explicit softmax, fused q/k/v vs three matmuls, 1x1 conv kernel vs matmul, the adapter as
down-then-up in both), so they agree to float32 rounding over the depth (measured: the run's summary table); a wrong
scale (alpha/r vs alpha), a swapped q/k block or a missing adapter gives errors of 1e-2 to 1. The same bound holds
for the gradients w.r.t. every adapter weight. Merging is compared with the adapter forward to the same bound.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from test_load_diffusers import pipeline

import minisd
from conftest import rel_err
from medti.files import lora_names
from minisd import lora

TOL = 1e-4
RANK, ALPHA = 4, 8.0   # scale 2: a scale of 1 would hide alpha / rank being read as alpha or as 1
UNET_LAYERS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
TEXT_LAYERS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def tiny(kind: str, tmp):
    """(diffusers pipeline, minisd model) with identical random weights; kind "sd1" (conv proj_in, OpenAI text) or
    "sd2" (Linear proj_in, OpenCLIP text with fused in_proj)."""
    torch.manual_seed(0)
    pipe = pipeline(kind, tmp)
    pipe.save_pretrained(tmp / kind)
    return pipe, minisd.load(tmp / kind)


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10.0, 700.0]), torch.randn(2, 8, 32, generator=gen)


def moved(a, b) -> float:
    """How far the adapters moved an output (relative), outside conftest's table of measured errors."""
    return ((a - b).abs().max() / b.abs().max()).item()


def text_ids(seed: int = 0):
    return torch.randint(0, 49408, (2, 12), generator=torch.Generator().manual_seed(seed))


def submodule(ref, path: str):
    """transformers 5's CLIPTextModel has no `text_model` level (FACTS.md); the file formats keep it in names."""
    return ref.get_submodule(path if hasattr(ref, "text_model") else path.removeprefix("text_model."))


def copy_from_peft(ours, ref, prefix: str, names: dict):
    """Our adapters take the weights of peft's (lora_A = down, lora_B = up; conv [r, in, 1, 1] flattened)."""
    pairs = {name: submodule(ref, names[f"{prefix}.{name}"]) for name in lora.adapters(ours)}
    with torch.no_grad():
        for name, adapter in lora.adapters(ours).items():
            adapter.lora_down.weight.copy_(pairs[name].lora_A["default"].weight.flatten(1))
            adapter.lora_up.weight.copy_(pairs[name].lora_B["default"].weight.flatten(1))
    return pairs


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_unet_forward_and_gradients_match_peft(kind, tmp_path):
    pipe, sd = tiny(kind, tmp_path)
    ref = pipe.unet
    ref.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=UNET_LAYERS, init_lora_weights=False))
    lora.attach(sd.unet, lora.targets(sd.unet, lora.UNET_TARGETS), RANK, ALPHA)
    assert any(layer.weight.dim() == 4 for layer in sd.unet.modules() if isinstance(layer, lora.LoRALinear)) \
        == (kind == "sd1")   # SD1's proj_in/proj_out are 1x1 convs, and adapted
    names = lora_names.diffusers_names(sd.unet)
    pairs = copy_from_peft(sd.unet, ref, "unet", names)
    assert len(pairs) == sum(1 for n, _ in ref.named_modules() if n.endswith(tuple(UNET_LAYERS))) > 0
    x, t, context = inputs()
    with torch.no_grad():
        plain = sd.unet(x, t, context)
    randomize_adapters_(sd.unet)   # proof that the comparison sees the adapters: the output moves
    with torch.no_grad():
        assert moved(sd.unet(x, t, context), plain) > 1e-2
    pairs = copy_from_peft(sd.unet, ref, "unet", names)
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ours, theirs = sd.unet(x, t, context), ref(x, t, encoder_hidden_states=context).sample
    assert rel_err(ours, theirs) < TOL
    F.mse_loss(ours, target).backward()
    F.mse_loss(theirs, target).backward()
    for name, adapter in lora.adapters(sd.unet).items():
        layer = pairs[name]
        assert rel_err(adapter.lora_down.weight.grad, layer.lora_A["default"].weight.grad.flatten(1)) < TOL, name
        assert rel_err(adapter.lora_up.weight.grad, layer.lora_B["default"].weight.grad.flatten(1)) < TOL, name


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_text_tower_matches_peft(kind, tmp_path):
    """SD1: separate q/k/v/out; SD2: three deltas on the row blocks of OpenCLIP's fused in_proj, plus out_proj,
    against transformers' CLIPTextModel (separate q/k/v) with peft on each; the MLP's two layers in both."""
    pipe, sd = tiny(kind, tmp_path)
    ref = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TEXT_LAYERS,
                                             init_lora_weights=False), pipe.text_encoder)
    tower = sd.text.tower
    lora.attach(tower, lora.targets(tower, lora.TEXT_TARGETS), RANK, ALPHA)
    wrapped = lora.LoRAFusedAttention if kind == "sd2" else lora.LoRALinear
    assert all(isinstance(tower.get_submodule(n), wrapped) for n in lora.targets(tower, ("text",)))
    names = lora_names.diffusers_names(sd.unet, tower)
    pairs = copy_from_peft(tower, ref, "text", names)
    assert len(pairs) == 6 * len(submodule(ref, "text_model.encoder.layers"))
    ids = text_ids()
    with torch.no_grad():
        plain = tower(ids)
    randomize_adapters_(tower)   # proof that the comparison sees the adapters: the output moves
    with torch.no_grad():
        assert moved(tower(ids), plain) > 1e-2
    pairs = copy_from_peft(tower, ref, "text", names)
    ours, theirs = tower(ids), ref(ids).last_hidden_state
    assert rel_err(ours, theirs) < TOL
    target = torch.randn(ours.shape, generator=torch.Generator().manual_seed(5))
    F.mse_loss(ours, target).backward()
    F.mse_loss(theirs, target).backward()
    for name, adapter in lora.adapters(tower).items():
        assert rel_err(adapter.lora_up.weight.grad, pairs[name].lora_B["default"].weight.grad) < TOL, name
        assert rel_err(adapter.lora_down.weight.grad, pairs[name].lora_A["default"].weight.grad) < TOL, name


def randomize_adapters_(model, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in lora.adapters(model).values():
            adapter.lora_up.weight.copy_(0.3 * torch.randn(adapter.lora_up.weight.shape, generator=gen))


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_merge_equals_the_adapter_forward(kind, tmp_path):
    _, sd = tiny(kind, tmp_path)
    base = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    lora.attach(sd.unet, lora.targets(sd.unet, lora.UNET_TARGETS), RANK, ALPHA)
    lora.attach(sd.text.tower, lora.targets(sd.text.tower, lora.TEXT_TARGETS), RANK, ALPHA)
    randomize_adapters_(sd.unet)
    randomize_adapters_(sd.text.tower, 2)
    x, t, context = inputs()
    with torch.no_grad():
        adapted, text = sd.unet(x, t, context), sd.text.tower(text_ids())
        lora.merge(sd.unet, weight=0.5)
        lora.merge(sd.text.tower, weight=0.5)
        assert not lora.adapters(sd.unet) and not lora.adapters(sd.text.tower)
        assert set(sd.unet.state_dict()) == set(base)   # the original modules and checkpoint keys are back
        assert any(not torch.equal(v, base[k]) for k, v in sd.unet.state_dict().items())
        merged = sd.unet(x, t, context)
        assert moved(merged, adapted) > 1e-3   # weight 0.5: not the forward at weight 1
    # Again at weight 1 on fresh models: merged == adapter forward.
    (tmp_path / "again").mkdir()
    _, sd = tiny(kind, tmp_path / "again")
    for model, seed in ((sd.unet, 1), (sd.text.tower, 2)):
        lora.attach(model, lora.targets(model, lora.UNET_TARGETS + lora.TEXT_TARGETS), RANK, ALPHA)
        randomize_adapters_(model, seed)
    with torch.no_grad():
        adapted, text = sd.unet(x, t, context), sd.text.tower(text_ids())
        lora.merge(sd.unet)
        lora.merge(sd.text.tower)
        assert rel_err(sd.unet(x, t, context), adapted) < TOL
        assert rel_err(sd.text.tower(text_ids()), text) < TOL


def test_frozen_base_bit_identical_after_a_step(tmp_path):
    _, sd = tiny("sd2", tmp_path)
    base = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    plain = copy.deepcopy(sd.unet)
    adapters = lora.attach(sd.unet, lora.targets(sd.unet), RANK, ALPHA)
    assert set(sd.unet.state_dict()) == set(base) | {f"{n}.{p}" for n in adapters for p in
                                                     ("lora_down.weight", "lora_up.weight")}
    assert all(not p.requires_grad for n, p in sd.unet.named_parameters() if ".lora" not in n)
    trainable = [id(p) for p in sd.unet.parameters() if p.requires_grad]
    assert [id(p) for p in lora.parameters(sd.unet)] == trainable
    x, t, context = inputs()
    with torch.no_grad():
        assert torch.equal(sd.unet(x, t, context), plain(x, t, context))   # zero up: base output
    opt = torch.optim.AdamW(lora.parameters(sd.unet), lr=1e-2)
    for _ in range(2):
        F.mse_loss(sd.unet(x, t, context), torch.zeros(2, 4, 8, 8)).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, base[k]) for k, v in sd.unet.state_dict().items() if k in base)
    assert any(a.lora_up.weight.abs().max() > 0 for a in adapters.values())   # the adapters did train


def test_fp16_base_with_fp32_adapters(tmp_path):
    _, sd = tiny("sd1", tmp_path)
    x, t, context = inputs()
    lora.attach(sd.unet, lora.targets(sd.unet, lora.UNET_TARGETS), RANK, ALPHA)
    randomize_adapters_(sd.unet)
    with torch.no_grad():
        full = sd.unet(x, t, context)
    trained = {k: v.clone() for k, v in sd.unet.state_dict().items() if ".lora" in k}
    lora.remove(sd.unet)
    sd.unet.half()   # cast the base first, then attach: the adapters are made in fp32
    lora.attach(sd.unet, lora.targets(sd.unet, lora.UNET_TARGETS), RANK, ALPHA)
    assert not sd.unet.load_state_dict(trained, strict=False).unexpected_keys   # the same adapters, still fp32
    out = sd.unet(x.half(), t, context.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert rel_err(out.float(), full) < 1e-2   # fp16 rounding of the base, not a wrong adapter
    out.float().square().mean().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in lora.parameters(sd.unet))
    assert all(p.dtype == torch.float16 and p.grad is None for n, p in sd.unet.named_parameters() if ".lora" not in n)


def test_targets_and_refusals(tmp_path):
    _, sd = tiny("sd2", tmp_path)
    default = lora.targets(sd.unet)
    # every transformer block: attn1 and attn2, q k v out
    blocks = [n for n, _ in sd.unet.named_modules() if n.endswith("transformer_blocks.0")]
    assert len(default) == 8 * len(blocks) and all(".attn" in n for n in default)
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q" in default
    assert len(lora.targets(sd.unet, ("proj",))) == 2 * len(blocks)
    assert lora.targets(sd.unet, ("text",)) == [] and len(lora.targets(sd.text.tower, ("text",))) == \
        len(sd.text.tower.blocks)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        lora.targets(sd.unet, ("attn",))
    lora.attach(sd.unet, default[:1], RANK)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.attach(sd.unet, default[:1], RANK)
