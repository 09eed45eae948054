"""LoRA files from the command line: `python -m medti.lora merge | info`.

    python -m medti.lora merge --model sd2-base --lora cxr.safetensors:0.8 --out sd2-cxr.safetensors
    python -m medti.lora info cxr.safetensors

`merge` writes one checkpoint in the official single-file layout (the keys `minisd.load`, A1111, ComfyUI and
diffusers' `from_single_file` read: model.diffusion_model., first_stage_model., the text tower's prefix) with the
LoRAs added into its weights exactly as `python -m medti.generate --lora` adds them (medti.generation.loras.apply: in
fp32, one file after another), then rounded once to --dtype (fp16 by default, as the published SD files). The file is
written atomically (temporary name, then rename), never over an existing one without --force, with metadata naming
the base model and every LoRA (file, sha256, A1111 hash, weight).
"""
import json
from pathlib import Path

import torch

import minisd
from minisd.config import DTYPES
from minisd.errors import UserError
from minisd.load import state_dict

from .cli import ArgumentParser, run_main
from .files import lora_file
from .files.atomic import safetensors_bytes, write_atomic
from .files.hashes import sha256_of
from .files.pseudonyms import model_name
from .generation import loras

FORMAT = "medti-merged-lora"   # our metadata "format" of a merged checkpoint


class MergeError(UserError):
    """A `merge` mistake, one line."""


def check_out(out: Path, force: bool):
    """Refuse what would lose data or fail only after minutes of merging."""
    if out.suffix != ".safetensors":
        raise MergeError(f"--out {out}: a merged checkpoint is written as .safetensors; name it so")
    if out.is_dir() or (out.exists() and not force):
        raise MergeError(f"--out {out}: exists; choose another file" + ("" if out.is_dir() else
                                                                       ", or pass --force to overwrite it"))
    if not out.parent.is_dir():
        raise MergeError(f"--out {out}: the folder {out.parent} does not exist; create it first")


def merged_state(sd, dtype: torch.dtype) -> dict:
    """The official-layout state dict rounded to `dtype`; a weight that the rounding makes inf is refused."""
    state = {k: v.to(dtype) for k, v in state_dict(sd).items()}
    bad = next((k for k, v in state.items() if not torch.isfinite(v).all()), None)
    if bad is not None:
        raise MergeError(f"--dtype: {bad} is not finite after merging and rounding to {str(dtype)[6:]}; the LoRA "
                         "weights are too large for it: use --dtype fp32 or smaller weights")
    return state


def merge(args):
    out = Path(args.out)
    check_out(out, args.force)
    specs = loras.plan(args.lora, [], [])   # every --lora checked before the model is loaded
    # fp32 whatever --dtype: the deltas are added at full precision and the sum rounded once
    sd = loras.apply(minisd.load(args.model, config=args.config, dtype=torch.float32, device="cpu"), specs)
    state = merged_state(sd, DTYPES[args.dtype])
    config = args.config or sd.preset   # None for a diffusers folder, whose config.json files are not carried over
    # the base and its config by name, no path (medti.files.pseudonyms): a merged checkpoint is made to be shared
    meta = {"format": FORMAT, "base_model": model_name(args.model), "base_sha256": sha256_of(sd.path),
            "base_config": model_name(config or ""), "dtype": args.dtype,
            "loras": json.dumps(loras.describe(specs), sort_keys=True)}
    write_atomic(out, safetensors_bytes(state, meta))
    print(f"wrote {out} ({args.dtype}, {len(state)} tensors): {args.model} + " +
          ", ".join(f"{s.path.name} x {s.weight:g}" for s in specs) +
          (f"; load it with --config {config}" if config else "; load it with a config JSON of the base "
           "(tools/convert_diffusers.py --config-out writes one)"))


def run(args):
    if args.command == "info":
        for path in args.files:
            print(lora_file.info(path))
        return
    merge(args)


def build_parser():
    parser = ArgumentParser(prog="python -m medti.lora", description=__doc__.splitlines()[0],
                            epilog="example: python -m medti.lora merge --model sd2-base --lora cxr.safetensors:0.8 "
                                   "--out sd2-cxr.safetensors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("merge", help="write a checkpoint with LoRAs merged into its weights")
    p.add_argument("--model", required=True, help="preset name, .safetensors/.ckpt file or diffusers folder")
    p.add_argument("--config", help="preset name or JSON config (needed for a file outside the presets)")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]",
                   help="a LoRA file and its weight (default 1); repeatable, merged in the order given")
    p.add_argument("--out", required=True, help="the .safetensors file to write; an existing one only with --force")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="dtype of the written weights")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    sub.add_parser("info", help="layers, ranks, targets, base and metadata of LoRA files").add_argument(
        "files", nargs="+", help="LoRA files (kohya/A1111 or diffusers/PEFT)")
    return parser


def main(argv=None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
