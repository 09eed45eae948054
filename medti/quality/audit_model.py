"""`python -m medti.audit --model ... --embeddings ...`: the model-side half of the audit, Wen et al.'s signal
(medti/quality/memorization.py) for each prompt, written as memorization.json and memorization.md beside the
nearest-neighbour audit's files, or alone when no synthetic set is given. It needs no training image: the model and
its embeddings are the evidence.

Each prompt is scored: the --prompt texts, else each embedding's token alone (the prompt that shows what the token
learned most plainly). The signal's scale belongs to one model at one resolution, so no absolute number can be a
default. A ratio can: a baseline of ordinary prompts of the domain (BASELINE, or --signal-baseline) is scored on the
same model with the same seeds and steps, and each prompt's ratio is its signal over the baseline's highest. By
default a prompt is flagged at a ratio of RATIO or more (chosen on tiny models made to memorize on purpose,
docs/privacy-audit.md has the figures); --signal-threshold, an absolute signal measured on this model, overrides it.
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
# The default baseline: generic prompts of the domain that no token was trained on, so a model cannot have memorized
# them through an embedding. Their highest signal is the scale of "an ordinary prompt" on this model.
BASELINE = ("a photo", "an image", "a medical image", "an x-ray", "a chest x-ray", "a scan", "a ct scan",
            "an mri scan")
# Flag at signal >= RATIO x the baseline's highest. Measured by tools/wen_threshold.py on 10 tiny models (model seeds
# 0-9): tokens made to memorize one image scored ratios 0.96-1.23 (median 1.18), tokens that generalize 0.81-0.98
# (median 0.91). RATIO sits above every generalizing token with 7 % to spare (0.98 x 1.07) and below 9 of the 10
# memorizing ones; the tenth (0.96, seed 3, where "a chest x-ray" scored unusually high) no ratio separates.
RATIO = 1.05
MEASURED = ("10 models: memorizing tokens 0.96-1.23, generalizing ones 0.81-0.98, tokens trained long on many images "
            "0.93-1.25; at 1.05, 9 of 10 memorizing, 0 of 10 generalizing and 9 of 10 long-trained tokens flagged")


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
    add("--signal-baseline", action="append", default=[], metavar="PROMPT",
        help="an ordinary prompt the scored ones are compared with (repeatable; replaces the default list: "
             + ", ".join(f"'{text}'" for text in BASELINE) + ")")
    add("--signal-threshold", type=float, help="flag prompts whose signal is at least this, measured on this "
                                               f"model (default: flag at {RATIO:g} x the baseline's highest signal)")


def check(args) -> bool:
    """Whether the model-side audit runs; every check of its flags that needs no model."""
    given = [flag for flag in ("embeddings", "prompt", "signal_baseline", "signal_threshold")
             if getattr(args, flag) not in (None, [])]
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
    for text in args.signal_baseline:
        check_text("signal-baseline", text)
        if not text.strip():   # the empty prompt is the unconditional itself: its signal is 0, a ratio's divisor
            raise ModelAuditError(f"--signal-baseline {text!r}: an empty prompt is the unconditional the signal is "
                                  "measured from; give an ordinary prompt of your domain, e.g. 'a chest x-ray'")
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


def score(sd, text: str, settings) -> dict:
    """One prompt's row: its signal (the mean over seeds and steps), per seed and per step."""
    cond, uncond = conditioning(sd, [text], "")
    norms = wen.signal(sd, cond[:1], uncond, settings)   # [seeds, steps]
    return {"prompt": text, "signal": float(norms.mean()), "per_seed": norms.mean(1).tolist(),
            "per_step": norms.mean(0).tolist()}


def rule(args, highest: float) -> dict:
    """The flagging rule: --signal-threshold as given, else RATIO x the baseline's highest signal."""
    if args.signal_threshold is not None:
        return {"by": "--signal-threshold", "threshold": args.signal_threshold, "ratio": None}
    if not highest > 0:
        raise ModelAuditError("--signal-baseline: every baseline prompt scores 0 on this model (it ignores its "
                              "prompt), so no ratio exists; give --signal-threshold")
    return {"by": "ratio to the baseline", "threshold": RATIO * highest, "ratio": RATIO}


