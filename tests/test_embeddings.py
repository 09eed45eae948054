"""medti.files.embedding_file: the study's A1111 files, our format, exports, kohya/diffusers inputs, splicing into the
text tower.

References are independent of the code under test: torch.load(weights_only=True) of the raw files, the formats'
dicts written here by hand as A1111 / diffusers / kohya write them, and a hand-made token lookup for encode().
"""
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import minisd
from conftest import TINY_CONFIG
from medti.embeddings import main as embeddings_command
from medti.files import embedding_file as E
from minisd.tokenizer import VOCAB_SIZE

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
CORE = DATA / "paper-embeddings" / "chexpert_cardiomegaly.pt"                  # the copy every core test uses
PAPER = DATA / "paper-embeddings"   # all 8 of the study's files, copied with their licence (MIT)
PAPER_NAMES = ["chexpert_cardiomegaly", "chexpert_healthy", "chexpert_pleural_effusion", "chexpert_pneumonia",
               "pcam_neg", "pcam_pos", "prostate_neg", "prostate_pos"]


def raw(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def tiny():
    """A tiny SD2 with random weights and the full 49,408-row token table (the tokenizer's ids need it)."""
    torch.manual_seed(0)
    cfg = minisd.load_config({**TINY_CONFIG, "text": {**TINY_CONFIG["text"], "vocab_size": VOCAB_SIZE}})
    return minisd.build(cfg, device="cpu")


def emb(token="<x>", n=3, width=32, seed=0, **meta) -> E.Embedding:
    return E.Embedding(token, torch.randn(n, width, generator=torch.Generator().manual_seed(seed)), meta)


# --- the study's files -----------------------------------------------------------------------------------------

def test_core_paper_file():
    e = E.read(CORE)
    ref = raw(CORE)
    assert e.token == "chexpert_cardiomegaly"            # A1111: the file stem, not data["name"]
    assert ref["name"] == "chexpert_cardiomegaly-50000"  # ... which carries the step suffix
    assert e.vectors.shape == (64, 1024) and e.vectors.dtype == torch.float32 and e.vectors.device.type == "cpu"
    assert not e.vectors.requires_grad                   # saved as an nn.Parameter; we keep plain data
    assert torch.equal(e.vectors, ref["string_to_param"]["*"].detach())
    assert e.vectors.norm(dim=1).mean().item() == pytest.approx(37, abs=1)
    assert e.meta == {"name": "chexpert_cardiomegaly-50000", "step": "49999", "sd_checkpoint": "09dd2ae4",
                      "sd_checkpoint_name": "checkpoints_512-base-ema"}
    assert ref["string_to_token"] == {"*": 265}


@pytest.mark.parametrize("name", PAPER_NAMES)
def test_all_paper_files(name):
    path = PAPER / f"{name}.pt"
    ref = raw(path)                                      # weights_only accepts them as they are
    e = E.read(path)
    assert e.token == name and e.vectors.shape == (64, 1024) and e.vectors.dtype == torch.float32
    assert torch.equal(e.vectors, ref["string_to_param"]["*"].detach())
    expected = 52 if name.startswith("prostate") else 37
    assert e.vectors.norm(dim=1).mean().item() == pytest.approx(expected, abs=1.5)
    assert int(e.meta["step"]) in ((100_000,) if expected == 52 else (49_999, 50_000))


def test_read_all_folder_and_duplicates(tmp_path):
    found = E.read_all([PAPER])                          # the LICENSE beside them is skipped
    assert sorted(found) == PAPER_NAMES
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    for sub in ("a/deep", "b"):
        (tmp_path / sub / "chexpert_cardiomegaly.pt").write_bytes(CORE.read_bytes())
    duplicate = r"b/chexpert_cardiomegaly.pt: token .* also defined by .*a/deep/chexpert_cardiomegaly"
    with pytest.raises(E.EmbeddingError, match=duplicate):
        E.read_all([tmp_path])


def test_read_all_files_and_folders(tmp_path):
    E.write(tmp_path / "x.safetensors", emb("<x>"))
    (tmp_path / "notes.txt").write_text("not an embedding")
    found = E.read_all([tmp_path, CORE])
    assert sorted(found) == ["<x>", "chexpert_cardiomegaly"]
    assert found["<x>"].source == str(tmp_path / "x.safetensors")


# --- our format and the exports ---------------------------------------------------------------------------------

def test_ours_round_trip(tmp_path):
    e = emb("<healthy>", 64, 1024, step="500", base_preset="sd2-base", base_sha256="ab" * 32, init="chest",
            lr="0.005", data_sha256="cd" * 32)
    path = tmp_path / "healthy.safetensors"
    E.write(path, e)
    assert path.stat().st_size < 1_000_000               # 64 x 1024 fp32 = 256 KiB + a small header
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["<healthy>"]
        meta = f.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["token"] == "<healthy>" and meta["vectors"] == "64" and meta["lr"] == "0.005"
    back = E.read(path)
    assert back.token == "<healthy>" and torch.equal(back.vectors, e.vectors)
    assert back.meta == {**e.meta, "token": "<healthy>", "vectors": "64"}
    assert os.listdir(tmp_path) == ["healthy.safetensors"]


def test_ours_refuses_inconsistent_metadata(tmp_path):
    save_file({"<a>": torch.zeros(2, 8)}, tmp_path / "a.safetensors", metadata={"token": "<b>", "vectors": "2"})
    with pytest.raises(E.EmbeddingError, match="metadata says token '<b>'"):
        E.read(tmp_path / "a.safetensors")


def test_a1111_export_matches_the_original(tmp_path):
    e = E.read(CORE)
    out = tmp_path / "chexpert_cardiomegaly.pt"
    E.export(e, out, "a1111")
    ours, ref = raw(out), raw(CORE)                      # weights_only loads what we write
    assert list(ours) == list(ref)                       # same keys in A1111's order
    for key in ref:
        if key == "string_to_param":
            assert torch.equal(ours[key]["*"], ref[key]["*"].detach())
        else:
            assert ours[key] == ref[key]
    back = E.read(out)
    assert back.token == e.token and torch.equal(back.vectors, e.vectors) and back.meta == e.meta
    assert out.stat().st_size < 1_000_000


def test_a1111_export_of_a_view_stays_small(tmp_path):
    big = torch.randn(4096, 1024)                        # torch.save of a view would write the whole storage
    E.export(E.Embedding("v", big[:64], {}), tmp_path / "v.pt", "a1111")
    assert (tmp_path / "v.pt").stat().st_size < 1_000_000
    assert raw(tmp_path / "v.pt")["step"] is None and raw(tmp_path / "v.pt")["name"] == "v"


def test_diffusers_export(tmp_path):
    e = emb("<lung>", 4, 1024)
    out = tmp_path / "learned_embeds.safetensors"
    E.export(e, out, "diffusers")
    assert set(load_file(out)) == {"<lung>"} and torch.equal(load_file(out)["<lung>"], e.vectors)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    back = E.read(out)
    assert back.token == "<lung>" and torch.equal(back.vectors, e.vectors)


def test_export_refuses_unknown_format(tmp_path):
    with pytest.raises(E.EmbeddingError, match="unknown export format 'comfy'"):
        E.export(emb(), tmp_path / "x.pt", "comfy")


# --- other people's files, made here as their tools write them --------------------------------------------------

def test_kohya_inputs(tmp_path):
    t = torch.randn(5, 1024)
    save_file({"emb_params": t}, tmp_path / "my_style.safetensors")
    torch.save({"emb_params": t.half()}, tmp_path / "my_style_fp16.pt")   # kohya --save_precision fp16
    a, b = E.read(tmp_path / "my_style.safetensors"), E.read(tmp_path / "my_style_fp16.pt")
    assert a.token == "my_style" and torch.equal(a.vectors, t)
    assert b.token == "my_style_fp16" and b.vectors.dtype == torch.float32 and torch.equal(b.vectors, t.half().float())


def test_diffusers_inputs(tmp_path):
    one = torch.randn(768)                               # older diffusers scripts saved one vector as 1-D
    torch.save({"<cat-toy>": one}, tmp_path / "learned_embeds.bin")
    many = torch.randn(3, 1024)
    save_file({"<m>": many}, tmp_path / "learned_embeds.safetensors", metadata={"format": "pt"})
    a, b = E.read(tmp_path / "learned_embeds.bin"), E.read(tmp_path / "learned_embeds.safetensors")
    assert a.token == "<cat-toy>" and a.vectors.shape == (1, 768) and torch.equal(a.vectors[0], one)
    assert b.token == "<m>" and torch.equal(b.vectors, many) and b.meta == {"format": "pt"}


@pytest.mark.parametrize("data, match", [
    ({"<x>": torch.zeros(1, 2, 8)}, r"shape \[1, 2, 8\], expected \[n, width\]"),
    ({"string_to_param": {"*": torch.zeros(8)}}, r"shape \[8\]"),      # A1111 defines no 1-D form
    ({"string_to_param": {"*": torch.zeros(1, 8), "+": torch.zeros(1, 8)}}, "has 2 entries"),
    ({"a": torch.zeros(1, 8), "b": torch.zeros(1, 8)}, "2 entries"),
    ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, "SDXL"),
    ({"<x>": torch.zeros(1, 8, dtype=torch.long)}, "not a float tensor"),
    ({"<x>": torch.full((1, 8), float("nan"))}, "NaN"),
    (torch.zeros(2, 8), "not a dict"),
])
def test_refusals(tmp_path, data, match):
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(E.EmbeddingError, match=match) as info:
        E.read(tmp_path / "bad.pt")
    assert str(info.value).startswith(str(tmp_path / "bad.pt")) and "\n" not in str(info.value)


