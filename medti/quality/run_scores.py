"""Scoring a training run's saved steps: `python -m medti.evaluate --run runs/x --real data/x --out eval/x`.

For every `<name>-<step>.safetensors` a training run saved, `--n` images are generated with that step's vectors
(the same seeds for every step, so steps differ only by their vectors) into OUT/step-<step>/, and scored against
the real set, which is encoded once. Written: OUT/steps.json (one record per step), OUT/steps.md (the table, with
the run's val_loss beside it where the run logged one) and OUT/kid.png (KID against step). Re-running into the
same OUT reuses the images already made (generation resumes), so adding steps or metrics costs only what is new.
"""
import json
import re
import sys
from pathlib import Path

from minisd.config import presets
from minisd.errors import arg
from minisd.load import resolve

from ..files.atomic import text_bytes, write_atomic
from ..files.embedding_file import read as read_embedding
from ..files.plots import plot_curve
from ..generation import flags as generation_flags
from ..generation import run as generation
from .features import EvalError, encode, provenance
from .folders import load_set
from .scoring import check_sizes, progress, score

STEP_FILE = re.compile(r"^(?P<name>.+)-(?P<step>\d+)\.safetensors$")   # what medti.train writes at each save
KEYS = ("fid", "kid", "kid_mean", "kid_std", "precision", "recall", "ms_ssim_fake", "n_fake")


def step_files(run: Path) -> list:
    """(step, file) of every saved step of a run, in step order."""
    if not run.is_dir():
        raise EvalError(f"{arg('run')} {run}: {'not a' if run.exists() else 'no such'} folder; give a medti.train "
                        "--out folder")
    found = sorted((int(m["step"]), p) for p in run.glob("*.safetensors") if (m := STEP_FILE.match(p.name)))
    if not found:
        raise EvalError(f"{arg('run')} {run}: no <name>-<step>.safetensors files; is this a medti.train --out "
                        "folder with at least one save?")
    return found


def val_losses(run: Path) -> dict:
    """step -> val_loss from the run's log.jsonl, where it logged one (medti.train --val); a torn line is skipped."""
    losses = {}
    log = run / "log.jsonl"
    for line in log.read_text(encoding="utf-8").splitlines() if log.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("val_loss") is not None:
            losses[record["step"]] = record["val_loss"]
    return losses


def base_model(file: Path, meta: dict) -> str:
    """The base model a step file names, where it can be loaded as it stands: a preset, or a path that exists (files
    written before paths were kept out of shared files hold one). A file or folder name alone is where the run's
    model was, not where it is: one line asks for --model."""
    model = meta.get("base_model")
    if not model:
        raise EvalError(f"{file}: names no base model; give --model (and --config for a file outside the presets)")
    if model not in presets() and not Path(model).exists():
        raise EvalError(f"{file}: its base model is {model!r}, a name without its folder (embeddings hold no path) "
                        "and no file here; give --model with its path (and --config for a file outside the presets)")
    return model


def generation_argv(args, file: Path, folder: Path) -> list:
    """medti.generate's command line for one step file; the base model defaults to the one the run trained on."""
    emb = read_embedding(file)
    model = args.model or base_model(file, emb.meta)
    argv = ["--model", model, "--embeddings", str(file), "--prompt", args.prompt or emb.token,
            "--n", str(args.n), "--seed", str(args.seed), "--steps", str(args.steps), "--sampler", args.sampler,
            "--device", args.device, "--out", str(folder)]
    argv += ["--config", args.config] if args.config else []
    return argv + (["--resume"] if (folder / "manifest.jsonl").exists() or list(folder.glob("*.png")) else [])


def check_run(args):
    """Everything generating the steps' images would refuse, before the real set is encoded (a missing --config was
    found after encoding): each step file read as an embedding, generate's own flag checks on its command line, and
    each base model resolved as minisd.load resolves it -- a file's header read, no tensor, no download."""
    models = {}
    for step, file in step_files(Path(args.run)):
        argv = generation_argv(args, file, Path(args.out) / f"step-{step}")
        parsed = generation_flags.build_parser().parse_args(argv)
        generation_flags.check_args(parsed)
        models.setdefault((parsed.model, parsed.config), file)
    for (model, config), file in models.items():
        if not args.model and model not in presets() and not Path(model).exists():
            raise EvalError(f"{file}: its base model {model} is no preset and no file or folder here; give "
                            "--model (and --config for a file outside the presets)")
        if config or model not in presets():   # a preset alone is fetched when it is used, not checked here
            resolve(model, config)


def make_images(args, file: Path, folder: Path):
    """Generate through `python -m medti.generate`'s own flags and run(), so its checks and messages apply (its
    errors are user errors and reach evaluate's one-line report), and its resume makes a re-run free."""
    parsed = generation_flags.build_parser().parse_args(generation_argv(args, file, folder))
    generation.run(parsed)


def markdown(rows: list, args, net, real: str) -> str:
    best = min(rows, key=lambda r: r["kid"])
    lines = [f"# Saved steps of {Path(args.run).name} against {real}", "",
             f"{args.n} images per step (seeds {args.seed}..{args.seed + args.n - 1}, {args.sampler}, "
             f"{args.steps} steps); lowest KID at step {best['step']}. Features: {net.name} (weights sha256 "
             f"{net.weights_sha256[:16]}…, {provenance(net)}). MS-SSIM \"-\": images under 161 px (see report.md of "
             "`medti.evaluate --fake` for the reason); val_loss \"-\": the run logged none at that step.", "",
             "| step | KID | KID subsets | FID | precision | recall | MS-SSIM | val_loss |", "|---" * 8 + "|"]
    for r in rows:
        ms = "-" if r["ms_ssim_fake"] is None else f"{r['ms_ssim_fake']:.4f}"
        val = "-" if r["val_loss"] is None else f"{r['val_loss']:.5f}"
        # the lowest KID's row: step and KID in bold, and said in words (a table read as plain text shows no bold)
        step = f"**{r['step']}** (lowest KID)" if r is best else str(r["step"])
        kid = f"**{r['kid']:.5f}**" if r is best else f"{r['kid']:.5f}"
        lines.append(f"| {step} | {kid} | {r['kid_mean']:.5f} ± {r['kid_std']:.5f} | {r['fid']:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {ms} | {val} |")
    return "\n".join(lines) + "\n"


def score_run(args, net, real, out: Path):
    """Generate, encode and score every saved step; steps.json is rewritten after each step, so a long run that
    is interrupted keeps what it scored."""
    steps, losses, rows = step_files(Path(args.run)), val_losses(Path(args.run)), []
    for step, file in steps:
        folder = out / f"step-{step}"
        print(f"step {step}: generating {args.n} images into {folder}", file=sys.stderr)
        make_images(args, file, folder)
        fake_set = load_set(folder, "run", minimum=2)
        check_sizes(args, len(real.names), len(fake_set.names))
        fake = encode(net, fake_set.images, f"step {step}", args.batch, progress)
        figures = score(args, net, real, fake, fake_set.images)
        rows.append({"step": step, "file": file.name, **{k: figures[k] for k in KEYS}, "val_loss": losses.get(step),
                     "features": net.name, "weights_sha256": net.weights_sha256, "weights_official": net.official})
        write_atomic(out / "steps.json", (json.dumps(rows, indent=2, allow_nan=False) + "\n").encode())
    write_atomic(out / "steps.md", text_bytes(markdown(rows, args, net, real.about)))
    plot_curve([r["step"] for r in rows], [r["kid"] for r in rows], out / "kid.png",
               f"KID of {args.n} images per saved step against {len(real.names)} real images", y_label="KID")
