"""The pieces every method's step shares that are about speed (the fine-tuning benchmark): the fused AdamW of
medti.training.optim.adamw, and the frozen text tower's conditioning kept per prompt
(medti.training.methods.FrozenText). Neither may change what is learned beyond float rounding, nor break a
bit-identical resume."""
import pytest
import torch

import minisd
from medti.training import methods
from medti.training.config import TrainConfig
from medti.training.demo import tiny_model
from medti.training.optim import adamw
from medti.training.state import read_state, restore_state, save_state

PROMPT = "a scan of sks"


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("optim") / "model", seed=0)


@pytest.fixture
def tiny(model_files):
    """A fresh tiny model per test: a method attaches adapters or unfreezes weights in place."""
    return None, minisd.load(model_files[0], config=model_files[1])


def params(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((64, 32), (32,), (3, 3, 8, 8))]


def steps(optimizer, ps: list, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()


def test_adamw_is_fused_on_the_cpu_and_equals_torchs_default():
    """The same update as torch's default (for-loop) AdamW: 5 steps at lr 1e-2 agree to 1e-6 (fp32 rounding of
    the same formula evaluated in another order; a wrong eps, bias correction or decay is off by ~1e-3)."""
    ours, ref = params(0), params(0)
    optimizer = adamw(ours, 1e-2)
    assert optimizer.defaults["fused"] is True
    steps(optimizer, ours, 5, 1)
    steps(torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.0, foreach=False), ref, 5, 1)
    for a, b in zip(ours, ref, strict=True):
        assert (a - b).abs().max() < 1e-6


def test_a_restored_fused_adamw_continues_bit_identically(tmp_path):
    """Save after 3 steps, restore into fresh tensors and a fresh optimizer, 3 more: the same bits as 6 in a row."""
    straight = params(0)
    opt = adamw(straight, 1e-2)
    steps(opt, straight, 3, 1)
    named = {f"p{i}": p for i, p in enumerate(straight)}
    save_state(tmp_path / "state.safetensors", named, opt, {}, 3, {})
    steps(opt, straight, 3, 2)
    resumed = params(5)
    opt2 = adamw(resumed, 1e-2)
    tensors = read_state(tmp_path / "state.safetensors")[3]
    restore_state(tmp_path / "state.safetensors", tensors, {f"p{i}": p for i, p in enumerate(resumed)}, opt2)
    steps(opt2, resumed, 3, 2)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))


def test_frozen_text_is_each_prompt_alone_and_kept(tiny, model_files):
    """The kept conditioning is exactly sd.text of the prompt alone, whatever batch met it first; a text tower that
    trains is never kept (its conditioning must carry the gradient)."""
    _, sd = tiny
    m = methods.make(sd, TrainConfig(method="lora", instance_prompt=PROMPT), [PROMPT], torch.device("cpu"))
    texts = [PROMPT, "a scan of sks, left lung", PROMPT]
    got = m.context(texts)
    with torch.no_grad():
        alone = torch.cat([sd.text([t]) for t in texts])
    assert torch.equal(got, alone) and not got.requires_grad
    assert set(m.frozen.kept) == set(texts)
    assert torch.equal(m.context(texts[::-1]), alone.flip(0))
    sd = minisd.load(model_files[0], config=model_files[1])
    text_lora = methods.make(sd, TrainConfig(method="lora", instance_prompt=PROMPT, lora_targets="attention,text"),
                             [PROMPT], torch.device("cpu"))
    assert text_lora.context([PROMPT]).requires_grad


def test_frozen_text_keeps_at_most_keep(tiny, monkeypatch):
    """Past KEEP prompts, the rest are encoded each time (alone, so the same bits) and not kept."""
    _, sd = tiny
    monkeypatch.setattr(methods.FrozenText, "KEEP", 2)
    frozen = methods.FrozenText(sd)
    texts = [f"a scan number {i}" for i in range(4)]
    first, again = frozen(texts), frozen(texts)
    assert len(frozen.kept) == 2 and torch.equal(first, again)


def test_unet_fine_tune_with_train_text_is_not_kept(tiny):
    _, sd = tiny
    m = methods.make(sd, TrainConfig(method="unet", instance_prompt=PROMPT, train_text=True), [PROMPT],
                     torch.device("cpu"))
    assert m.context([PROMPT]).requires_grad and not m.frozen.kept
