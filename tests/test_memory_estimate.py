"""tools/memory_estimate.py: the live-bytes tracker against closed-form sizes, and checkpointing on a tiny model."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from memory_estimate import estimate_generation, estimate_training, fake_device, on_device  # noqa: E402 (tools/)

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
