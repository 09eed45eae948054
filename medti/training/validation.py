"""Validation for `python -m medti.train`: the denoising loss of the current vectors on held-out images, at fixed
draws, so that a number says which step's embedding is best (the study picked its checkpoints by eye).

What is fixed: the images (--val DIR, or a --val-fraction of --data chosen from --seed), their latents (the VAE
posterior mean, encoded once like the training images), and per image --val-draws (timestep, noise) pairs with the
timesteps stratified over 0..999. Every evaluation uses exactly these draws, so the numbers of different steps,
and of a resumed run, are comparable: they differ only because the vectors differ.

Why this leaves training untouched: every draw here comes from a generator of its own, seeded from a hash of
("validation", --seed, ...), and the UNet's forward pass draws nothing; training's draws come from its own
(seed, step) generators (medti.training.objective.step_generator). A run with validation trains bit-identically to one
without.
"""
import hashlib
import math
import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch
from safetensors import SafetensorError

from minisd.errors import arg, excerpt
from minisd.schedule import NUM_TIMESTEPS
from minisd.tensorfile import open_safetensors

from . import TrainError, distributed
from .objective import diffusion_loss


def derived_seed(what: str, seed: int, index: int = 0) -> int:
    """A seed for one validation stream, from sha256 of its name, --seed and an index. Why a hash: training seeds
    its generators with small linear formulas of (seed, step, micro); a hash keeps our streams off those seeds."""
    digest = hashlib.sha256(f"medti validation {what} {seed} {index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


class HeldOut(NamedTuple):
    """The images validation uses and how they were chosen (stored in the run's settings: --resume checks it)."""
    images: torch.Tensor   # [M, 3, R, R] in [-1, 1], preprocessed like the training images
    names: list            # file (or case) names, relative to --val or to --data
    about: dict            # {"fraction": F} or {"folder_sha256": fingerprint of --val}
    pseudonyms: list       # how val.txt and the saved settings name them (medti.files.pseudonyms)


def split(n: int, fraction: float, seed: int, unit: str = "image") -> tuple[list, list]:
    """(training rows, validation rows), each sorted, of n images (or patients): round(fraction * n) rows (halves
    up) held out, a random choice from --seed. Refused unless both sides keep at least one."""
    n_val = math.floor(fraction * n + 0.5)
    if n_val < 1 or n_val > n - 1:
        raise TrainError(f"{arg('val_fraction')} {fraction:g} of {n} {unit}(s) holds out {n_val}: at least one "
                         f"{unit} must be left for training and one for validation")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed("split", seed))).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def split_patients(patients: list, fraction: float, seed: int) -> tuple[list, list]:
    """split() over patients, not images: a patient's images (the slices of one scan, two views of one chest) all
    land on one side, so the held-out loss never measures a patient the run trained on. With one image per patient
    (files without a PatientID) it is exactly split() over the images."""
    unique = list(dict.fromkeys(patients))   # in the order of the images
    unit = "image" if len(unique) == len(patients) else "patient"
    held = {unique[i] for i in split(len(unique), fraction, seed, unit)[1]}
    return ([i for i, p in enumerate(patients) if p not in held], [i for i, p in enumerate(patients) if p in held])


def _warn_duplicates(train: torch.Tensor, held: HeldOut):
    """--val images that are --data images too (identical after preprocessing) measure training, not held-out
    loss: say so, but go on (a user may want a few known images in the set)."""
    seen = {hashlib.sha256(image.numpy().tobytes()).digest() for image in train}
    twins = [name for name, image in zip(held.names, held.images, strict=True)
             if hashlib.sha256(image.numpy().tobytes()).digest() in seen]
    if twins:
        print(f"warning: {len(twins)} {arg('val')} image(s) are also in {arg('data')} (identical after "
              f"preprocessing), e.g. {twins[0]}: their loss is no held-out measure", file=sys.stderr)


def hold_out(data, val_data, fraction: float, seed: int) -> tuple:
    """(the rows of --data that train, HeldOut or None) from the --data Dataset and the --val Dataset (or None)."""
    every = list(range(len(data.names)))
    if val_data is not None:
        held = HeldOut(val_data.images, val_data.names, {"folder_sha256": val_data.fingerprint}, val_data.pseudonyms)
        _warn_duplicates(data.images, held)
        return every, held
    if not fraction:
        return every, None
    train, val = split_patients(data.patients, fraction, seed)
    if distributed.main_process():   # stdout, with the set's summary: how many the fraction came to, once
        print(f"{arg('val_fraction')} {fraction:g}: held out {len(val)} of {len(data.names)} image(s) "
              f"({len({data.patients[i] for i in val})} patient(s)) for validation, listed in val.txt")
    return train, HeldOut(data.images[val], [data.names[i] for i in val], {"fraction": fraction},
                          [data.pseudonyms[i] for i in val])


