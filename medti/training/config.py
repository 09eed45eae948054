"""The settings of a training run (TrainConfig: the CLI of `python -m medti.train` is generated from it) and
every check that can be made before a model is loaded or a file is written.

Why all checks come first: a mistake found after the model has loaded costs minutes, and one found after the
output folder exists leaves debris. So `check` reads nothing big and writes nothing; it returns the Plan the
trainer follows (learning-rate schedule, device, dtype, prompts).
"""
import dataclasses
import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from minisd.config import check_side, resolve_device, resolve_dtype
from minisd.errors import arg, quoted
from minisd.tokenizer import MAX_PROMPT_TOKENS

from ..dataset.folder import DataError, check_not_empty
from ..dataset.preprocess import PREPROCESS
from ..files.atomic import inside
from ..medical.slices import check_options
from ..medical.window import parse_window
from . import TrainError, check_folder, dreambooth
from .cache_read import check_source
from .distributed import check_launch, local_device, world
from .image_method import check_condition
from .methods import check_method, learning_rate
from .optim import parse_lr
from .previews import check_preview
from .prompts import training_prompts

SEED_LIMIT = 2 ** 32   # step_generator multiplies the seed by ~1e9: below 2**32 the product fits torch's int64 seed
# Images per micro-batch: one SD2 image at 512² holds about 226 MiB on the device even with checkpointing
# (tools/memory_estimate.py: 56.5 MiB saved for backward, 169.4 MiB temporaries), so 1,024 hold 230 GB, past any GPU.
MAX_BATCH = 1024


