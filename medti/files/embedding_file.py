"""Textual-inversion embeddings: read the formats people have, write ours, splice vectors into the text tower.

Formats (facts read from each project's source; no code taken from them):
  * ours: `.safetensors`, one float32 tensor [n, width] under the key = the token ("<healthy>"), string metadata
    (token, vectors, step, base_model, base_sha256, init, lr, data_sha256). It is also a valid diffusers file.
  * AUTOMATIC1111 `.pt`/`.bin` (stable-diffusion-webui modules/textual_inversion/textual_inversion.py, Embedding.save
    and load_from_file): a pickled dict {"string_to_token": {"*": 265}, "string_to_param": {"*": [n, width]}, "name",
    "step", "sd_checkpoint", "sd_checkpoint_name"}. A1111's token is the FILE STEM, and ours; diffusers takes "name",
    which can carry a "-50000" step suffix (3 of the study's 8 files). A1111 writes no `.safetensors` embeddings;
    it reads them with safetensors.torch.load_file and takes exactly one tensor of any name (or an SDXL clip_l +
    clip_g pair), named after the file stem too: for a diffusers file A1111's token (stem) and ours (key) differ.
  * diffusers `learned_embeds.bin`/`.safetensors` (diffusers loaders/textual_inversion.py and
    examples/textual_inversion/textual_inversion.py save_progress): {token: [n, width]}; older scripts saved a 1-D
    [width] tensor, which diffusers, A1111 and kohya all read as one vector. The token is the key.
  * kohya sd-scripts (train_textual_inversion.py save_weights): {"emb_params": [n, width]} in `.safetensors` or a
    torch.save `.pt`, maybe fp16; the token is the file stem, as A1111 reads it (its one-tensor rule).
Pickles are only ever opened with torch.load(weights_only=True): tensors and plain containers, never arbitrary code.
"""
import io
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minisd.errors import UserError, excerpt
from minisd.tensorfile import open_safetensors

from .atomic import safetensors_bytes, write_atomic

EXTENSIONS = (".pt", ".bin", ".safetensors")


class EmbeddingError(UserError):
    """An embedding file or use we refuse; the message is one line naming the file and what was found."""


@dataclass
class Embedding:
    token: str                  # the text that stands for the vectors in a prompt
    vectors: torch.Tensor       # [n, width] float32 on the CPU
    meta: dict[str, str] = field(default_factory=dict)
    source: str = field(default="", compare=False)   # the file it was read from, for error messages


