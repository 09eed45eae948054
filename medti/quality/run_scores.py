"""Scoring a training run's saved steps: `python -m medti.evaluate --run runs/x --real data/x --out eval/x`.

For every `<name>-<step>.safetensors` a training run saved, `--n` images are generated with that step's vectors
(the same seeds for every step, so steps differ only by their vectors) into OUT/step-<step>/, and scored against
the real set, which is encoded once. Written: OUT/steps.json (one record per step), OUT/steps.md (the table, with
the run's val_loss beside it where the run logged one) and OUT/kid.png (KID against step). Re-running into the
same OUT reuses the images already made (generation resumes), so adding steps or metrics costs only what is new.

A run that saved whole models (`--method unet --keep-saves`: model-<step>.safetensors) is scored the same way, each
step's model generating (medti.quality.run_images): its training prompt, or for an image-conditioned run variations
of the held-out cases. Which step is best: the lowest KID for embeddings and text models (KID is unbiased at the few
dozen images a textual-inversion study scores; FID is biased upwards there), the lowest FID for an image-conditioned
run (DiNO-Diffusion chose its checkpoint by FID on a domain encoder's features: `--features dinov2`), written
OUT/fid.png.
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
from .run_images import EMBEDDING, IMAGE_MODEL, model_argv, plan_run
from .scoring import check_sizes, progress, score

STEP_FILE = re.compile(r"^(?P<name>.+)-(?P<step>\d+)\.safetensors$")   # what medti.train writes at each save
KEYS = ("fid", "kid", "kid_mean", "kid_std", "precision", "recall", "ms_ssim_fake", "n_fake")


def step_files(run: Path) -> list:
    """(step, file) of every saved step of a run, in step order."""
    if not run.is_dir():
        raise EvalError(f"{arg('run')} {run}: {'not a' if run.exists() else 'no such'} folder; give a medti.train "
                        "--out folder")
    found = sorted((int(m["step"]), p) for p in run.glob("*.safetensors") if (m := STEP_FILE.match(p.name)))
    if not found and (run / "model.safetensors").is_file():   # a UNet run keeps its steps only when asked to
        raise EvalError(f"{arg('run')} {run}: the run saved only model.safetensors, so its steps cannot be compared; "
                        "train with --keep-saves (model-<step>.safetensors at each save)")
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
    """medti.generate's command line for one step file; the base model defaults to the one the run trained on. A
    step saved as a whole model is its own model (run_images.model_argv)."""
    if args.plan.kind == EMBEDDING:
        emb = read_embedding(file)
        argv = ["--model", args.model or base_model(file, emb.meta), "--embeddings", str(file), "--prompt",
                args.prompt or emb.token, "--n", str(args.n)] + (["--config", args.config] if args.config else [])
    else:
        argv = model_argv(args, args.plan, file, folder)
    argv += ["--seed", str(args.seed), "--steps", str(args.steps), "--sampler", args.sampler, "--device",
             args.device, "--out", str(folder)]
    return argv + (["--resume"] if (folder / "manifest.jsonl").exists() or list(folder.glob("*.png")) else [])


def check_run(args):
    """Everything generating the steps' images would refuse, before the real set is encoded (a missing --config was
    found after encoding): each step file read as an embedding, generate's own flag checks on its command line, and
    each base model resolved as minisd.load resolves it -- a file's header read, no tensor, no download. Sets
    args.plan (run_images.RunPlan): what the steps are and what they generate from."""
    steps = step_files(Path(args.run))
    args.plan = plan_run(args, Path(args.run), steps[0][1])
    if args.plan.kind != EMBEDDING and args.model:
        raise EvalError(f"--model: {args.run} saved a whole model at each step, which is the model; leave it out")
    models = {}
    for step, file in steps:
        argv = generation_argv(args, file, Path(args.out) / f"step-{step}")
        parsed = generation_flags.build_parser().parse_args(argv)
        generation_flags.check_args(parsed)
        models.setdefault((parsed.model, parsed.config), file)
    for (model, config), file in models.items():
        if args.plan.kind == EMBEDDING and not args.model and model not in presets() and not Path(model).exists():
            raise EvalError(f"{file}: its base model {model} is no preset and no file or folder here; give "
                            "--model (and --config for a file outside the presets)")
        if config or model not in presets():   # a preset alone is fetched when it is used, not checked here
            resolve(model, config)


def make_images(args, file: Path, folder: Path):
    """Generate through `python -m medti.generate`'s own flags and run(), so its checks and messages apply (its
    errors are user errors and reach evaluate's one-line report), and its resume makes a re-run free."""
    parsed = generation_flags.build_parser().parse_args(generation_argv(args, file, folder))
    generation.run(parsed)


