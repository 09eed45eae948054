"""The flags of `python -m medti.generate` and every check that can be made before a model is loaded or a folder is
made."""
import argparse
import math
from pathlib import Path

import torch

from minisd.config import check_side
from minisd.errors import UserError
from minisd.sampling import SAMPLERS, UNSUPPORTED
from minisd.schedule import SPACINGS, check_steps

from ..cli import ArgumentParser, add_threads
from ..dataset.preprocess import PREPROCESS
from ..medical import require
from ..medical.window import PRESETS
from . import loras
from .preflight import check_scale, check_seeds
from .prompts import check_text

DESCRIPTION = "Generate images with SD1/SD2 and learned embeddings: `python -m medti.generate`."
# every spacing some sampler offers, in a stable order for --help
ALL_SPACINGS = list(dict.fromkeys(name for names in SPACINGS.values() for name in names))


EXAMPLE = """example:
  python -m medti.generate --model sd2-base --embeddings embeddings/ --prompt "chexpert_cardiomegaly" \\
      --n 8 --seed 0 --out out/"""


class UsageError(UserError):
    """A user mistake in the flags, printed as one line."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default in --help; a default of None is described in the help text itself instead of "None"."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m medti.generate", description=DESCRIPTION,
                                epilog=EXAMPLE, formatter_class=HelpFormatter)
    add = p.add_argument   # every option has help text, so HelpFormatter can show its default
    add("--model", default="sd2-base", help="preset name (sd2-base, sd15, ...), .safetensors/.ckpt file or "
                                            "diffusers folder")
    add("--config", help="preset name or JSON config (needed for a file outside the presets; a diffusers folder "
                         "has its own)")
    add("--embeddings", action="append", default=[], help="embedding files or folders (repeatable)")
    loras.add_arguments(add)   # --lora FILE[:WEIGHT], --lora-dir DIR (for <lora:NAME:WEIGHT> in the prompt)
    add("--prompt", help='terms joined by AND, each with an optional ":weight" (":0.3", ":30%%", ":-1")')
    add("--negative", default="", help="negative prompt (the unconditional term)")
    add("--sweep", nargs=2, metavar=("A", "B"), help='interpolation grid "A :1-w AND B :w", one column per weight')
    add("--weights", default="0,0.25,0.5,0.75,1", help="--sweep weights w, comma-separated")
    add("--n", type=int, default=1, help="number of images (with --sweep: rows, one seed each)")
    add("--seed", type=int, default=0, help="image i uses seed + i (torch seeds: 0 to 2**64 - 1)")
    add("--steps", type=int, default=100, help="sampler steps")
    add("--cfg", type=float, default=2.0, help="classifier-free guidance scale")
    add("--size", type=int, help="square image size in pixels (default: the model's native size)")
    add("--width", type=int, help="image width in pixels (default: --size)")
    add("--height", type=int, help="image height in pixels (default: --size)")
    add("--sampler", choices=list(SAMPLERS), default="euler_a",
        help="euler_a (the study's), euler, dpmpp_2m (DPM++ 2M; with --sigmas karras A1111's DPM++ 2M Karras, "
             "good at 20-30 steps), ddim (eta 0)")
    add("--sigmas", choices=ALL_SPACINGS, default="linspace",
        help="step schedule: diffusers' linspace|leading|trailing for the sampler's scheduler, kdiffusion "
             "(A1111's default), karras (euler, dpmpp_2m)")
    add("--batch", type=int, default=0, help="UNet rows per call; 0: one image (all its terms) per call")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    add("--dtype", choices=["fp32", "fp16", "bf16"], help="default fp16 on CUDA, fp32 on CPU")
    add_threads(p)
    add("--compile", action="store_true",
        help="torch.compile the UNet and VAE decoder first (minutes per network and batch shape on a CPU; "
             "see docs/performance.md for whether it pays on yours)")
    add("--no-pack", action="store_true",
        help="on the CPU, run plain nn.Conv2d; by default each conv weight is laid out for oneDNN once "
             "(minisd.packing: faster, same results, a second copy of the conv weights in memory)")
    add("--init-image", help="start from this image (img2img; with --mask: inpainting)")
    add("--mask", help="white = repaint; any size and mode, resized to the image; an image with a transparent "
                       "part is read by its alpha channel (opaque = repaint)")
    add("--mask-blur", type=float, default=0.0, help="Gaussian blur radius in pixels before binarising the mask")
    add("--paste-back", action="store_true",
        help="inpainting: outside the (blurred) mask, put the init image's own pixels back after decoding, as "
             "A1111 does (diffusers does not)")
    add("--strength", type=float, default=1.0, help="1: start from pure noise; < 1: keep that much of the init")
    add_condition_flags(add)
    add_output_flags(add)
    return p


def add_condition_flags(add):
    """An image-conditioned model's inputs (medti.generation.variations), read as training reads its data."""
    add("--condition-image", action="append", default=[], metavar="FILE",
        help="image-conditioned models: variations of this case, in place of --prompt (repeatable: --n images of "
             "each); PNG, JPEG, DICOM, NIfTI, MetaImage, NRRD")
    add("--mix", help="with two --condition-image: fractions r in [0, 1], comma-separated; each image is conditioned "
                      "on the lerp of the two cases' global tokens (0: the first case, 1: the second)")
    add("--encoder", help="the DINO encoder folder of a model trained with a local folder (its file states only the "
                          "folder's name)")
    add("--window", help=f"DICOM condition image: CENTER,WIDTH or {', '.join(PRESETS)} (default: the file's own, "
                         "as training reads it)")
    add("--plane", help="volume condition image: axial | coronal | sagittal (default axial)")
    add("--slices", help="volume condition image: which slice, middle:1 (the default) or K:K+1; a condition is one "
                         "slice, so a choice of several is refused")
    add("--preprocess", choices=PREPROCESS, help="condition image: crop and resize as training's --preprocess does "
                                                 "(default center), to the generated images' size")


