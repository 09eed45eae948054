"""LoRA files at generation time: `--lora FILE[:WEIGHT]`, A1111's `<lora:NAME:WEIGHT>` prompt tags, merging them into
the loaded model, and how each is recorded (PNG `parameters`, manifest, merged checkpoints).

Behaviour follows AUTOMATIC1111/stable-diffusion-webui (facts read from its source, no code taken):
  * modules/extra_networks.py: a tag is `<lora:NAME>` or `<lora:NAME:WEIGHT>` (re `<(\\w+):([^>]+)>`, items split on
    ":"), removed from the prompt before the prompt is split on AND and encoded; missing weight = 1.0
    (extra_networks_default_multiplier). NAME is a file stem in models/Lora (extensions-builtin/Lora/networks.py).
  * extra_networks_lora.py: every tag applies its file at its weight; the image's infotext gets
    `Lora hashes: "NAME: HASH, ..."` (NAME without ":" and ","; quoted because the value holds ":" and ",", as
    modules/infotext_utils.py `quote` does), HASH = the first 12 hex of the file's hash, which for a .safetensors
    file is kohya's "addnet" hash (network.py `use_addnet_hash`; modules/hashes.py addnet_hash_safetensors: sha256
    of the bytes after the safetensors header), for other files the sha256 of the whole file.

Our rule where a file is named more than once (flag and tag, or two tags): every mention applies the file at its
own weight, so the weights add up (A1111 also applies each mention). Applying = `lora_file.read` then
`minisd.lora.merge` per file, one after another, into the loaded weights: sampling then costs nothing extra, and
since each merge adds w * alpha / r * up @ down, the order of the files only changes float rounding. Where A1111
takes separate text/UNet weights (`<lora:NAME:TE:UNET>`) we refuse the tag rather than guess.
"""
import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from minisd import lora
from minisd.errors import UserError
from minisd.tensorfile import open_safetensors

from ..files import lora_file
from ..files.hashes import sha256_of

TAG = re.compile(r"<lora:([^>]*)>")           # A1111's extra-network syntax, the `lora` kind only
NUMBERISH = re.compile(r"[-+.\d]")            # a `:` suffix that starts like a number is meant as a weight
SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt")   # what A1111 lists in models/Lora
# A LoRA's weight multiplies the update it was trained to make (A1111 users write 0.3-1, kohya's recipes up to 2):
# at 100 times that the update swamps the layer, and at 1e30 it overflowed into NaN images blamed on the model.
MAX_WEIGHT = 100.0


class LoRAError(UserError):
    """A --lora, --lora-dir or <lora:...> mistake, one line."""


@dataclass(frozen=True)
class LoRASpec:
    """One LoRA to merge: its name (file stem, as in A1111's tags), file and total weight."""
    name: str
    path: Path
    weight: float


def add_arguments(add):
    """--lora and --lora-dir on a parser's add_argument."""
    add("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
        help="merge a LoRA file (kohya/A1111 or diffusers/PEFT) at WEIGHT (default 1) into the model (repeatable)")
    add("--lora-dir", action="append", default=[], metavar="DIR",
        help="folder where <lora:NAME:WEIGHT> in the prompt finds NAME.safetensors (A1111's models/Lora; repeatable)")


def weight_of(text: str, where: str) -> float:
    """A finite number, or a one-line error naming where it was written."""
    try:
        weight = float(text)
    except ValueError:
        raise LoRAError(f"{where}: weight {text!r} is not a number; write e.g. :0.7") from None
    if not math.isfinite(weight):
        raise LoRAError(f"{where}: weight {text!r} is not finite; write e.g. :0.7")
    if abs(weight) > MAX_WEIGHT:
        raise LoRAError(f"{where}: weight {weight:g} is beyond +-{MAX_WEIGHT:g}; write e.g. :0.7")
    return weight