def chosen_by(args) -> str:
    """The figure that picks the best step (module docstring): fid for an image-conditioned run, else kid."""
    return "fid" if args.plan.kind == IMAGE_MODEL else "kid"


def images_per_step(args) -> str:
    plan = args.plan
    if plan.kind != IMAGE_MODEL:
        return f"{args.n} images per step (seeds {args.seed}..{args.seed + args.n - 1}"
    return (f"{plan.n_fake} images per step: {plan.per_source} variations of each of {plan.where} (seeds "
            f"{args.seed}..{args.seed + plan.per_source - 1}")


def markdown(rows: list, args, net, real: str) -> str:
    metric = chosen_by(args)
    best = min(rows, key=lambda r: r[metric])
    lines = [f"# Saved steps of {Path(args.run).name} against {real}", "",
             f"{images_per_step(args)}, {args.sampler}, {args.steps} steps); lowest {metric.upper()} at step "
             f"{best['step']}. Features: {net.name} (weights sha256 "
             f"{net.weights_sha256[:16]}…, {provenance(net)}). MS-SSIM \"-\": images under 161 px (see report.md of "
             "`medti.evaluate --fake` for the reason); val_loss \"-\": the run logged none at that step.", "",
             "| step | KID | KID subsets | FID | precision | recall | MS-SSIM | val_loss |", "|---" * 8 + "|"]
    for r in rows:
        ms = "-" if r["ms_ssim_fake"] is None else f"{r['ms_ssim_fake']:.4f}"
        val = "-" if r["val_loss"] is None else f"{r['val_loss']:.5f}"
        # the best row: step and its figure in bold, and said in words (a table read as plain text shows no bold)
        step = f"**{r['step']}** (lowest {metric.upper()})" if r is best else str(r["step"])
        kid = f"**{r['kid']:.5f}**" if r is best and metric == "kid" else f"{r['kid']:.5f}"
        fid = f"**{r['fid']:.2f}**" if r is best and metric == "fid" else f"{r['fid']:.2f}"
        lines.append(f"| {step} | {kid} | {r['kid_mean']:.5f} ± {r['kid_std']:.5f} | {fid} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {ms} | {val} |")
    return "\n".join(lines) + "\n"


def score_run(args, net, real, out: Path):
    """Generate, encode and score every saved step; steps.json is rewritten after each step, so a long run that
    is interrupted keeps what it scored."""
    steps, losses, rows = step_files(Path(args.run)), val_losses(Path(args.run)), []
    for step, file in steps:
        folder = out / f"step-{step}"
        print(f"step {step}: generating {args.plan.n_fake or args.n} images into {folder}", file=sys.stderr)
        make_images(args, file, folder)
        fake_set = load_set(folder, "run", minimum=2)
        check_sizes(args, len(real.names), len(fake_set.names))
        fake = encode(net, fake_set.images, f"step {step}", args.batch, progress)
        figures = score(args, net, real, fake, fake_set.images)
        rows.append({"step": step, "file": file.name, **{k: figures[k] for k in KEYS}, "val_loss": losses.get(step),
                     "chosen_by": chosen_by(args), "features": net.name, "weights_sha256": net.weights_sha256,
                     "weights_official": net.official})
        write_atomic(out / "steps.json", (json.dumps(rows, indent=2, allow_nan=False) + "\n").encode())
    write_atomic(out / "steps.md", text_bytes(markdown(rows, args, net, real.about)))
    metric = chosen_by(args)
    plot_curve([r["step"] for r in rows], [r[metric] for r in rows], out / f"{metric}.png",
               f"{metric.upper()} of {rows[0]['n_fake']} images per saved step against {len(real.names)} real images",
               y_label=metric.upper())