def add_output_flags(add):
    """What a run writes, and where."""
    add("--save-latents", action="store_true", help="also write each final latent as NNNNN.safetensors")
    add("--grid", action="store_true", help="also write grid.png: all images, labelled with seeds (and weights)")
    add("--format", choices=["png", "dicom"], default="png", help="dicom: also NNNNN.dcm, Secondary Capture, synthetic")
    add("--resume", action="store_true", help="continue a run in --out, skipping images its manifest holds")
    add("--out", required=True, help="output folder")


def check_args(args):
    """Everything that can be checked before the model is loaded or a folder is made."""
    given = [flag for flag, value in (("--prompt", args.prompt), ("--sweep A B", args.sweep),
                                      ("--condition-image", args.condition_image)) if value is not None and value != []]
    if len(given) != 1:
        raise UsageError("give one of --prompt, --sweep A B (text models) or --condition-image FILE (image-conditioned "
                         "models)" + (f"; {' and '.join(given)} were given together" if given else ""))
    for name, text in [("prompt", args.prompt), ("negative", args.negative)] + [("sweep", t) for t in args.sweep or []]:
        if text is not None:
            check_text(name, text)
    if args.config and Path(args.model).is_dir():   # minisd.load refuses it too, but only after the checks
        raise UsageError(f"--config {args.config}: --model {args.model} is a diffusers folder, which states its own "
                         "configuration; leave out --config")
    if args.format == "dicom":   # pydicom is the optional extra: say so before anything is loaded
        require("pydicom", "--format dicom")
    for name in ("n", "steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    for name in ("size", "width", "height"):   # None: the model's native size
        if getattr(args, name) is not None:
            check_side(name, getattr(args, name))
    if args.batch < 0 or not args.mask_blur >= 0 or math.isinf(args.mask_blur):   # `not >=`: NaN fails too
        raise UsageError(f"--batch {args.batch} / --mask-blur {args.mask_blur:g}: must be finite and not negative")
    if not 0 < args.strength <= 1:
        raise UsageError(f"--strength {args.strength}: must be in (0, 1]")
    check_scale("--cfg", args.cfg)
    check_seeds(args.seed, args.n)
    family = SAMPLERS[args.sampler].family
    if args.sigmas not in SPACINGS[family] or (args.sampler, args.sigmas) in UNSUPPORTED:
        offered = [name for name in SPACINGS[family] if (args.sampler, name) not in UNSUPPORTED]
        raise UsageError(f"--sigmas {args.sigmas} is not offered with --sampler {args.sampler}; "
                         f"use one of {', '.join(offered)}")
    check_steps(args.steps, args.sigmas, family)   # what the schedule can do: distinct steps, at most MAX_STEPS
    if (args.mask or args.strength < 1) and not args.init_image:
        raise UsageError("--mask and --strength < 1 need --init-image")
    if args.paste_back and not args.mask:
        raise UsageError("--paste-back needs --init-image and --mask (it keeps the pixels outside the mask)")

    check_inputs(args)


def check_inputs(args):
    """Input paths that do not exist, named with their flag before the model loads (a missing --embeddings folder
    was reported, after loading, as an embedding file with "unknown extension ''")."""
    given = [("--embeddings", path) for path in args.embeddings] + \
        [(flag, path) for flag, path in (("--init-image", args.init_image), ("--mask", args.mask)) if path]
    for flag, path in given:
        if not Path(path).exists():
            raise UsageError(f"{flag} {path}: no such file" + (" or folder" if flag == "--embeddings" else ""))