def flag(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


def add_flags(parser, names=None, helps=None):
    """One argparse flag per TrainConfig field (or per field in `names`): the one place a setting becomes a flag,
    for medti.train and for `medti.data preview` and `encode`, which take the data flags under the same names.
    `helps`: field -> the help where a command does something else with the same setting (encode stores what a run
    with the flag reads)."""
    for f in dataclasses.fields(TrainConfig):
        if names is not None and f.name not in names:
            continue
        name, help_text = "--" + f.name.replace("_", "-"), (helps or {}).get(f.name, f.metadata["help"])
        if isinstance(f.default, bool):
            parser.add_argument(name, action="store_true", help=help_text)
        else:   # every default shown, except an empty one: its help says what is derived at run time instead
            shown = f" (default: {f.default})" if f.default != "" else ""
            parser.add_argument(name, type=type(f.default), default=f.default,
                                help=(help_text + shown).replace("%", "%%"))


# Defaults against A1111's textual inversion (stable-diffusion-webui modules/ui.py, "Create embedding" and "Train"
# tabs), which uses the same defaults for SD1 and SD2 -- so nothing here differs for SD1; the only SD1/SD2
# difference, the vectors' width (768 / 1024), is read from the model's text tower, never from a setting.
#   same as A1111: lr "0.005" (and its "rate:step, ..." schedule syntax), init text "*", batch 1, gradient
#     accumulation 1, latent sampling "once", an embedding copy and a preview every 500 steps, no gradient clipping.
#   the study's instead: vectors 64 (A1111: 1 per token), max_steps 50,000 (A1111: 100,000), the token alone as the
#     prompt (A1111: style_filewords.txt templates; --template gives templates), resolution the model's native size
#     (A1111: 512x512, which is SD1's and SD2-base's native size).
@dataclass
class TrainConfig:
    """Every setting of a training run (`python -m medti.train` has one flag per field)."""
    model: str = flag("sd2-base", "preset name (sd2-base, sd15, ...), .safetensors/.ckpt file or diffusers folder")
    config: str = flag("", "preset name or JSON config, for a file outside the presets (a diffusers folder has its "
                           "own: leave it out)")
    data: str = flag("", "folder of training images (searched recursively)")
    cache: str = flag("", "instead of --data: a latent cache made by python -m medti.data encode (sets larger than "
                          "memory; docs/training.md)")
    val: str = flag("", "folder of validation images, never trained on, read and preprocessed like --data: the "
                        "validation loss at every save, and the best step's embedding as <name>-best.safetensors")
    val_fraction: str = flag("", "instead of --val: hold out this fraction of --data (0 < F < 1, e.g. 0.2), a "
                                 "random choice from --seed, listed in val.txt")
    val_draws: int = flag(8, "fixed (timestep, noise) draws per validation image, timesteps stratified over 0..999")
    method: str = flag("ti", "what trains: ti (textual inversion: a token's vectors) | lora (rank-r adapters on the "
                             "frozen model, saved as lora.safetensors) | unet (the UNet's weights, saved as "
                             "model.safetensors)")
    token: str = flag("", 'ti: the placeholder to learn, e.g. "<cardiomegaly>": one printable word (no spaces, '
                          'control characters or slashes), not an existing vocabulary word')
    vectors: int = flag(64, f"ti: vectors per token (at most {MAX_PROMPT_TOKENS}: they must fit in the 77-token "
                            "prompt)")
    init: str = flag("*", 'ti: word(s) whose token embeddings start the vectors, or "random"')
    instance_prompt: str = flag("", 'lora, unet: the training prompt, e.g. "a chest x-ray of sks" (--template '
                                    'lines: "{}" = this prompt)')
    rank: int = flag(4, "lora: adapter rank (diffusers' train_dreambooth_lora.py default)")
    alpha: float = flag(0.0, "lora: adapter alpha, scale alpha/rank; 0: the rank (scale 1)")
    lora_targets: str = flag("attention", "lora: what gets adapters, comma-separated: attention (the UNet's "
                                          "q/k/v/out), ff, proj (the UNet's), text, text_ff (the text tower's)")
    captions: bool = flag(False, "lora, unet: read each image's caption file (image.txt beside image.png, as A1111 "
                                 'and kohya do): the prompt is each --template line (default "{}, {caption}") with '
                                 "{} = --instance-prompt and {caption} = the caption")
    trainable: str = flag("all", "unet: all (every UNet weight) | attention (the transformer blocks' attention)")
    train_text: bool = flag(False, "unet: train the text tower's weights too")
    ema: float = flag(0.0, "unet: keep an EMA of the weights with this decay (e.g. 0.9999) and save it; 0: none")
    save_dtype: str = flag("fp16", "unet: dtype of model.safetensors, fp16 | bf16 | fp32")
    keep_saves: bool = flag(False, "unet: keep each save's model too, as model-<step>.safetensors, so that "
                                   "`medti.evaluate --run` can choose a step; a whole model per save (fp16 SD1: "
                                   "about 2 GB each, SD2: about 2.6 GB)")
    condition: str = flag("", "unet: dinov2 trains on each image's own DINO global tokens instead of a prompt "
                              "(DiNO-Diffusion); needs --encoder; default: text")
    encoder: str = flag("", "with --condition: the DINO release (e.g. facebook/dinov2-with-registers-base) or its "
                            "folder")
    condition_dropout: float = flag(0.1, "with --condition: fraction of conditions replaced by the null each step, "
                                         "so guidance works (0..1)")
    class_prompt: str = flag("", 'lora, unet: DreamBooth\'s prior preservation, the class prompt, e.g. "a chest x-ray"')
    class_images: str = flag("", "with --class-prompt: a folder of class images, or N for N made once by the frozen "
                                 "model (kept in --out/class-images)")
    prior_weight: float = flag(1.0, "with --class-prompt: weight of the class images' loss (Ruiz et al.: 1)")
    lr: str = flag("", 'constant, or A1111\'s schedule "0.005:1000, 0.001"; default: 0.005 for ti (A1111), 1e-4 '
                       "for lora (diffusers' DreamBooth LoRA example), 1e-5 for unet (its text-to-image example)")
    max_steps: int = flag(50000, "optimizer steps (the study: 50,000; 100,000 for prostate MRI)")
    batch: int = flag(1, "images per micro-batch")
    grad_accum: int = flag(1, "micro-batches per optimizer step")
    resolution: int = flag(0, "training image size; 0: the model's native size")
    preprocess: str = flag("center", "center | cxr | upsample | none")
    channels: str = flag("", 'e.g. "t2w,adc,dwi": stack per-case gray images into RGB')
    window: str = flag("", "DICOM window: CENTER,WIDTH (write --window=-600,1500) or lung, mediastinum, bone, brain, "
                           "abdomen, liver, soft_tissue; default: the file's own, else min-max")
    plane: str = flag("axial", "volumes (.nii, .nii.gz, .mha, .mhd, .nrrd): slice plane, axial | coronal | sagittal")
    slices: str = flag("all", "volumes: which slices, all | START:STOP[:STEP] | middle:N | mask (needs "
                              "--slice-mask); each becomes one image named FILE#PLANEnnn")
    slice_mask: str = flag("", "volumes: keep slices where this mask is non-empty: a folder of masks named after each "
                               "volume or case (MSD labelsTr, PI-CAI whole-gland masks), a file name (no '/') "
                               "looked up in each volume's folder, or a path to one mask")
    latents: str = flag("once", "once (sampled once) | random (resampled every use) | mean")
    flip: bool = flag(False, "random horizontal flips; off: laterality matters in medical images")
    strict: bool = flag(False, "an unreadable or odd training file is an error (default: listed, skipped)")
    template: str = flag("", 'file of prompt templates, one per line, "{}" = the token')
    dtype: str = flag("", "fp16 | bf16 | fp32; default fp16 on CUDA, fp32 on CPU")
    device: str = flag("", "default cuda if available, else cpu")
    seed: int = flag(0, "0 <= seed < 2**32; all randomness derives from it: CPU runs are bit-reproducible")
    save_every: int = flag(500, "steps between saves of the embedding and the resumable state")
    preview_every: int = flag(500, "steps between preview images; 0: no previews")
    preview_steps: int = flag(20, "sampler steps of the preview images (the study's 100 with euler_a: five times "
                                  "the time)")
    preview_sampler: str = flag("dpmpp_2m", "sampler of the preview images: dpmpp_2m (good images in 20 steps) | "
                                            "euler_a (the study's) | euler | ddim")
    checkpointing: str = flag("auto", "gradient checkpointing: on | off | auto (on with CUDA, where memory is "
                                      "short; off on the CPU, where it only costs time)")
    resume: bool = flag(False, "continue the run in --out from its last save")
    out: str = flag("", "output folder (not inside --data)")


class Plan(NamedTuple):
    """What check() resolved from the settings; the trainer follows it."""
    schedule: list          # [(rate, until step or None), ...] from --lr
    device: torch.device
    dtype: torch.dtype
    prompts: list           # training prompts with the token in them
    val_fraction: float     # from --val-fraction; 0.0: none held out


def _check_token(token: str):
    """The token is typed in prompts and names the embedding file, so it must be one printable word. Refused:
    whitespace (a newline would split a template line, and a prompt could never contain the token as typed),
    Unicode control/format/unassigned characters (category C*: invisible, so the token could not be retyped),
    and slashes (path separators in the file name)."""
    if not token:   # not given at all: there is no value to quote (it read `--token ''`)
        raise TrainError(f"{arg('token')}: give the placeholder to learn, such as \"<cardiomegaly>\" (one printable "
                         "word without spaces, control characters or slashes)")
    bad = next((c for c in token if c.isspace() or unicodedata.category(c).startswith("C") or c in "/\\"), None)
    if not token.strip("<>") or bad is not None:
        found = f" (it contains {bad!r})" if bad is not None else ""
        raise TrainError(f"{arg('token')} {quoted(token)}{found}: give a placeholder such as \"<cardiomegaly>\", one "
                         "printable word without spaces, control characters or slashes")


def _check_numbers(cfg: TrainConfig):
    """Counts that must be positive, and the ones where 0 means "off" or "default"; no negatives anywhere."""
    if not 1 <= cfg.vectors <= MAX_PROMPT_TOKENS:
        raise TrainError(f"{arg('vectors')} {cfg.vectors}: must be 1..{MAX_PROMPT_TOKENS} (the prompt holds "
                         f"{MAX_PROMPT_TOKENS} tokens between start and end)")
    for name in ("max_steps", "batch", "grad_accum", "save_every", "val_draws"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"{arg(name)} {getattr(cfg, name)}: must be at least 1")
    for name, zero in (("preview_every", "no previews"), ("resolution", "the model's native size")):
        if getattr(cfg, name) < 0:
            raise TrainError(f"{arg(name)} {getattr(cfg, name)}: must be 0 ({zero}) or more")
    if cfg.resolution:
        check_side("resolution", cfg.resolution)
    if cfg.batch > MAX_BATCH:
        raise TrainError(f"{arg('batch')} {cfg.batch}: at most {MAX_BATCH:,} images per micro-batch (one SD2 image at "
                         f"512² holds about 226 MiB on the device); for a larger batch add {arg('grad_accum')}")
    if not 0 <= cfg.seed < SEED_LIMIT:
        raise TrainError(f"{arg('seed')} {cfg.seed}: must be 0 <= seed < 2**32")


def _nested(a: Path, b: Path) -> bool:
    """a and b are one folder, or one holds the other (the images of the inner one are read with the outer's)."""
    return inside(a, b) or inside(b, a)


def _check_folders(cfg: TrainConfig):
    """--data must be a folder, and --out must not lie inside it: the run's previews would become training images
    of the next run in that folder, and change the data fingerprint so that --resume refuses the run. The same
    for --val; and --val must not hold or lie in --data: its images would be training images."""
    data = Path(cfg.data)
    check_source(cfg)
    if not cfg.out:
        raise TrainError(f"{arg('out')}: name an output folder")
    if cfg.val:
        check_folder("val", cfg.val, "validation images")
    if cfg.val and cfg.data and _nested(Path(cfg.val), data):
        raise TrainError(f"{arg('val')} {cfg.val} and {arg('data')} {cfg.data} overlap: validation images must be "
                         f"ones the run never trains on; give a separate folder, or {arg('val_fraction')}")
    for name in ("data", "val"):
        if getattr(cfg, name) and inside(cfg.out, getattr(cfg, name)):
            raise TrainError(f"{arg('out')} {cfg.out} is inside {arg(name)} {getattr(cfg, name)}: its previews would "
                             f"become images there; choose an {arg('out')} outside that folder")


def _val_fraction(cfg: TrainConfig) -> float:
    """--val-fraction as a number in (0, 1), or 0.0 when not given; --val and --val-fraction exclude each other."""
    if not cfg.val_fraction:
        return 0.0
    if cfg.val:
        raise TrainError(f"{arg('val')} and {arg('val_fraction')}: give one of them (a folder, or a fraction of "
                         f"{arg('data')} to hold out)")
    try:
        fraction = float(cfg.val_fraction)
    except ValueError:
        fraction = math.nan
    if not 0 < fraction < 1:   # NaN fails too
        raise TrainError(f"{arg('val_fraction')} {cfg.val_fraction!r}: must be a number between 0 and 1 "
                         "(exclusive), e.g. 0.2")
    return fraction


def check_out(cfg: TrainConfig):
    """A used --out needs --resume and --resume needs a used --out (checked once the folder is ours)."""
    state = Path(cfg.out) / "state.safetensors"
    if state.exists() and not cfg.resume:
        raise TrainError(f"{arg('out')} {cfg.out} holds a run already; pass {arg('resume')} to continue it or "
                         f"choose another {arg('out')} folder")
    if cfg.resume and not state.exists():
        raise TrainError(f"{arg('resume')}: {cfg.out} has no state.safetensors to continue from")


def check(cfg: TrainConfig) -> Plan:
    """One-line errors for everything that can be checked before anything is loaded or written."""
    _check_folders(cfg)
    plan = check_settings(cfg)
    _check_images(cfg)
    return plan


def _check_images(cfg: TrainConfig):
    """--data or --val with no image file at all, refused before the model loads (a first run of a preset would
    download gigabytes first); last, as it reads the folders, after the checks of the flags alone."""
    for name in filter(lambda name: getattr(cfg, name) and not (name == "data" and cfg.cache), ("data", "val")):
        try:
            check_not_empty(getattr(cfg, name))
        except DataError as e:
            raise TrainError(f"{arg(name)} {e}") from None


def _check_model(cfg: TrainConfig):
    """A diffusers folder states its own configuration (minisd.load refuses both, but only once it runs)."""
    if cfg.config and Path(cfg.model).is_dir():
        raise TrainError(f"{arg('config')} {cfg.config}: {arg('model')} {cfg.model} is a diffusers folder, which "
                         f"states its own configuration; leave out {arg('config')}")


def check_settings(cfg: TrainConfig) -> Plan:
    """check() without the folders: for a caller that makes them itself, after this (the demo)."""
    _check_model(cfg)
    check_condition(cfg)   # first: its refusals name --condition, not the method a flag belongs to
    check_method(cfg)
    dreambooth.check(cfg)
    if cfg.method == "ti":
        _check_token(cfg.token)
    _check_numbers(cfg)
    if cfg.latents not in ("once", "random", "mean"):
        raise TrainError(f"{arg('latents')} {cfg.latents!r}: once, random or mean")
    if cfg.preprocess not in PREPROCESS:
        raise TrainError(f"{arg('preprocess')} {cfg.preprocess!r}: one of {', '.join(PREPROCESS)}")
    if cfg.window:
        parse_window(cfg.window, arg("window"))   # a MedicalError (one line) for a bad spec, before anything loads
    check_options(cfg.plane, cfg.slices, cfg.slice_mask)   # a MedicalError naming the flag, before anything loads
    check_preview(cfg)
    if cfg.checkpointing not in ("on", "off", "auto"):
        raise TrainError(f"{arg('checkpointing')} {cfg.checkpointing!r}: on, off or auto")
    if not cfg.init.strip():
        raise TrainError(f"{arg('init')} {cfg.init!r}: give word(s) such as \"*\" or \"chest x-ray\", or random")
    device = local_device(resolve_device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    check_launch()
    if cfg.batch % world()[1]:
        raise TrainError(f"{arg('batch')} {cfg.batch}: with {world()[1]} processes it must be a multiple of "
                         f"{world()[1]} (each process takes an equal share of every micro-batch)")
    return Plan(parse_lr(learning_rate(cfg)), device, resolve_dtype(cfg.dtype, device), training_prompts(cfg),
                _val_fraction(cfg))
