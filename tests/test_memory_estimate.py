"""tools/memory_estimate.py: the live-bytes tracker against closed-form sizes, and checkpointing on a tiny model;
--method lora|unet (tools/memory_methods.py) against counted parameter bytes and the TI estimate."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from memory_estimate import (  # noqa: E402 (tools/)
    estimate_diffusers_recipe,
    estimate_generation,
    estimate_training,
    fake_device,
    on_device,
)
from memory_methods import estimate_method  # noqa: E402 (tools/)

# A tiny SD2-shaped model (the text tower keeps SD2's vocabulary: the tokenizer's ids must fit its table).
TINY = {"unet": {"model_channels": 32, "channel_mult": [1, 2, 2, 2], "num_head_channels": 16, "context_dim": 64},
        "vae": {"ch": 32, "ch_mult": [1, 2, 2]},
        "text": {"width": 64, "layers": 4, "heads": 4}}


def test_tracker_counts_known_allocations():
    with fake_device() as mem:
        a = on_device(1000)                          # 4,000 bytes
        b = on_device(250, dtype=torch.float16)      # 500
        assert (mem.now, mem.peak) == (4500, 4500)
        view = a[10:]                                # a view: no new storage
        b.add_(1)                                    # in place: none either
        assert mem.now == 4500
        c = a * 2                                    # 4,000 more: the peak
        del a
        assert mem.now == 8500                       # a's storage lives on in `view`
        del view, c
        assert (mem.now, mem.peak) == (500, 8500)
        d = on_device(100, dtype=torch.float64)      # 800
        assert (mem.now, mem.peak) == (1300, 8500)
        del b, d
        assert mem.now == 0


def test_tracker_counts_tensors_saved_for_backward():
    with fake_device() as mem:
        x = torch.nn.Parameter(on_device(1000))      # 4,000
        loss = x.exp().sum()                         # exp's output (4,000) is saved for backward; the sum: 4
        assert mem.now == 8004                       # ... though no Python name holds it
        loss.backward()                              # x.grad: 4,000; the graph and its saved output are freed
        del loss
        assert mem.now == 8000
        assert mem.peak >= 8004


def test_boolean_mask_and_value_checks_on_fake_tensors():
    with fake_device():
        x = on_device(5, 3)
        mask = torch.tensor([True, False, True, False, True])   # real: CPU bookkeeping
        assert x[mask].shape == (3, 3)
        assert not x.isnan().any() and torch.isfinite(x).all()  # no data: taken as finite


def test_checkpointing_lowers_the_activation_peak():
    plain = estimate_training(resolution=128, checkpointing=False, config=TINY)
    checkpointed = estimate_training(resolution=128, checkpointing=True, config=TINY)
    assert checkpointed["weights"] == plain["weights"] > 0
    assert checkpointed["trainable"] == plain["trainable"] == 3 * 64 * 64 * 4   # vectors + 2 AdamW moments, fp32
    assert checkpointed["saved_for_backward"] < plain["saved_for_backward"] / 2
    assert checkpointed["activations"] < plain["activations"]
    assert checkpointed["total"] < plain["total"]


def test_generation_estimate_runs():
    parts = estimate_generation(resolution=128, config=TINY)
    assert parts["total"] > parts["weights"] > 0 and parts["vae_decode"] > 0


def diffusers_sd1_parameters() -> dict:
    """Parameter counts of diffusers' SD1 networks (stable-diffusion-v1-5's config.json values), built on meta
    tensors from diffusers/transformers alone: an independent count of what the `sd15` estimate must hold."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)   # block types: the defaults
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, hidden_act="quick_gelu"))
    return {name: sum(p.numel() for p in m.parameters()) for name, m in (("unet", unet), ("vae", vae),
                                                                          ("text", text))}


def test_sd1_estimates_hold_sd1_networks_and_sit_below_sd2():
    """Full-size widths at a small resolution (64 px: weights do not depend on it, activations stay cheap)."""
    count = diffusers_sd1_parameters()
    assert sum(count.values()) == 1_066_235_307   # SD1.5: 859.5 M UNet + 83.7 M VAE + 123.1 M text
    sd1, sd2 = (estimate_generation(resolution=64, config=c) for c in ("sd15", "sd2-base"))
    assert sd1["weights"] == 2 * sum(count.values())   # fp16
    assert sd2["weights"] - sd1["weights"] > 2 * 200e6   # SD2's text tower: 340 M parameters against 123 M
    train1, train2 = (estimate_training(resolution=64, config=c) for c in ("sd15", "sd2-base"))
    assert train1["weights"] == 2 * (count["unet"] + count["text"])   # the VAE stays off the device
    assert train1["trainable"] == 3 * 64 * 768 * 4    # 64 vectors of SD1's width 768 + 2 AdamW moments, fp32
    # a 768-wide, 12-layer tower and 768-wide cross-attention keys/values keep less for backward than SD2's
    assert train1["saved_for_backward"] < train2["saved_for_backward"]
    # the diffusers recipe with SD1's CLIPTextModel (fp32, whole 49,409 x 768 table + a copy + 2 AdamW moments)
    recipe = estimate_diffusers_recipe(resolution=64, config="sd15")
    table = 49409 * 768 * 4
    assert recipe["trainable"] == 4 * table
    position_ids = 77 * 8   # transformers' CLIPTextEmbeddings buffer, int64 [1, 77]: on the device too
    assert recipe["weights"] == 2 * (count["unet"] + count["vae"]) + 4 * (count["text"] + 768) - table + position_ids