def parse_flag(spec: str) -> tuple[Path, float]:
    """`FILE`, `FILE:0.7`. Split at the last ":" (a folder may hold ":"), only where what follows is meant as a
    weight: the whole spec is no file, and the tail starts like a number or the head is a file."""
    head, sep, tail = spec.rpartition(":")
    if not sep or Path(spec).is_file() or not (NUMBERISH.match(tail) or Path(head).is_file()):
        path, weight = Path(spec), 1.0
    else:
        path, weight = Path(head), weight_of(tail, f"--lora {spec}")
    if path.is_dir():   # a folder of LoRAs is what --lora-dir takes
        raise LoRAError(f"--lora {spec}: {path} is a folder; name a file in it, or give --lora-dir {path} and "
                        "<lora:NAME> tags in the prompt")
    if not path.is_file():
        raise LoRAError(f"--lora {spec}: no such file {path}")
    return path, weight


def tags(prompt: str) -> list[tuple[str, float, str]]:
    """The `<lora:...>` tags of a prompt as (name, weight, tag text)."""
    found = []
    for match in TAG.finditer(prompt):
        items = match[1].split(":")
        if not items[0] or len(items) > 2:
            raise LoRAError(f"--prompt tag {match[0]}: write <lora:NAME> or <lora:NAME:WEIGHT> (separate text and "
                            "UNet weights, A1111's <lora:NAME:TE:UNET>, are not supported)")
        found.append((items[0], weight_of(items[1], f"--prompt tag {match[0]}") if len(items) > 1 else 1.0, match[0]))
    return found


def strip_tags(prompt: str) -> str:
    """The prompt as the text tower sees it: tags removed (as A1111 does, before AND splits it)."""
    return TAG.sub("", prompt)


def find(name: str, known: dict, folders: list, tag: str) -> Path:
    """The file a tag names: a --lora file with that stem, else NAME + a LoRA suffix directly inside a --lora-dir.
    Only a plain file name is looked up: a tag in a prompt (which may come from someone else's prompt list) must not
    reach a file outside the folders the user named, so folders, `..`, absolute paths and wildcards are refused."""
    if name in known:
        return known[name]
    if Path(name).name != name or name in (".", "..") or any(c in name for c in "*?[]\\"):
        raise LoRAError(f"--prompt tag {tag}: {name!r} is not a file name; a tag names a file directly inside a "
                        "--lora-dir (NAME for NAME.safetensors), without folders or wildcards; or pass it with --lora")
    candidates = [Path(folder) / f"{name}{suffix}" for folder in folders for suffix in SUFFIXES]
    hits = [path for path in candidates if path.is_file()]
    if len(hits) > 1:
        raise LoRAError(f"--prompt tag {tag}: {len(hits)} files are named {name} ({hits[0]}, {hits[1]}); "
                        "pass the one you mean with --lora")
    if not hits:
        where = (f"or in --lora-dir {', '.join(map(str, folders))}" if folders else
                 f"and no --lora-dir to look in: pass --lora-dir FOLDER (holding {name}.safetensors) or --lora FILE")
        raise LoRAError(f"--prompt tag {tag}: no LoRA file named {name} among the --lora files {where}")
    return hits[0]


def plan(flags: list, folders: list, prompts: list, negative: str = "") -> list[LoRASpec]:
    """Every LoRA of a run, each file once with the sum of the weights its mentions give (module docstring),
    in the order of first mention: --lora flags, then the prompt's tags. Checked before any model is loaded."""
    if TAG.search(negative):   # a LoRA changes the model for every term; it cannot apply to the negative alone
        raise LoRAError(f"--negative: {TAG.search(negative)[0]} belongs in --prompt (or use --lora)")
    for folder in folders:
        if not Path(folder).is_dir():
            raise LoRAError(f"--lora-dir {folder}: not a folder")
    mentions = [(path.stem, path, weight) for path, weight in map(parse_flag, flags)]
    known = {stem: path for stem, path, _ in mentions}
    for prompt in prompts:
        mentions += [(name, find(name, known, folders, tag), w) for name, w, tag in tags(prompt)]
    total: dict[Path, LoRASpec] = {}   # by resolved path: two spellings of one file are one file
    for name, path, weight in mentions:
        first = total.get(path.resolve())
        total[path.resolve()] = LoRASpec(first.name, first.path, first.weight + weight) if first else \
            LoRASpec(name, path, weight)
    return list(total.values())