@dataclass
class ValidationSet:
    """The fixed draws and what the loss needs besides the model and the vectors."""
    latents: torch.Tensor   # [M, 4, h, w] fp32 on the CPU: posterior means, scaled by the model's scale_factor
    names: list             # the images' pseudonyms (val.txt), and their paths (names.private.tsv)
    paths: list
    draws: int              # (timestep, noise) draws per image
    seed: int               # --seed
    token: str
    prompts: list           # the training prompts; draw j of image i uses prompt (i * draws + j) % len(prompts)
    conditions: list | None = None   # image-conditioned runs: image i's global tokens, its every draw's condition


def fixed_draws(v: ValidationSet, i: int) -> tuple:
    """Image i's draws: (timesteps [draws], noise [draws, 4, h, w], prompts). Timestep j lies uniformly in the j-th
    of `draws` equal bins of 0..999 (stratified): a trained model's loss depends strongly on t, and one draw per
    bin keeps every image's estimate from resting on a few lucky timesteps. A generator per image: image i's draws
    do not depend on how many images there are.

    Why 8 by default (--val-draws), measured on the demo (8 held-out phantoms, 10 draw sets): the spread of the
    difference between two vectors' losses -- what ranks the saves -- falls from 0.0055 (1 draw per image) to 0.0026
    (4) and 0.0016 (8), then only to 0.0014 (16) at twice the cost: past 8 the images, not the draws, limit it."""
    g = torch.Generator().manual_seed(derived_seed("draws", v.seed, i))
    u = torch.rand(v.draws, generator=g, dtype=torch.float64)
    t = ((torch.arange(v.draws) + u) * NUM_TIMESTEPS / v.draws).long().clamp(max=NUM_TIMESTEPS - 1)
    noise = torch.randn((v.draws, *v.latents.shape[1:]), generator=g)
    texts = ([v.conditions[i]] * v.draws if v.conditions is not None else   # never dropped: the loss given the image
             [v.prompts[(i * v.draws + j) % len(v.prompts)] for j in range(v.draws)])
    return t, noise, texts


@torch.no_grad()
def validation_loss(sd, context, v: ValidationSet) -> float:
    """Mean denoising loss over every image's fixed draws (one UNet batch of `draws` per image): the training
    loss's expectation, estimated on images the run never trains on. `context(texts)` is the method's
    conditioning (medti.training.methods), so what is validated is exactly what trains."""
    device, total = next(sd.unet.parameters()).device, 0.0
    for i, latent in enumerate(v.latents):
        t, noise, texts = fixed_draws(v, i)
        latents = latent.expand(v.draws, *latent.shape).to(device)
        total += diffusion_loss(sd, context(texts), latents, noise.to(device), t.to(device)).item()
    return total / len(v.latents)


def _metadata(path) -> dict:
    """A saved file's safetensors metadata, or one line saying it cannot be read (resume cannot trust it)."""
    try:
        with open_safetensors(path) as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise TrainError(f"{arg('resume')}: {path} is not a readable safetensors file ({excerpt(e, 80)}); move it away "
                         "and resume again") from None


def best_so_far(records: list, best_file, step: int) -> tuple | None:
    """(step, val_loss) of the best save up to `step`, for --resume: the lowest val_loss in log.jsonl (the earliest
    step on a tie, as at training time), or, if the log holds none (deleted), the best file's metadata."""
    logged = [(r["val_loss"], r["step"]) for r in records
              if isinstance(r.get("val_loss"), float) and r["step"] <= step]
    if logged:
        loss, at = min(logged)
        return at, loss
    if not best_file.exists():
        return None
    meta = _metadata(best_file)
    try:
        at, loss = int(meta["step"]), float(meta["val_loss"])
    except (KeyError, ValueError):
        raise TrainError(f"{arg('resume')}: {best_file} has no step and val_loss metadata; move it away and resume "
                         "again") from None
    return (at, loss) if at <= step else None


def keep_best(best: tuple | None, step: int, val_loss: float, write, meta: dict, path) -> tuple | None:
    """The new (step, val_loss) best, after `write(path, meta)` of this save (the method's file, atomic) if it
    improves on `best`: strictly lower and finite, so a tie keeps the earlier step and a NaN (fp16 overflow) never
    wins."""
    if math.isfinite(val_loss) and (best is None or val_loss < best[1]):
        best = (step, val_loss)
        write(path, {**meta, "step": str(step), "val_loss": repr(val_loss)})   # repr: round-trips exactly
    print(f"step {step}: validation loss {val_loss:.5f}" +
          (f" (best {best[1]:.5f} at step {best[0]})" if best else ""), file=sys.stderr)
    return best
