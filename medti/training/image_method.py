"""Image-conditioned training (`--method unet --condition dinov2`, DiNO-Diffusion's recipe, Jimenez-Perez et al.
2024): the UNet learns to denoise an image given a frozen DINO encoder's global tokens of that same image, in place of
a prompt. No token, prompt or caption is involved; the loop, optimizer, EMA, resume, validation and torchrun are the
trainer's, as for every method (medti/training/trainer.py).

What a batch row's condition is: the image's cached global tokens [count, width] (medti.training.objective
.cache_tokens, rows as the latents, mirrored rows with --flip), or None where the step's condition dropout replaced
it by the null. The draw that decides is ImageConditioning.drop's (one uniform per row from the step's generator,
dropped when below --condition-dropout), made in get_batch after every other draw of the step, so a text run draws
exactly what it drew before. The method's `context` then projects the tokens (the projection trains with the UNet
when the encoder's width differs from the UNet's context width) and puts sd.image.null's zeros in the dropped rows.
"""
from pathlib import Path

import torch

from minisd.config import LoadError
from minisd.dino_load import RELEASES, load_encoder, read_release
from minisd.errors import arg, spoken
from minisd.image_conditioning import attach

from . import TrainError
from .methods import UNetFineTune

CONDITIONS = ("dinov2",)   # --condition: "" (text, the default) or an image encoder's global tokens
# Flags that only mean something with a prompt: refused with --condition, each in one line
PROMPT_FLAGS = ("token", "instance_prompt", "captions", "template", "class_prompt", "train_text")


def check_condition(cfg):
    """--condition, --encoder and --condition-dropout, before anything loads (the encoder folder's config files
    are read, its weights are not): one line naming the flag."""
    if not cfg.condition:
        for name in ("encoder", "condition_dropout"):
            if getattr(cfg, name) != getattr(type(cfg)(), name):
                raise TrainError(f"{arg(name)} is for an image-conditioned run: add {spoken('condition', 'dinov2')}")
        return
    if cfg.condition not in CONDITIONS:
        raise TrainError(f"{arg('condition')} {cfg.condition!r}: {' or '.join(CONDITIONS)} (or leave it out for "
                         "text conditioning)")
    if cfg.method != "unet":
        raise TrainError(f"{arg('condition')} {cfg.condition} trains the UNet on image tokens: use "
                         f"{spoken('method', 'unet')}, not {cfg.method}")
    given = next((name for name in PROMPT_FLAGS if getattr(cfg, name) != getattr(type(cfg)(), name)), None)
    if given:
        raise TrainError(f"{arg(given)} with {arg('condition')} {cfg.condition}: an image-conditioned run has no "
                         f"prompt (each image is its own condition); leave out {arg(given)}")
    if not 0 <= cfg.condition_dropout <= 1:   # NaN fails too
        raise TrainError(f"{arg('condition_dropout')} {cfg.condition_dropout:g}: a probability in [0, 1], e.g. 0.1 "
                         "(the fraction of conditions replaced by the null, which guidance needs)")
    check_encoder(cfg.encoder)


def check_encoder(encoder: str):
    """--encoder: a hub release minisd knows, or a folder whose config files describe a DINO release."""
    if not encoder:
        raise TrainError(f"{arg('condition')} dinov2: give {arg('encoder')}, a DINO release such as "
                         "facebook/dinov2-with-registers-base, or the folder of one")
    if Path(encoder).is_dir():
        try:
            read_release(Path(encoder))
        except LoadError as e:   # the message names the folder; say which flag gave it
            raise TrainError(f"{arg('encoder')} {e}") from None
    elif encoder not in RELEASES:
        raise TrainError(f"{arg('encoder')} {encoder}: neither a folder of a DINO release nor one of "
                         f"{', '.join(RELEASES)}")


def attach_encoder(sd, cfg, device) -> Path:
    """sd.image from --encoder (frozen, float32; the projection started from --seed); returns the encoder's weights
    file, whose sha256 is the encoder's identity in the state file and in an on-disk cache. The trainer caches the
    images' global tokens with it (medti.training.objective.cache_tokens), then moves it off the device: training
    reads only the cached tokens."""
    encoder, path = load_encoder(cfg.encoder, device=device, with_path=True)
    attach(sd, cfg.encoder, encoder, cfg.seed)
    return path


def conditions(tokens, rows: list, dropped: list) -> list:
    """A batch's conditions: row r's tokens, or None where its condition was dropped. `tokens`: the cache's column
    (a tensor in memory, or an on-disk cache's column), read once for all the rows."""
    read = tokens[list(rows)]
    return [None if drop else row for row, drop in zip(read, dropped, strict=True)]


def draw_dropped(batch: int, p: float, g: torch.Generator) -> list:
    """Which rows lose their condition: ImageConditioning.drop's draw (one uniform per row, dropped below p)."""
    return (torch.rand(batch, generator=g) < p).tolist()


class ImageFineTune(UNetFineTune):
    """--method unet --condition dinov2: the UNet fine-tune of methods.py on image tokens. What trains besides the
    UNet: the projection (sd.image.proj, fp32) when the encoder's width differs from the context width; it is in
    params (AdamW, state.safetensors, the EMA) as `image.weight` and `image.bias`, and saved in model.safetensors as
    `image_proj.*` with the `image_condition` metadata, which minisd.load reads back. `prompt`: the tokens of a fixed
    image, whose variations the previews show; `shown` names that image (by pseudonym)."""

    def __init__(self, sd, cfg, device, tokens: torch.Tensor, shown: str):
        super().__init__(sd, cfg, [""], device)
        if sd.image.proj is not None:
            self.parts["image"] = sd.image.proj
            for name, param in sd.image.proj.named_parameters():
                self.params[f"image.{name}"] = param.requires_grad_(True)
                if self.decay:
                    self.buffers[f"ema.image.{name}"] = param.detach().clone()
        self.prompt, self.shown = tokens, shown
        self.meta = {**{k: v for k, v in self.meta.items() if k != "instance_prompt"}, "condition": cfg.condition,
                     "condition_dropout": f"{cfg.condition_dropout:g}", **sd.image.metadata()}

    def context(self, conds: list) -> torch.Tensor:
        """[B, count, context_dim]: each row's tokens through the projection, the null where None."""
        image = self.sd.image
        blank = torch.zeros(image.cfg.count, image.cfg.width)
        tokens = torch.stack([blank if c is None else c for c in conds]).to(next(self.sd.unet.parameters()).device)
        projected = image.project(tokens)
        dropped = torch.tensor([c is None for c in conds], device=projected.device)[:, None, None]
        return torch.where(dropped, image.null(len(conds)).to(projected), projected)