def check_generation(spec: LoRASpec, sd):
    """kohya's trainers store `ss_v2` ("True": made on SD2) in the file, as ours do; where it names the other
    generation the file is refused even if every shape happens to fit (real SD1 and SD2 files differ in shape too:
    768- vs 1024-wide text, which lora_file.read reports)."""
    try:
        with open_safetensors(spec.path) as f:
            made = (f.metadata() or {}).get("ss_v2")
    except Exception:   # not safetensors, or unreadable: lora_file.read says which in its own words
        return
    ours, theirs = "SD2" if sd.config.text.tower == "openclip" else "SD1", {"True": "SD2", "False": "SD1"}.get(made)
    if theirs and theirs != ours:
        raise LoRAError(f"--lora {spec.path}: made for {theirs} (its metadata ss_v2 is {made}); this model is {ours}")


def apply(sd, specs: list[LoRASpec]):
    """Merge each file into the model's UNet and text tower, one after another (read, then merge: lora_file.read
    refuses a layer that already has an adapter). A refused file is one line naming the flag."""
    for spec in specs:
        check_generation(spec, sd)
        try:
            lora_file.read(spec.path, sd.unet, sd.text.tower, spec.weight)
        except lora_file.LoRAFileError as err:
            raise LoRAError(f"--lora {err}") from None
        lora.merge(sd.unet)
        lora.merge(sd.text.tower)
        check_merged(spec, sd)
    return sd


def check_merged(spec: LoRASpec, sd):
    """Every weight finite after the merge: a huge alpha or --lora weight (1e30) overflows the update, and the images
    would come out black or NaN with the model blamed. The scan costs about one read of the weights (minisd's
    check_finite measured 0.4-0.6 s per 2.5 GB on a CPU)."""
    for part, model in (("UNet", sd.unet), ("text tower", sd.text.tower)):
        for name, weight in model.named_parameters():
            if not torch.isfinite(weight).all():
                raise LoRAError(f"--lora {spec.path}: at weight {spec.weight:g} it makes the {part}'s {name} NaN or "
                                f"infinite in {str(weight.dtype).replace('torch.', '')}; its alpha or the weight is "
                                "far too large")


@functools.cache   # a run records it with every image: hash each file once
def short_hash(path: Path) -> str:
    """A1111's LoRA hash (module docstring): 12 hex of the addnet hash of a .safetensors file, else of its sha256."""
    if path.suffix != ".safetensors":
        return sha256_of(path)[:12]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))   # 8-byte little-endian header size, then the JSON header
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def describe(specs: list[LoRASpec]) -> list[dict]:
    """What a manifest line or a merged checkpoint records of each LoRA: its file by name, never by path (a shared
    file holds none: medti.files.pseudonyms), and its hashes."""
    return [{"name": s.name, "file": s.path.name, "sha256": sha256_of(s.path), "a1111_hash": short_hash(s.path),
             "weight": s.weight} for s in specs]


def record(specs: list[LoRASpec]) -> dict:
    """The manifest's "loras" entry; none without LoRAs, so runs made before LoRAs existed still resume."""
    return {"loras": describe(specs)} if specs else {}


def parameters(rec: dict, text: str) -> str:
    """A1111's parameters text with `Lora hashes` appended to its settings line. The prompt keeps its tags, as
    A1111's does, so pasting it into A1111 (with the same files) applies the same LoRAs."""
    if not rec.get("loras"):
        return text
    value = ", ".join(f"{item['name'].translate(str.maketrans('', '', ':,'))}: {item['a1111_hash']}"
                      for item in rec["loras"])
    weights = ", ".join(f"{item['name']}: {item['weight']:g}" for item in rec["loras"])
    # `Lora weights` is ours: a --lora flag leaves no tag in the prompt to carry its weight
    return f"{text}, Lora hashes: {json.dumps(value)}, Lora weights: {json.dumps(weights)}"