def _vectors(path, tensor, what: str, flat_ok: bool) -> torch.Tensor:
    """Check and normalise one tensor to [n, width] float32 CPU. A 1-D tensor is one vector only where the format
    says so (diffusers, kohya); no format defines a 3-D tensor, so none is reshaped."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        found = getattr(tensor, "dtype", type(tensor).__name__)
        raise EmbeddingError(f"{path}: {what} holds {found}, not a float tensor of vectors")
    tensor = tensor[None] if tensor.ndim == 1 and flat_ok else tensor   # [width] -> [1, width]
    if tensor.ndim != 2 or tensor.shape[0] < 1:
        raise EmbeddingError(f"{path}: {what} has shape [{', '.join(map(str, tensor.shape))}], expected [n, width]")
    # clone(): our own compact storage, never a view into a bigger one (torch.save would write the whole storage).
    tensor = tensor.detach().to("cpu", torch.float32).contiguous().clone()
    if not torch.isfinite(tensor).all():
        raise EmbeddingError(f"{path}: {what} holds NaN or inf values")
    return tensor


def _load(path: Path) -> tuple[object, dict]:
    """(contents, safetensors metadata) of one file, without running any code from it."""
    if path.suffix == ".safetensors":
        try:
            with open_safetensors(path) as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:   # safetensors raises its own error types for a damaged header
            raise EmbeddingError(f"{path}: not a readable .safetensors file ({type(e).__name__})") from None
    try:
        # weights_only=True: the unpickler rebuilds tensors and plain containers only and refuses any other global
        # (os.system, a Lightning object, an old nn.ParameterDict). The study's A1111 files pass: they hold an
        # nn.Parameter, which is on the allow-list. They were saved from cuda:0, hence map_location.
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except Exception as e:   # UnpicklingError for a refused global, RuntimeError/EOFError for a damaged file
        text = re.sub(r"\x1b\[\d+m", "", str(e))   # colour codes some torch builds put in the message
        found = re.search(r"GLOBAL ([\w.]+)", text)   # the name of the refused global, if that was the reason
        # torch's weights-only refusals open with the same advice (to load with weights_only=False, which would run
        # the file's code); what differs, and what is said, follows "WeightsUnpickler error:"
        reason = re.search(r"WeightsUnpickler error:(.+?)(?:Check the documentation|$)", text, re.S)
        why = f"it pickles {found[1]}" if found else excerpt(reason[1] if reason else text)
        raise EmbeddingError(f"{path}: refused by torch.load(weights_only=True): {type(e).__name__}, {why}") from None


def read(path) -> Embedding:
    """One embedding file in any format above -> Embedding. The caller checks the width against its model."""
    path = Path(path)
    if not path.is_file():   # first: a missing folder's name has no extension, and was called an unknown one
        raise EmbeddingError(f"{path}: " + ("a folder; give one embedding file" if path.is_dir() else
                                            "no such file" if not path.exists() else "not a regular file"))
    if path.suffix not in EXTENSIONS:
        raise EmbeddingError(f"{path}: unknown extension {path.suffix!r}; embeddings are {', '.join(EXTENSIONS)}")
    data, meta = _load(path)
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path}: holds a {type(data).__name__}, not a dict of embedding tensors")
    if isinstance(data.get("string_to_param"), dict):   # A1111
        params = data["string_to_param"]
        if len(params) != 1:
            raise EmbeddingError(f"{path}: A1111 string_to_param has {len(params)} entries, expected one")
        vectors = _vectors(path, next(iter(params.values())), "string_to_param['*']", flat_ok=False)
        # Metadata as strings; None (A1111 writes sd_checkpoint=None when unknown) is left out.
        meta = {k: str(data[k]) for k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name")
                if data.get(k) is not None}
        return Embedding(path.stem, vectors, meta, str(path))
    if "clip_l" in data or "clip_g" in data:
        raise EmbeddingError(f"{path}: an SDXL embedding (clip_l/clip_g); SD1 and SD2 have one text tower")
    if "settings" in meta and "vectors" in data:   # medti.train's state.safetensors (inversion.save_state)
        raise EmbeddingError(f"{path}: medti.train's resumable state, not an embedding; pass the run's embedding "
                             f"file (<token>.safetensors in the same folder) instead of the folder or this file")
    if len(data) != 1:
        keys = ", ".join(map(str, list(data)[:5])) + (", ..." if len(data) > 5 else "")
        raise EmbeddingError(f"{path}: {len(data)} entries ({keys}); expected one tensor, or A1111 string_to_param")
    key, tensor = next(iter(data.items()))
    vectors = _vectors(path, tensor, repr(key), flat_ok=True)
    if key == "emb_params":   # kohya: the key is fixed, the token is the file stem
        return Embedding(path.stem, vectors, meta, str(path))
    if meta.get("token", key) != key or meta.get("vectors", str(len(vectors))) != str(len(vectors)):
        raise EmbeddingError(f"{path}: metadata says token {meta.get('token')!r} x {meta.get('vectors')} vectors, "
                             f"but the file holds {key!r} x {len(vectors)}")
    return Embedding(str(key), vectors, meta, str(path))   # diffusers, or ours (diffusers plus metadata)


def embedding_files(paths) -> list[Path]:
    """Files as given, folders searched recursively for .pt .bin .safetensors (sorted; other files skipped)."""
    files: list[Path] = []
    for p in map(Path, [paths] if isinstance(paths, (str, os.PathLike)) else paths):
        if not p.is_dir():
            files.append(p)
            continue
        found = sorted(f for f in p.rglob("*") if f.suffix in EXTENSIONS and f.is_file())
        if not found:
            raise EmbeddingError(f"{p}: a folder without embedding files ({', '.join(EXTENSIONS)})")
        files += found
    return files


def read_all(paths) -> dict[str, Embedding]:
    """Files and folders (see embedding_files) -> {token: Embedding}; a token defined twice is an error."""
    found: dict[str, Embedding] = {}
    for f in embedding_files(paths):
        emb = read(f)
        if emb.token in found:
            # the usual cause: a training run's folder, which keeps a copy per save beside the final file
            raise EmbeddingError(f"{f}: token {emb.token!r} is also defined by {found[emb.token].source}; pass one "
                                 "of the files rather than their folder")
        found[emb.token] = emb
    return found


def write(path, emb: Embedding) -> None:
    """Our format: {token: [n, width] float32} safetensors with string metadata (token and vectors filled in)."""
    vectors = _vectors(path, emb.vectors, emb.token, flat_ok=False)
    meta = {k: str(v) for k, v in emb.meta.items()} | {"token": emb.token, "vectors": str(len(vectors))}
    write_atomic(path, safetensors_bytes({emb.token: vectors}, metadata=meta))


FORMAT_NAMES = {"a1111": "an A1111", "diffusers": "a diffusers"}   # "a a1111 file" read as a typo


def export(emb: Embedding, path, fmt: str) -> None:
    """fmt "a1111": the dict A1111's Embedding.save writes (torch.save of plain dicts, ints, strings and one
    tensor, so weights_only loading accepts it); A1111 names it after the file stem, so name the file after the
    token. fmt "diffusers": {token: [n, width]} safetensors with diffusers' metadata {"format": "pt"}."""
    suffixes = {"a1111": (".pt", ".bin"), "diffusers": (".safetensors",)}.get(fmt)
    if suffixes and Path(path).suffix not in suffixes:   # read() goes by the extension, as A1111 and diffusers do
        raise EmbeddingError(f"{path}: {FORMAT_NAMES[fmt]} file must end in {' or '.join(suffixes)}")
    vectors = _vectors(path, emb.vectors, emb.token, flat_ok=False)
    if fmt == "a1111":
        data = {"string_to_token": {"*": 265},   # 265 is "*" in CLIP's vocabulary; A1111 writes it, never reads it
                "string_to_param": {"*": vectors},
                "name": emb.meta.get("name", emb.token),
                "step": int(emb.meta["step"]) if emb.meta.get("step", "").isdigit() else None,
                "sd_checkpoint": emb.meta.get("sd_checkpoint"),
                "sd_checkpoint_name": emb.meta.get("sd_checkpoint_name")}
        buffer = io.BytesIO()
        torch.save(data, buffer)
        write_atomic(path, buffer.getvalue())
    elif fmt == "diffusers":
        write_atomic(path, safetensors_bytes({emb.token: vectors}, metadata={"format": "pt"}))
    else:
        raise EmbeddingError(f"{path}: unknown export format {fmt!r}; use a1111 or diffusers")


