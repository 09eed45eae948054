"""`python -m medti.audit --model ... --embeddings ...`: the model-side half of the audit, Wen et al.'s signal
(medti/quality/memorization.py) for each prompt, written as memorization.json and memorization.md beside the
nearest-neighbour audit's files, or alone when no synthetic set is given. It needs no training image: the model and
its embeddings are the evidence.

Each prompt is scored: the --prompt texts, else each embedding's token alone (the prompt that shows what the token
learned most plainly). A threshold is not assumed: the signal's scale belongs to one model at one resolution, so a
number measured on another model would flag or clear at random. With --signal-threshold the report flags at or
above it; without one it ranks the prompts and says how to choose one (docs/privacy-audit.md).
"""
import json

import minisd
from minisd.errors import UserError

from ..files import embedding_file as emb
from ..files.hashes import sha256_of
from ..files.pseudonyms import model_name
from ..generation.preflight import check_seeds
from ..generation.prompts import check_text
from ..generation.run import conditioning
from . import memorization as wen

OUTPUTS = ("memorization.json", "memorization.md")
# What the tiny models of tests/test_memorization.py measured (the demo's architecture at 64 px, first step, 4 seeds;
# docs/privacy-audit.md has the command): printed as the scale of that model only, never used to flag another one.
TINY_MEASURED = ("a token trained on 1 image for 300 steps 4.57, on 24 images for 30 steps 3.50, on 24 images for "
                 "300 steps 4.34")


class ModelAuditError(UserError):
    """A mistake in the model-side audit's flags, in one line."""


def add_flags(group):
    """The flags of the model-side audit, in their own --help group."""
    add = group.add_argument
    add("--model", help="the model to question (preset, .safetensors/.ckpt file or diffusers folder)")
    add("--config", help="preset name or JSON config, for a model file outside the presets")
    add("--embeddings", action="append", default=[], help="embedding files or folders (repeatable); each token is "
                                                          "scored unless --prompt is given")
    add("--prompt", action="append", default=[], help="a prompt to score (repeatable), e.g. the generation run's")
    add("--signal-steps", type=int, default=wen.FIRST, help=f"average over the first N of the {wen.STEPS} DDIM "
                                                             f"steps (default {wen.FIRST}; Wen et al.: 1, 10 or 50)")
    add("--signal-seeds", type=int, default=wen.SEEDS, help=f"starting noises per prompt (default {wen.SEEDS})")
    add("--seed", type=int, default=0, help="the first starting noise's seed; noise i uses seed + i")
    add("--signal-threshold", type=float, help="flag prompts whose signal is at least this, measured on this "
                                               "model (default: none, the prompts are ranked)")


def check(args) -> bool:
    """Whether the model-side audit runs; every check of its flags that needs no model."""
    given = [flag for flag in ("embeddings", "prompt", "signal_threshold") if getattr(args, flag) not in (None, [])]
    if given and not args.model:
        raise ModelAuditError(f"--{given[0].replace('_', '-')} needs --model: the model whose own memory is "
                              "questioned (the one the embeddings were trained on)")
    if not args.model:
        return False
    if not args.embeddings and not args.prompt:
        raise ModelAuditError("--model needs --embeddings (each token is scored) or --prompt TEXT")
    if not 1 <= args.signal_steps <= wen.STEPS:
        raise ModelAuditError(f"--signal-steps {args.signal_steps}: give 1 to {wen.STEPS} (the first steps of a "
                              f"{wen.STEPS}-step DDIM run)")
    if args.signal_seeds < 1:
        raise ModelAuditError(f"--signal-seeds {args.signal_seeds}: give at least 1 starting noise")
    if args.signal_threshold is not None and not args.signal_threshold > 0:   # NaN fails too
        raise ModelAuditError(f"--signal-threshold {args.signal_threshold:g}: must be a positive number")
    check_seeds(args.seed, args.signal_seeds)
    for text in args.prompt:
        check_text("prompt", text)
    return True


def load(args):
    """The model with the embeddings attached, and the prompts to score."""
    loaded = emb.read_all(args.embeddings) if args.embeddings else {}
    sd = minisd.load(args.model, config=args.config)
    if sd.config.inpainting or sd.image is not None:
        raise ModelAuditError(f"--model {args.model}: an inpainting or image-conditioned model; the signal is read "
                              "from a text-to-image model's prompts")
    emb.attach(sd, loaded)   # its one-line refusal names the file of another model's width
    return sd, loaded, args.prompt or list(loaded)


