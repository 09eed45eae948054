"""The record of a generation run in its output folder: one JSON line per image, written so that a crash or a
full disk never makes the run unresumable.

Each rank appends to its own DIR/manifest.part<r>.jsonl as images are made; when every planned image is done,
the parts are merged into DIR/manifest.jsonl (written atomically) and removed. A record counts only while its
PNG is on disk, so an image whose record is lost is simply made again by --resume.

A record names no path (medti.files.pseudonyms): the model by its name, a LoRA by its file's name, --init-image and
--mask by the pseudonyms of their bytes, which DIR/names.private.tsv maps to the files.
"""
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from minisd.errors import UserError
from minisd.sampling import SAMPLERS

from ..files.atomic import write_atomic
from ..files.hashes import sha256_of
from ..files.pseudonyms import model_name

# A1111's "Schedule type" for our spacings where it has the same one: Karras, and "Uniform" = k-diffusion's
# DiscreteSchedule (our "kdiffusion"). diffusers' linspace/leading/trailing have no A1111 name.
A1111_SCHEDULES = {"karras": "Karras", "kdiffusion": "Uniform"}
MERGED = "manifest.jsonl"


class ManifestError(UserError):
    """A manifest damaged in a way a crash cannot explain (not just a torn last line)."""


@dataclass
class Job:
    """One image to make: its index (file name), seed, prompt text and term weights; `condition`: which of the run's
    contexts it is sampled with (an image-conditioned run's source or mix fraction; 0 for a prompt's terms)."""
    index: int
    seed: int
    prompt: str
    weights: list
    condition: int = 0

    @property
    def file(self) -> str:
        return f"{self.index:05d}.png"


def batches(jobs: list, per_call: int) -> list:
    """Consecutive jobs with the same term weights and context, at most per_call per UNet batch."""
    groups = []
    for job in jobs:
        first = groups[-1][0] if groups else None
        if first and len(groups[-1]) < per_call and (first.weights, first.condition) == (job.weights, job.condition):
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups


def record(args, job: Job, width: int, height: int, model_hash: str, loaded: dict, inputs: dict) -> dict:
    """One manifest line. Deterministic (no times), so a resumed run can check it continues the same run. `inputs`:
    the pseudonyms of --init-image and --mask (None where not given)."""
    return {"file": job.file, "prompt": job.prompt, "negative": args.negative, "seed": job.seed,
            "steps": args.steps, "cfg": args.cfg, "sampler": args.sampler, "sigmas": args.sigmas,
            "width": width, "height": height, "model": model_name(args.model), "model_sha256": model_hash,
            "embeddings": {token: sha256_of(e.source) if e.source else "" for token, e in sorted(loaded.items())},
            "init_image": inputs["init_image"], "mask": inputs["mask"], "mask_blur": args.mask_blur,
            "strength": args.strength, "paste_back": args.paste_back, "format": args.format}


# Fields a record gained after manifests were first written, with the value every run before them had: before
# --format was recorded, a folder resumed with --format dicom could mix images with and without their .dcm files.
ADDED = {"format": "png"}


def as_written_now(rec: dict, renamed: dict) -> dict:
    """A record as this release writes it, from one an earlier release wrote with paths: the paths given now
    (`renamed`: field -> {path as given: what is written now}) replaced, and a LoRA's file by its name."""
    rec = {k: renamed.get(k, {}).get(v, v) if isinstance(v, str) else v for k, v in rec.items()}
    if isinstance(rec.get("loras"), list):
        rec["loras"] = [{**item, "file": Path(item["file"]).name} if isinstance(item.get("file"), str) else item
                        for item in rec["loras"] if isinstance(item, dict)]
    return rec


def differences(done: dict, planned: dict, renamed: dict) -> list:
    """The names of the fields in which a record on disk differs from the one planned, sorted; a field that an
    older manifest lacks counts as its ADDED value, and one that held a path counts as written now
    (as_written_now), so an old run still resumes."""
    old = as_written_now(ADDED | done, renamed)
    return sorted(k for k in old.keys() | planned.keys() if old.get(k) != planned.get(k))


# What a record's field is called where it is not the flag --FIELD: the size and the files' hashes are read from
# the model and the files, not typed
NAMES = {"width": "image width", "height": "image height", "model_sha256": "the --model file's sha256",
         "embeddings": "--embeddings", "loras": "LoRAs", "condition": "--condition-image"}