def test_inpainting_model_estimates_generation_only():
    parts = estimate_generation(resolution=64, config="sd15-inpainting")
    assert parts["weights"] == 2 * (sum(diffusers_sd1_parameters().values()) + 5 * 320 * 9)   # 9 input channels
    with pytest.raises(ValueError, match="inpainting"):
        estimate_training(resolution=64, config="sd15-inpainting")


def test_diffusers_folder_is_estimated_from_its_config_files(tmp_path):
    """A saved tiny SD1 pipeline as --model: the estimate's fp16 weights are its three networks' parameters."""
    from test_load_diffusers import pipeline  # tests/ is on sys.path under pytest (rootdir conftest)
    pipe = pipeline("sd1", tmp_path)
    pipe.save_pretrained(tmp_path / "sd1")
    parts = estimate_generation(resolution=64, config=str(tmp_path / "sd1"))
    count = sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    assert parts["weights"] == 2 * count


def test_bad_model_is_one_line_in_the_flag_s_words(tmp_path):
    import subprocess
    tool = Path(__file__).resolve().parent.parent / "tools" / "memory_estimate.py"
    for model, words in (("nonsense", "neither a preset"), (tmp_path, "model_index.json: missing")):
        result = subprocess.run([sys.executable, str(tool), "--model", str(model)], capture_output=True, text=True,
                                timeout=120, check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith(f"memory_estimate: error: --model {model}: ") and words in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# --method lora|unet (tools/memory_methods.py): the step of python -m medti.train --method lora|unet
def unet_parameters(config, pattern=None) -> int:
    """Parameters of the meta-built UNet (all, or those whose path fully matches `pattern`)."""
    import minisd
    unet = minisd.build(minisd.load_config(config), device="meta").unet
    return sum(p.numel() for name, p in unet.named_parameters() if pattern is None or pattern.fullmatch(name))


def test_lora_estimate_is_the_ti_estimate_plus_the_adapters():
    """Full size at 64 px: the same fp16 base on the device; what differs is what trains (closed form for the
    adapters: rank x (in + out) per adapted layer, fp32) and its weight, 2 AdamW moments and gradient."""
    import minisd
    from minisd import lora
    ti, ours = estimate_training(resolution=64), estimate_method("lora", resolution=64)
    unet = minisd.build(minisd.load_config("sd2-base"), device="meta").unet
    layers = [unet.get_submodule(name) for name in lora.targets(unet)]
    adapters = 4 * sum(4 * (layer.in_features + layer.out_features) for layer in layers)   # rank 4, fp32
    assert ours["trained"] == adapters and ours["parameters"] == adapters // 4
    assert ours["optimizer"] == 2 * adapters and ours["gradient"] == adapters
    assert ours["frozen"] == ti["weights"]
    expected = ti["total"] - ti["trainable"] - ti["gradient"] + 4 * adapters
    assert abs(ours["total"] - expected) < 0.03 * expected, (ours["total"], expected)


def test_unet_estimate_holds_weights_moments_and_gradients_in_fp32():
    from medti.training.methods import ATTENTION
    n, attention = unet_parameters(TINY), unet_parameters(TINY, ATTENTION)
    full = estimate_method("unet", resolution=128, config=TINY)
    assert full["trained"] == 4 * n and full["optimizer"] == 8 * n and full["gradient"] == 4 * n
    assert full["total"] >= 4 * 4 * n   # fp32 weights + 2 moments + gradients, at least
    assert full["frozen"] == estimate_training(resolution=128, config=TINY)["weights"] - 2 * n   # fp16 text tower
    ema = estimate_method("unet", resolution=128, config=TINY, ema=True)
    assert ema["ema"] == 4 * n and ema["total"] == full["total"] + 4 * n
    part = estimate_method("unet", resolution=128, config=TINY, trainable="attention")
    assert 0 < part["trained"] == 4 * attention < full["trained"] and part["total"] < full["total"]
    plain = estimate_method("unet", resolution=128, config=TINY, checkpointing=False)
    assert full["saved_for_backward"] < plain["saved_for_backward"]


def test_unet_estimate_of_the_full_size_model_needs_four_copies_of_its_fp32_weights():
    n = unet_parameters("sd2-base")
    assert 865e6 < n < 866e6
    full = estimate_method("unet", resolution=64)
    assert full["total"] >= 4 * 4 * n and full["trained"] == 4 * n


def run_tool(*flags):
    import subprocess
    tool = Path(__file__).resolve().parent.parent / "tools" / "memory_estimate.py"
    return subprocess.run([sys.executable, str(tool), *map(str, flags)], capture_output=True, text=True, timeout=120,
                          check=False)


def test_method_flags_errors_are_one_line():
    for flag, value, words in (("--method", "dreambooth", "one of ti, lora, unet"),
                               ("--trainable", "ff", "one of all, attention")):
        result = run_tool(flag, value)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip() == f"memory_estimate: error: {flag} {value}: {words}"


def test_method_report_names_the_limits(tmp_path):
    import json
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    result = run_tool("--method", "unet", "--model", config, "--resolution", 128, "--trainable", "attention", "--ema")
    assert result.returncode == 0, result.stderr
    assert "EMA copy (fp32)" in result.stdout and "one 8 GB GPU <= 8 GB: met" in result.stdout
    result = run_tool("--method", "lora", "--model", config, "--resolution", 128)
    assert result.returncode == 0 and "target <= 4 GB: met" in result.stdout, result.stderr
