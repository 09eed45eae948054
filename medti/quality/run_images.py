"""What `python -m medti.evaluate --run` generates for a run whose saves are whole models (`--method unet
--keep-saves`): the command line of medti.generate for one step's model, and, for an image-conditioned run
(`--condition dinov2`), the cases it makes variations of.

Which cases: the run's held-out images (val.txt names them by pseudonym; names.private.tsv maps each to its path
under the run's --val folder, or --data with --val-fraction, as command.private.json records them), so a step is
judged on images it never trained on; or every image of `--sources DIR`. A run that held nothing out and no
--sources is refused: scoring on its training images would reward a step for copying them. Every step makes the
same variations (case s, seed + i for i < per_source), so steps differ only by their weights. The real set, unless
--real is given, is those same cases: the question is whether a step's variations look like the cases they vary.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

from minisd.errors import arg
from minisd.tensorfile import open_safetensors

from ..dataset.folder import DataError, find_images, fingerprint_of
from ..dataset.preprocess import Unusable
from ..dataset.sources import item_images, items
from ..files.images import library_warnings
from ..files.pseudonyms import KEY, Numbering, read_key
from ..medical import MedicalError
from ..training.command import read_command
from .features import EvalError
from .folders import ImageSet, to_uint8

# the kinds of saved step: an embedding (textual inversion), a whole text-conditioned or image-conditioned model
EMBEDDING, TEXT_MODEL, IMAGE_MODEL = "embedding", "text model", "image model"


@dataclass
class RunPlan:
    """What the steps of one run are and what each generates from."""
    kind: str
    settings: dict = field(default_factory=dict)   # the run's TrainConfig settings (command.private.json), or {}
    sources: list = field(default_factory=list)    # image model: the cases' files, in order
    per_source: int = 0                            # image model: variations of each case per step
    where: str = ""                                # image model: where the cases came from, in words

    @property
    def n_fake(self) -> int:
        return self.per_source * len(self.sources)


def metadata(file: Path) -> dict:
    """A step file's safetensors metadata ({} where it has none), or one line naming it."""
    try:
        with open_safetensors(file) as f:
            return f.metadata() or {}
    except Exception as e:   # a torn or foreign file: whatever safetensors raises, the one line names the file
        raise EvalError(f"{arg('run')}: {file} is not a readable safetensors file ({type(e).__name__}); move it "
                        "away or train again") from None


def kind_of(file: Path) -> str:
    meta = metadata(file)
    if meta.get("format") != "medti-unet":
        return EMBEDDING
    return IMAGE_MODEL if "image_condition" in meta else TEXT_MODEL


def plan_run(args, run: Path, first: Path) -> RunPlan:
    """The run's kind (from its first step file), and for an image model the cases and how many of each."""
    kind = kind_of(first)
    settings = (read_command(run) or {}) if kind != EMBEDDING else {}
    if kind != IMAGE_MODEL:
        if args.sources:
            raise EvalError(f"--sources is for an image-conditioned run's cases; {run} saved {kind}s: leave it out")
        return RunPlan(kind, settings)
    sources, where = (folder_sources(Path(args.sources)) if args.sources else held_out(run, settings))
    return RunPlan(kind, settings, sources, math.ceil(args.n / len(sources)), where)


def folder_sources(folder: Path) -> tuple:
    """Every image of --sources DIR, in path order."""
    try:
        files = find_images(folder)
    except DataError:
        raise EvalError(f"--sources {folder}: not a folder; give a folder of images the run did not train on") \
            from None
    if not files:
        raise EvalError(f"--sources {folder}: no images in it; give a folder of images the run did not train on")
    return [str(f) for f in files], f"the {len(files)} images of --sources"


def held_out(run: Path, settings: dict) -> tuple:
    """The run's held-out images, val.txt's pseudonyms through names.private.tsv to files under --val or --data."""
    val = run / "val.txt"
    if not val.is_file():
        raise EvalError(f"--run {run}: the run held no images out (no val.txt: trained without --val-fraction or "
                        "--val); give --sources DIR, images of the same kind the run did not train on")
    names = [line for line in val.read_text(encoding="utf-8").splitlines() if line]
    key = read_key(run / KEY) if (run / KEY).is_file() else {}
    flag = "val" if settings.get("val") else "data"
    base = Path(settings.get(flag) or ".")
    files = []
    for name in names:
        if name not in key or "#" in name:   # a slice of a volume: a file alone does not say which one
            why = "is a slice of a volume" if "#" in name else f"is not in {KEY}"
            raise EvalError(f"--run {run}: held-out image {name} {why}; give --sources DIR with the held-out "
                            "images as image files")
        path = base / key[name]
        if not path.is_file():
            raise EvalError(f"--run {run}: held-out image {name} is not at {path} (under the run's --{flag}, as "
                            "command.private.json records it); give --sources DIR with the held-out images")
        files.append(str(path))
    return files, f"the run's {len(files)} held-out images (val.txt)"


def model_argv(args, plan: RunPlan, file: Path, folder: Path) -> list:
    """medti.generate's command line for a step saved as a whole model: variations of each case, or the prompt
    the run trained with (--prompt replaces it)."""
    argv = ["--model", str(file)]
    if plan.kind == IMAGE_MODEL:
        argv += [a for source in plan.sources for a in ("--condition-image", source)]
        argv += ["--n", str(plan.per_source)] + case_flags(args, plan.settings)
        encoder = args.encoder or plan.settings.get("encoder", "")
        argv += ["--encoder", encoder] if Path(encoder).is_dir() else []   # a hub release is found by its name
    else:
        argv += ["--prompt", args.prompt or metadata(file).get("instance_prompt", ""), "--n", str(args.n)]
    config = args.config or plan.settings.get("config", "")
    return argv + (["--config", config] if config else [])


def case_flags(args, settings: dict) -> list:
    """How medti.generate reads each case: as the run read its training images (its --preprocess, --window and
    --plane; evaluate's own --window, when typed, as the real set is read with it), so the encoder sees the square
    it was trained on. Left to generate's defaults, a run trained with --preprocess cxr or --window lung would be
    judged on variations of cases it never saw prepared that way."""
    flags = ["--preprocess", settings.get("preprocess") or "center", "--plane", settings.get("plane") or "axial"]
    window = args.window or settings.get("window") or ""
    return flags + ([f"--window={window}"] if window else [])   # "=": a window may start with "-" (-600,1500)


def cases_set(plan: RunPlan, how) -> ImageSet:
    """The cases as the real set, when --real is left out: each file read as --real reads a folder's images (the
    data flags, the native size), named by the pseudonym of its bytes."""
    images, names, used, numbering = [], [], {}, Numbering()
    for path in plan.sources:
        file = Path(path)
        try:
            with library_warnings():
                [(name, source)] = items(file.parent, [file], None, skip=None)
                read, data = item_images(file.parent, name, source, None, how.options)
        except (Unusable, MedicalError, DataError, ValueError) as e:
            raise EvalError(f"{plan.where}: {path}: {e}") from None
        images.append(to_uint8(read[0][1]))
        names.append(numbering.item(data))
        used.update({str(file.parent / rel): content for rel, content in data.items()})
    return ImageSet(images, names, Path("."), patients=list(names), pseudonyms=list(names),
                    fingerprint=fingerprint_of(used))