def measure(args, say) -> dict:
    """memorization.json's contents: the settings, the baseline, the rule, and each prompt's signal and ratio."""
    sd, loaded, prompts = load(args)
    settings = wen.SignalSettings(side=sd.config.resolution, first=args.signal_steps, count=args.signal_seeds,
                                  seed=args.seed)
    baseline = args.signal_baseline or list(BASELINE)
    say(f"model-side signal of {len(prompts)} prompt(s) and {len(baseline)} baseline prompt(s): first "
        f"{settings.first} of {wen.STEPS} DDIM steps, {settings.count} seed(s), {settings.side} px")
    base = [score(sd, text, settings) for text in baseline]
    highest = max(row["signal"] for row in base)
    chosen = rule(args, highest)
    rows = [score(sd, text, settings) for text in prompts]
    for row in base + rows:
        row["ratio"] = row["signal"] / highest if highest > 0 else None
    for row in rows:
        row["flagged"] = row["signal"] >= chosen["threshold"]
    rows.sort(key=lambda row: -row["signal"])
    factor = sd.config.latent_factor
    return {"method": {"paper": "Wen et al., ICLR 2024", "sampler": f"DDIM, {wen.STEPS} steps, {wen.SPACING} "
                       "timesteps", "guidance": wen.GUIDANCE, "first_steps": settings.first, "seeds": settings.seeds,
                       "norm": "L2 over the latent of eps(x_t, prompt) - eps(x_t, empty prompt), per seed",
                       "latent": [4, settings.side // factor, settings.side // factor]},
            "model": model_name(args.model), "model_sha256": sha256_of(sd.path),
            "embeddings": {token: e.meta.get("base_sha256", "") for token, e in loaded.items()},
            "baseline": {"given_by": "--signal-baseline" if args.signal_baseline else "default", "highest": highest,
                         "prompts": base},
            "rule": chosen, "threshold": chosen["threshold"], "prompts": rows}


def shown(ratio) -> str:
    """A ratio in a table; none when every baseline prompt scored 0 (then only --signal-threshold flags)."""
    return "n/a" if ratio is None else f"{ratio:.3f}"


def report(result: dict) -> str:
    """memorization.md: the verdict, the rule, the tables, what the number can and cannot say."""
    method, rows, chosen, base = result["method"], result["prompts"], result["rule"], result["baseline"]
    flagged = [row for row in rows if row["flagged"]]
    if chosen["ratio"] is None:
        how = f"the threshold {chosen['threshold']:.4g} given by `--signal-threshold`"
    else:
        how = (f"the default rule: a ratio of {chosen['ratio']:g} or more to the baseline's highest signal "
               f"{base['highest']:.4g}, i.e. a signal of {chosen['threshold']:.4g} or more")
    lines = ["# Does the model itself remember a prompt?", "",
             f"**{len(flagged)} of {len(rows)} prompt(s) flagged** by {how}.", "",
             f"Method: Wen et al. (ICLR 2024), ||eps(x_t, prompt) - eps(x_t, \"\")||_2 over the latent "
             f"{method['latent']}, averaged over the first {method['first_steps']} of {method['sampler']} "
             f"(guidance {method['guidance']:g}) and {len(method['seeds'])} starting noise(s), seeds "
             f"{method['seeds'][0]}..{method['seeds'][-1]}. Model: {result['model']} "
             f"({result['model_sha256'][:12]}).", "",
             "| prompt | signal | ratio | lowest..highest seed | flagged |", "|---|---|---|---|---|"]
    for row in rows:
        mark = "**yes**" if row["flagged"] else "no"
        lines.append(f"| `{row['prompt']}` | {row['signal']:.4g} | {shown(row['ratio'])} | "
                     f"{min(row['per_seed']):.4g}..{max(row['per_seed']):.4g} | {mark} |")
    lines += ["", f"Baseline ({base['given_by']}): ordinary prompts scored the same way; the ratio is a signal over "
              "their highest.", "", "| baseline prompt | signal | ratio |", "|---|---|---|"]
    lines += [f"| `{row['prompt']}` | {row['signal']:.4g} | {shown(row['ratio'])} |" for row in base["prompts"]]
    lines += ["", "What it can say: a prompt whose conditional prediction departs far more from the unconditional one "
              "than ordinary prompts' on this model pulls every starting noise one way, as memorized prompts do. What "
              "it cannot say: which image is remembered (the nearest-neighbour audit does), and how far a token was "
              "merely trained: on the tiny test models a token trained long on many images scores close to one "
              f"trained on one image. The default ratio {RATIO:g} was chosen on tiny random-weight models "
              f"({MEASURED}); it is a starting point, not a calibration of this model.", ""]
    return "\n".join(lines)


def texts(args, say) -> dict:
    """{file name: text} of the model-side audit."""
    result = measure(args, say)
    return {"memorization.json": json.dumps(result, indent=1) + "\n", "memorization.md": report(result)}


def flagged(result_texts: dict) -> int:
    """How many prompts the rule flags (0 without the model-side audit)."""
    rows = json.loads(result_texts["memorization.json"])["prompts"] if result_texts else []
    return sum(bool(row["flagged"]) for row in rows)


def highest(result_texts: dict) -> str:
    """The result line's part: how many flagged, and the highest signal with its ratio."""
    rows = json.loads(result_texts["memorization.json"])["prompts"]
    return (f"{flagged(result_texts)} of {len(rows)} prompt(s) flagged by the model's signal; highest signal "
            f"{rows[0]['signal']:.4g}, ratio {shown(rows[0]['ratio'])} to the baseline ({rows[0]['prompt']})")