# Text-tower width -> the models that have it, for refusing an embedding made for the other generation.
WIDTHS = {768: ("SD1.x", "OpenAI CLIP ViT-L/14"), 1024: ("SD2.x", "OpenCLIP ViT-H/14")}


def attach(sd, embeddings: dict[str, Embedding]) -> None:
    """Teach the model's text conditioning each embedding's token (n new ids >= 49408 and its vectors). All
    widths are checked before anything is added: vectors learned on one text tower mean nothing to another."""
    width = sd.text.width
    for emb in embeddings.values():
        found = emb.vectors.shape[-1]
        if emb.vectors.ndim != 2 or found != width:
            made = " -- an embedding for {} ({} text tower)".format(*WIDTHS[found]) if found in WIDTHS else ""
            model = " ({}, {})".format(*WIDTHS[width]) if width in WIDTHS else ""
            raise EmbeddingError(f"{emb.source or emb.token}: vectors are {found} wide; this model's text tower "
                                 f"is {width} wide{model}{made}; use an embedding trained on this model's kind")
    for emb in embeddings.values():
        try:
            sd.text.add(emb.token, emb.vectors)
        except ValueError as e:   # a vocabulary word, or already added
            raise EmbeddingError(f"{emb.source or emb.token}: {e}") from None


def warn_other_base(embeddings: dict[str, Embedding], model_sha256: str) -> None:
    """The width check cannot tell two models of one generation apart (SD1.5 and a medical SD1 fine-tune are both
    768 wide), but our files record the model they were trained on: say so when it is another one. A warning, not
    an error: trying an embedding on a related model is a legitimate experiment."""
    for e in embeddings.values():
        base = e.meta.get("base_sha256", "")
        if base and base != model_sha256:
            print(f"warning: {e.source}: trained on the model with sha256 {base[:10]}, not this one "
                  f"({model_sha256[:10]}); its vectors were learned for that model's text tower", file=sys.stderr)


def summary(e: Embedding) -> str:
    return (f"token {e.token!r}, {len(e.vectors)} vectors x {e.vectors.shape[1]}, "
            f"mean vector norm {e.vectors.norm(dim=1).mean().item():.2f}")
