"""SD1's text tower (minisd.clip_openai) and its tokenizer rule against transformers, the library SD1 was built on
(ldm FrozenCLIPEmbedder wraps CLIPTextModel and CLIPTokenizer of openai/clip-vit-large-patch14).

Tolerance: max abs error <= 1e-4 of the reference's max |value| in fp32, as for the other networks
(test_components.py): both sides compute the same operations in a different order (SDPA kernels, fused adds), so
they agree to float32 rounding accumulated over the depth -- measured 1e-7..1e-6 -- while a real mistake (exact
instead of quick GELU, a missing final layer norm, off-by-one clip skip, no causal mask) gives 1e-3..1.
Token ids are compared exactly.
"""
import json
import unicodedata
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from test_tokenizer import PROMPTS
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from conftest import randomize_, rel_err
from minisd.clip_openai import IGNORED, PREFIX, OpenAITextConfig, OpenAITextTransformer
from minisd.config import LoadError
from minisd.load import load_component
from minisd.paths import weights_dir
from minisd.tensorfile import TensorFile
from minisd.tokenizer import CONTEXT_LENGTH, EOT, PAD_SD1, Tokenizer

TOL = 1e-4
POSITION_IDS = IGNORED[0]
# SD1's text tower (openai/clip-vit-large-patch14's text config) and a tiny one of the same shape.
FULL = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TINY = dict(FULL, vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            bos_token_id=998, eos_token_id=999, pad_token_id=999)


def ours_config(ref: dict, layer: str) -> OpenAITextConfig:
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "layer_norm_eps")
    return OpenAITextConfig(**{k: ref[k] for k in names}, layer=layer)


def write_sd1(path, reference: CLIPTextModel, extra: dict) -> TensorFile:
    """The reference's weights under SD1's checkpoint prefix (transformers 5 drops `text_model.`; SD1 files have
    it), plus `extra` tensors (e.g. a stored position_ids)."""
    state = {PREFIX + k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state | extra, str(path))
    return TensorFile(path)


def load_tower(file: TensorFile, cfg: OpenAITextConfig) -> OpenAITextTransformer:
    """minisd's strict per-component loader, with the tower built on the meta device as minisd.load does."""
    with torch.device("meta"):
        tower = OpenAITextTransformer(cfg)
    return load_component(file, PREFIX, tower, IGNORED, torch.float32, "cpu")


def make_pair(name: str, folder):
    """(reference CLIPTextModel with random weights, its config dict, the SD1-layout file of its weights)."""
    config = TINY if name == "tiny" else FULL
    torch.manual_seed(0)
    reference = randomize_(CLIPTextModel(CLIPTextConfig(**config)), 5)
    stored = {POSITION_IDS: torch.arange(77).unsqueeze(0)}   # int64 [1, 77], as official SD1 files store it
    return reference, config, write_sd1(folder / "text.safetensors", reference, stored)


@pytest.fixture(scope="module", params=["tiny", "full"])
def pair(request, tmp_path_factory):
    return make_pair(request.param, tmp_path_factory.mktemp("sd1"))


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return make_pair("tiny", tmp_path_factory.mktemp("sd1-tiny"))


def sd1_ids(config: dict, batch: int = 3) -> torch.Tensor:
    ids = torch.randint(0, config["vocab_size"] - 2, (batch, 77), generator=torch.Generator().manual_seed(3))
    ids[:, 0], ids[:, 9] = config["vocab_size"] - 2, config["vocab_size"] - 1
    ids[:, 10:] = config["vocab_size"] - 1   # SD1 pads with the end token and conditions on every position
    return ids


@torch.no_grad()
def test_last_matches_transformers(pair):
    reference, config, file = pair
    ids = sd1_ids(config)
    ref = reference(input_ids=ids).last_hidden_state
    tower = load_tower(file, ours_config(config, "last"))
    assert tower.depth == config["num_hidden_layers"]
    err = rel_err(tower(ids), ref)
    assert err <= TOL, f"SD1 text tower (last) relative error {err:.2e}"
    # Against transformers' SDPA path the operations are the same (measured: bitwise equal); its eager path
    # (explicit softmax) reorders them: measured 5e-7.
    reference.set_attn_implementation("eager")
    try:
        err = rel_err(tower(ids), reference(input_ids=ids).last_hidden_state)
    finally:
        reference.set_attn_implementation("sdpa")
    assert err <= TOL, f"SD1 text tower (last) relative error {err:.2e} against eager attention"
    # token embeddings in, same result: the path textual inversion uses
    assert rel_err(tower.forward_embeddings(tower.token_embedding(ids)), ref) <= TOL