def measure(args, say) -> dict:
    """memorization.json's contents: the settings, and each prompt's signal, per seed and per step."""
    sd, loaded, prompts = load(args)
    settings = wen.SignalSettings(side=sd.config.resolution, first=args.signal_steps, count=args.signal_seeds,
                                  seed=args.seed)
    say(f"model-side signal of {len(prompts)} prompt(s): first {settings.first} of {wen.STEPS} DDIM steps, "
        f"{settings.count} seed(s), {settings.side} px")
    rows = []
    for text in prompts:
        cond, uncond = conditioning(sd, [text], "")
        norms = wen.signal(sd, cond[:1], uncond, settings)   # [seeds, steps]
        value = float(norms.mean())
        flagged = None if args.signal_threshold is None else value >= args.signal_threshold
        rows.append({"prompt": text, "signal": value, "per_seed": norms.mean(1).tolist(),
                     "per_step": norms.mean(0).tolist(), "flagged": flagged})
    rows.sort(key=lambda row: -row["signal"])
    factor = sd.config.latent_factor
    return {"method": {"paper": "Wen et al., ICLR 2024", "sampler": f"DDIM, {wen.STEPS} steps, {wen.SPACING} "
                       "timesteps", "guidance": wen.GUIDANCE, "first_steps": settings.first, "seeds": settings.seeds,
                       "norm": "L2 over the latent of eps(x_t, prompt) - eps(x_t, empty prompt), per seed",
                       "latent": [4, settings.side // factor, settings.side // factor]},
            "model": model_name(args.model), "model_sha256": sha256_of(sd.path),
            "embeddings": {token: e.meta.get("base_sha256", "") for token, e in loaded.items()},
            "threshold": args.signal_threshold, "prompts": rows}


def report(result: dict) -> str:
    """memorization.md: the verdict, the table, what the number can and cannot say."""
    method, rows, threshold = result["method"], result["prompts"], result["threshold"]
    flagged = [row for row in rows if row["flagged"]]
    lines = ["# Does the model itself remember a prompt?", ""]
    if threshold is None:
        lines += ["No threshold was given (`--signal-threshold`): the prompts are ranked, none is flagged. Choose one "
                  "on this model: above the signals of prompts it cannot have memorized (docs/privacy-audit.md).", ""]
    else:
        lines += [f"**{len(flagged)} of {len(rows)} prompt(s) at or above the threshold {threshold:g}.**", ""]
    lines += [f"Method: Wen et al. (ICLR 2024), ||eps(x_t, prompt) - eps(x_t, \"\")||_2 over the latent "
              f"{method['latent']}, averaged over the first {method['first_steps']} of {method['sampler']} "
              f"(guidance {method['guidance']:g}) and {len(method['seeds'])} starting noise(s), seeds "
              f"{method['seeds'][0]}..{method['seeds'][-1]}. Model: {result['model']} "
              f"({result['model_sha256'][:12]}).", "",
              "| prompt | signal | lowest..highest seed | flagged |", "|---|---|---|---|"]
    for row in rows:
        mark = "n/a" if row["flagged"] is None else "**yes**" if row["flagged"] else "no"
        lines.append(f"| `{row['prompt']}` | {row['signal']:.4g} | {min(row['per_seed']):.4g}.."
                     f"{max(row['per_seed']):.4g} | {mark} |")
    lines += ["", "What it can say: a prompt whose conditional prediction departs far more from the unconditional one "
              "than other prompts' on this model pulls every starting noise one way, as memorized prompts do. What it "
              "cannot say: which image is remembered (the nearest-neighbour audit does), and how far a token was "
              "merely trained: on the tiny test models a token trained long on many images scores as high as one "
              "trained on one image. The scale belongs to this model at this resolution; for comparison, the tiny "
              f"test models: {TINY_MEASURED}.", ""]
    return "\n".join(lines)


def texts(args, say) -> dict:
    """{file name: text} of the model-side audit."""
    result = measure(args, say)
    return {"memorization.json": json.dumps(result, indent=1) + "\n", "memorization.md": report(result)}


def flagged(result_texts: dict) -> int:
    """How many prompts are at or above --signal-threshold (0 without one, or without the model-side audit)."""
    rows = json.loads(result_texts["memorization.json"])["prompts"] if result_texts else []
    return sum(bool(row["flagged"]) for row in rows)


def highest(result_texts: dict) -> str:
    """The result line's part: how many flagged, or the highest signal."""
    rows = json.loads(result_texts["memorization.json"])["prompts"]
    top = f"highest signal {rows[0]['signal']:.4g} ({rows[0]['prompt']})"
    if rows[0]["flagged"] is None:
        return top
    return f"{flagged(result_texts)} of {len(rows)} prompt(s) flagged by the model's signal; {top}"