def test_refuses_damaged_and_unknown_files(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\xff" * 40)
    (tmp_path / "x.pt").write_bytes(b"not a pickle")
    (tmp_path / "x.ckpt").write_bytes(b"")
    for name, match in (("x.safetensors", "not a readable .safetensors"), ("x.pt", "refused by torch.load"),
                        ("x.ckpt", "unknown extension '.ckpt'"), ("missing.pt", "no such file")):
        with pytest.raises(E.EmbeddingError, match=match) as info:
            E.read(tmp_path / name)
        assert "\n" not in str(info.value)


class Payload:
    """What a hostile .pt can hold: unpickling calls os.system(...)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "plain.pt", "wb") as f:            # a bare pickle stream (legacy torch format)
        pickle.dump({"string_to_param": {"*": Payload(marker)}}, f, protocol=2)
    torch.save({"<x>": Payload(marker)}, tmp_path / "zipped.pt")   # inside torch's zip container
    for name in ("plain.pt", "zipped.pt"):
        with pytest.raises(E.EmbeddingError, match=r"refused by torch.load.*it pickles posix\.system$"):
            E.read(tmp_path / name)
    assert not marker.exists()
    assert embeddings_command(["info", str(tmp_path / "zipped.pt")]) == 2 and not marker.exists()


# --- attach and encode ------------------------------------------------------------------------------------------

def test_attach_refuses_sd1_width_on_sd2():
    sd = minisd.build(minisd.load_config("sd2-base"))     # meta device: attach needs only cfg.width and the tokenizer
    e = E.Embedding("<sd1>", torch.zeros(2, 768), {}, "old/sd1.pt")
    with pytest.raises(E.EmbeddingError) as info:
        E.attach(sd, {"ok": E.read(CORE), "<sd1>": e})
    assert str(info.value) == ("old/sd1.pt: vectors are 768 wide; this model's text tower is 1024 wide (SD2.x, "
                               "OpenCLIP ViT-H/14) -- an embedding for SD1.x (OpenAI CLIP ViT-L/14 text tower); use "
                               "an embedding trained on this model's kind")
    assert sd.text.tokenizer.placeholders == {}               # nothing registered when any width is wrong
    E.attach(sd, {"chexpert_cardiomegaly": E.read(CORE)})
    assert len(sd.text.tokenizer.placeholders["chexpert_cardiomegaly"]) == 64


def test_attach_refuses_width_on_tiny(tiny):
    with pytest.raises(E.EmbeddingError, match="vectors are 48 wide; this model's text tower is 32 wide; use an "
                                               "embedding trained on this model's kind$"):
        E.attach(tiny, {"<x>": emb(width=48)})


def test_attach_refuses_vocabulary_words_and_repeats(tiny):
    with pytest.raises(E.EmbeddingError, match="vocabulary token 'cat</w>'"):
        E.attach(tiny, {"cat": emb("cat")})
    E.attach(tiny, {"<x>": emb()})
    with pytest.raises(E.EmbeddingError, match="already registered"):
        E.attach(tiny, {"<x>": emb()})


def reference_encode(sd, texts, vectors_of):
    """By hand: the frozen table's row for ordinary ids, the right learned vector for placeholder ids."""
    table = sd.text.tower.token_embedding.weight
    owner = {i: (tok, j) for tok, ids in sd.text.tokenizer.placeholders.items() for j, i in enumerate(ids)}
    rows = []
    for ids in sd.text.tokenizer(texts).tolist():
        rows.append(torch.stack([vectors_of[owner[i][0]][owner[i][1]] if i in owner else table[i] for i in ids]))
    return sd.text.tower.forward_embeddings(torch.stack(rows))


def test_encode_matches_hand_reference(tiny):
    embs = {"<lung>": emb("<lung>", 3, seed=1), "<dot>": emb("<dot>", 1, seed=2)}
    E.attach(tiny, embs)
    texts = ["a chest x-ray, <lung> with <dot>", "<dot><lung> <lung>", "no placeholder here"]
    with torch.no_grad():
        ours = tiny.text(texts)
        ref = reference_encode(tiny, texts, {t: e.vectors for t, e in embs.items()})
        plain = tiny.text.tower(tiny.text.tokenizer(texts[2:]))
    assert ours.shape == (3, 77, 32)
    assert torch.equal(ours, ref)
    assert torch.equal(ours[2:], plain)
    assert sum(i >= VOCAB_SIZE for i in tiny.text.tokenizer(texts[:1])[0].tolist()) == 4


def test_encode_gradients_reach_the_override_only(tiny):
    E.attach(tiny, {"<lung>": emb("<lung>", 3, seed=1), "<dot>": emb("<dot>", 1, seed=2)})
    table = tiny.text.tower.token_embedding.weight
    before = table.clone()
    param = torch.nn.Parameter(emb("<lung>", 3, seed=5).vectors)
    out = tiny.text(["a photo of <lung>", "<dot> and <lung>"], override={"<lung>": param})
    with torch.no_grad():
        ref = reference_encode(tiny, ["a photo of <lung>", "<dot> and <lung>"],
                               {"<lung>": param, "<dot>": tiny.text.vectors["<dot>"]})
    assert torch.equal(out.detach(), ref)
    out.square().mean().backward()
    assert param.grad is not None and (param.grad.norm(dim=1) > 0).all()
    assert table.grad is None and torch.equal(table, before)
    with pytest.raises(ValueError, match="override for '<dot>' has shape"):
        tiny.text(["<dot>"], override={"<dot>": param})
    with pytest.raises(ValueError, match="override for '<nope>', which was never added"):
        tiny.text(["x"], override={"<nope>": param})


def test_encode_refuses_placeholder_without_vectors(tiny):
    E.attach(tiny, {"<x>": emb()})
    tiny.text(["<x> only"])
    tiny.text.tokenizer.add_placeholder("<bare>", 2)   # ids without vectors: every row after them would misalign
    with pytest.raises(ValueError, match=r"\['<bare>'\] have ids but no vectors"):
        tiny.text(["<x> only"])


# --- atomic writes ---------------------------------------------------------------------------------------------

def test_atomic_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    E.write(path, emb(seed=1))
    before = path.read_bytes()

    def broken_save(tensors, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(E, "safetensors_bytes", broken_save)
    with pytest.raises(OSError, match="disk full"):
        E.write(path, emb(seed=2))
    with pytest.raises(OSError, match="disk full"):
        E.export(emb(seed=2), tmp_path / "y.safetensors", "diffusers")
    assert os.listdir(tmp_path) == ["x.safetensors"] and path.read_bytes() == before


def test_written_files_follow_the_umask(tmp_path):
    E.write(tmp_path / "x.safetensors", emb())
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


# --- a training run's folder used as an embeddings folder -------------------------------------------------------

def test_a_training_folder_is_named_as_such(tmp_path, capsys):
    """What medti.train leaves in --out: the embedding, a copy per save and state.safetensors. Passing that folder
    names the state file for what it is and, for the copies, says to pass one file."""
    from medti.training.state import save_state
    vectors = torch.nn.Parameter(torch.zeros(2, 32))
    save_state(tmp_path / "state.safetensors", vectors, torch.optim.AdamW([vectors]), {}, 4, {"lr": "0.005"})
    with pytest.raises(E.EmbeddingError, match="medti.train's resumable state, not an embedding; pass the run's "
                                               r"embedding file \(<token>.safetensors"):
        E.read(tmp_path / "state.safetensors")
    (tmp_path / "state.safetensors").unlink()
    E.write(tmp_path / "mine.safetensors", emb("<mine>"))
    E.write(tmp_path / "mine-2.safetensors", emb("<mine>"))
    with pytest.raises(E.EmbeddingError, match="is also defined by .*; pass one of the files rather than their "
                                               "folder$"):
        E.read_all(tmp_path)


def test_an_embedding_of_another_base_model_is_warned_about(capsys):
    """Same width, other model (SD1.5 vs an SD1 fine-tune): a warning naming both hashes; none without a record."""
    mine = emb("<a>", base_sha256="ab" * 32)
    mine.source = "runs/a/a.safetensors"
    E.warn_other_base({"<a>": mine, "<b>": emb("<b>")}, "cd" * 32)
    err = capsys.readouterr().err
    assert err == ("warning: runs/a/a.safetensors: trained on the model with sha256 ababababab, not this one "
                   "(cdcdcdcdcd); its vectors were learned for that model's text tower\n")
    E.warn_other_base({"<a>": mine}, "ab" * 32)
    assert capsys.readouterr().err == ""
