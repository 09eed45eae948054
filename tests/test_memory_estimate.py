"""tools/memory_estimate.py: the live-bytes tracker against closed-form sizes, and checkpointing on a tiny model."""
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