def _value(field: str, value) -> str:
    """A record's value as the user would recognise it: a flag's value as typed, hashes cut to 12 digits."""
    if value is None or value == {} or value == []:
        return "none"
    if field == "model_sha256":
        return value[:12]
    if field == "embeddings":   # {token: sha256 of its file}
        return ", ".join(f"{token} {sha[:12]}" for token, sha in value.items())
    if field == "loras":
        return ", ".join(f"{item['name']}:{item['weight']:g} {item['sha256'][:12]}" for item in value)
    if field == "condition":   # the sources by pseudonym: a record holds no file name
        return ", ".join(str(item.get("pseudonym")) for item in value if isinstance(item, dict))
    text = shlex.quote(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def described(done: dict, planned: dict, seed: int, renamed: dict | None = None) -> str:
    """`--steps 3 (now 4), --prompt x (now y)`: how a record on disk differs from the one planned, field by field,
    the saved value first. `seed`: this run's --seed, from which the record's --seed is told (image i's seed is
    --seed plus its row); `renamed`: as for differences."""
    old = as_written_now(ADDED | done, renamed or {})
    words = []
    for field in differences(done, planned, renamed or {}):
        before, now = old.get(field), planned.get(field)
        if field == "seed" and isinstance(before, int):   # the same offset from --seed in both runs: the image's row
            before, now = before - (now - seed), seed
        name = NAMES.get(field, "--" + field.replace("_", "-"))
        words.append(f"{name} {_value(field, before)} (now {_value(field, now)})")
    return ", ".join(words)


def parameters_text(rec: dict) -> str:
    """A1111's `parameters` layout: prompt, "Negative prompt: ...", then "key: value" pairs."""
    schedule = A1111_SCHEDULES.get(rec["sigmas"])
    pairs = [f"Steps: {rec['steps']}", f"Sampler: {SAMPLERS[rec['sampler']].a1111}",
             *([f"Schedule type: {schedule}"] if schedule else []), f"Sigmas: {rec['sigmas']}",
             f"CFG scale: {rec['cfg']}", f"Seed: {rec['seed']}", f"Size: {rec['width']}x{rec['height']}",
             f"Model hash: {rec['model_sha256'][:10]}", f"Model: {Path(rec['model']).name}"]
    if rec["embeddings"]:
        pairs.append("Embeddings: " + ", ".join(rec["embeddings"]))
    if rec.get("condition"):   # an image-conditioned model's sources, by pseudonym (the prompt line is empty)
        pairs.append("Condition image: " + " and ".join(item["pseudonym"] for item in rec["condition"]))
    if "mix" in rec:
        pairs.append(f"Mix: {rec['mix']:g}")
    if rec["init_image"]:
        pairs.append(f"Denoising strength: {rec['strength']}")
    if rec["paste_back"]:
        pairs.append("Paste back: True")   # ours: A1111 always pastes back, so it has no such key
    return f"{rec['prompt']}\nNegative prompt: {rec['negative']}\n" + ", ".join(pairs)


def complete_lines(path: Path) -> list:
    """The records of one manifest file. A last line without its newline is what a crash or a full disk leaves
    mid-append: it is dropped (its image is made again). Any other bad line is damage we will not guess about."""
    text = path.read_text()
    lines = text.split("\n")[:-1]   # a torn tail (no final "\n") is the last piece: left out
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            rec = {}
        if rec is not None and not (isinstance(rec, dict) and isinstance(rec.get("file"), str)):
            raise ManifestError(f"{path}: line {number} is not a manifest record; move the file away and rerun "
                                "with --resume (images without a record are made again)")
        records += [rec] if rec else []
    return records


def read_records(out: Path) -> dict:
    """file -> record, from the merged manifest and any per-rank parts (of this run or of one that died), for the
    images that are on disk."""
    records = {}
    for path in [out / MERGED, *sorted(out.glob("manifest.part*.jsonl"))]:
        if path.is_file():
            records.update((rec["file"], rec) for rec in complete_lines(path) if (out / rec["file"]).is_file())
    return records


def repair(part: Path):
    """Cut a torn last line off a part before appending to it, so the next record starts on a line of its own."""
    if part.is_file():
        data = part.read_bytes()
        if data and not data.endswith(b"\n"):
            os.truncate(part, data.rfind(b"\n") + 1)


def _write_all(fd: int, data: bytes):
    """os.write until every byte is written (a write may take fewer bytes than offered)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append(part: Path, rec: dict):
    """Append one record and flush it to disk. If the write fails (ENOSPC: disk full), the file is cut back to
    where it was, so no half line stays behind; the OSError goes on to the caller, naming the file."""
    fd = os.open(part, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    start = os.fstat(fd).st_size
    try:
        _write_all(fd, (json.dumps(rec) + "\n").encode())
        os.fsync(fd)
    except OSError as e:
        os.ftruncate(fd, start)   # frees what was written: works on a full disk
        raise OSError(e.errno, e.strerror, str(part)) from None
    finally:
        os.close(fd)


def merge(out: Path, planned: dict, renamed: dict) -> bool:
    """If every planned file is done, write manifest.jsonl (sorted, atomically) with every record whose image is
    on disk -- also those a resumed run with a smaller --n did not plan -- and drop the parts. A record of an
    earlier release goes in as written now (as_written_now): the merged manifest holds no path."""
    records = {f: as_written_now(rec, renamed) for f, rec in read_records(out).items()}
    if not set(planned) <= set(records):
        return False
    write_atomic(out / MERGED, "".join(json.dumps(records[f]) + "\n" for f in sorted(records)).encode())
    for part in out.glob("manifest.part*.jsonl"):
        part.unlink(missing_ok=True)
    return True