@torch.no_grad()
def test_penultimate_is_a1111_clip_skip_2(pair):
    """A1111 "Clip skip 2": hidden_states[-2] (the output of the last layer but one) through final_layer_norm."""
    reference, config, file = pair
    ids = sd1_ids(config)
    hidden = reference(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hidden) == config["num_hidden_layers"] + 1   # the embeddings, then every layer's output
    ref = getattr(reference, "text_model", reference).final_layer_norm(hidden[-2])
    tower = load_tower(file, ours_config(config, "penultimate"))
    assert tower.depth == config["num_hidden_layers"] - 1
    err = rel_err(tower(ids), ref)
    assert err <= TOL, f"SD1 text tower (penultimate) relative error {err:.2e}"


@torch.no_grad()
def test_position_ids_are_ignored_by_name(tiny_pair, tmp_path):
    """Files without position_ids, and merger-damaged ones with float position_ids, load and give the same output;
    a key the tower does not know is still an error."""
    reference, config, file = tiny_pair
    cfg = ours_config(config, "last")
    ids = sd1_ids(config, batch=1)
    expected = load_tower(file, cfg)(ids)
    damaged = torch.arange(77, dtype=torch.float16).unsqueeze(0) * 0.583   # as merged files store it
    for extra in ({}, {POSITION_IDS: damaged}):
        assert torch.equal(load_tower(write_sd1(tmp_path / "other.safetensors", reference, extra), cfg)(ids), expected)
    with pytest.raises(LoadError, match="unexpected key .*position_ids"):   # ignored by name, not by prefix
        with torch.device("meta"):
            load_component(file, PREFIX, OpenAITextTransformer(cfg), (), torch.float32, "cpu")
    layers = config["num_hidden_layers"]
    extra = {PREFIX + f"encoder.layers.{layers}.mlp.fc1.bias": torch.zeros(config["intermediate_size"])}
    with pytest.raises(LoadError, match=f"unexpected key .*encoder.layers.{layers}"):   # a deeper tower's file
        load_tower(write_sd1(tmp_path / "deeper.safetensors", reference, extra), cfg)


def test_config_defaults_are_sd1s():
    cfg = OpenAITextConfig()
    assert (cfg.width, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.max_position_embeddings) == (768, 12, 12, 77)
    assert cfg.intermediate_size == 4 * cfg.width and cfg.vocab_size == 49408 and cfg.layer == "last"
    with pytest.raises(ValueError, match="layer must be"):
        OpenAITextTransformer(replace(ours_config(TINY, "last"), layer="hidden"))


def sd1_reference_tokenizer(tmp_path) -> CLIPTokenizer:
    """transformers' CLIPTokenizer as the SD1 hub files build it: our vocabulary with the specials under OpenAI's
    names ("<|startoftext|>", "<|endoftext|>"), every other argument the class default -- pad_token "<|endoftext|>"."""
    folder = weights_dir()
    vocab = json.loads((folder / "clip_vocab.json").read_text(encoding="utf-8"))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    return CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(folder / "clip_merges.txt"))


def test_sd1_token_ids_equal_transformers(tmp_path):
    hf = sd1_reference_tokenizer(tmp_path)
    assert hf.pad_token_id == EOT == PAD_SD1
    # transformers applies NFC and no html.unescape (test_tokenizer.py): compare where neither matters. Unlike SD2's
    # tokenizer, "!" is ordinary text here, so those prompts are included.
    same = [p for p in PROMPTS if "&" not in p and unicodedata.normalize("NFC", p) == p]
    assert len(same) >= 28 and any("!" in p for p in same)
    ref = torch.tensor(hf(same, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True).input_ids)
    ours = Tokenizer(pad_id=PAD_SD1)(same)
    assert torch.equal(ours, ref)
    assert ours[:, -1].eq(EOT).all()   # short prompts end in padding = EOT, long ones are truncated to end in EOT


@pytest.mark.parametrize("prompt", ["&amp;", "cafe\u0301"])
def test_sd1_cleaning_gap_is_documented(tmp_path, prompt):
    """The tokenizer module's docstring: transformers does not unescape HTML and does apply NFC."""
    hf = sd1_reference_tokenizer(tmp_path)
    ref = hf([prompt], padding="max_length", max_length=CONTEXT_LENGTH, truncation=True).input_ids
    assert not torch.equal(Tokenizer(pad_id=PAD_SD1)([prompt]), torch.tensor(ref))


def test_pad_rule_is_the_only_difference():
    sd1, sd2 = Tokenizer(pad_id=PAD_SD1), Tokenizer()
    a, b = sd1(PROMPTS), sd2(PROMPTS)
    # padding = every position after a row's first EOT (SD2's ids may hold a literal 0, "!", before it)
    padding = torch.arange(CONTEXT_LENGTH) > b.eq(EOT).int().argmax(dim=1, keepdim=True)
    assert torch.equal(a[~padding], b[~padding]) and padding.any()
    assert a[padding].eq(EOT).all() and b[padding].eq(0).all()
    assert sd1(["a cat"])[0].tolist() == [49406, 320, 2368] + [EOT] * (CONTEXT_LENGTH - 3)
    with pytest.raises(ValueError, match="pad_id"):
        Tokenizer(pad_id=1)
