"""`python -m medti.data encode`: its checks, the model (and image encoder) it loads, and the settings a cache records
(medti.training.cache_write writes the shards; medti.training.cache_read checks them against a training run).

    python -m medti.data encode --data chest-xrays/ --model sd2-base --resolution 512 --out xray-cache/
    torchrun --nproc_per_node 4 -m medti.data -- encode --data ... --out xray-cache/   # rank r: shards r, r+4, ...
"""
import dataclasses
from pathlib import Path

import torch

import minisd
from minisd.config import resolve_device, resolve_dtype
from minisd.dino_load import load_encoder
from minisd.errors import arg
from minisd.image_conditioning import attach

from ..dataset.folder import DataError, Reading, parse_channels
from ..dataset.report import warn_skipped
from ..files.atomic import inside
from ..files.hashes import sha256_of
from ..files.pseudonyms import KEY
from ..medical.window import parse_window
from . import TrainError, check_folder, distributed
from .cache_write import FORMAT, MANIFEST, encode
from .config import TrainConfig
from .image_method import check_condition


def check_encode(args) -> Path:
    """One line for each flag that cannot work, before the model loads."""
    out = Path(args.out)
    check_folder("data", args.data, "images")
    if inside(out, args.data):
        raise TrainError(f"{arg('out')} {out} is inside {arg('data')} {args.data}; choose an {arg('out')} outside it")
    if (out / MANIFEST).exists():
        raise TrainError(f"{arg('out')} {out} holds a finished cache already; choose a new folder")
    # what a stopped encode leaves: shards, their records, write_atomic's temporary files, the key file
    ours = ("shard-", ".shard-", KEY)
    if out.exists() and (not out.is_dir() or any(not p.name.startswith(ours) for p in out.iterdir())):
        raise TrainError(f"{arg('out')} {out}: exists and is neither empty nor a stopped encode's cache; choose a "
                         "new folder")
    if args.shard_size < 4 or args.shard_size % 4:
        raise TrainError(f"{arg('shard_size')} {args.shard_size}: must be a positive multiple of 4 (the VAE encodes "
                         "4 images at a time; shards of a multiple of 4 give the latents of the whole set at once)")
    if args.condition:   # the same checks as medti.train's, before the model loads (the folder's configs are read)
        check_condition(TrainConfig(method="unet", condition=args.condition, encoder=args.encoder))
    elif args.encoder:
        raise TrainError(f"{arg('encoder')} stores each image's tokens: add {arg('condition')} dinov2")
    if not 0 <= args.seed < 2 ** 32:
        raise TrainError(f"{arg('seed')} {args.seed}: must be 0 <= seed < 2**32")
    return out


def load_model(args, cfg: TrainConfig):
    """The model on this rank's device (its VAE encodes), with the image encoder attached for --condition; and the
    encoder's identity for the manifest (None without one)."""
    device = distributed.local_device(resolve_device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    sd = minisd.load(cfg.model, config=cfg.config or None, dtype=resolve_dtype(cfg.dtype, device), device=device)
    if not args.condition:
        return sd, None
    encoder, weights = load_encoder(args.encoder, device=device, with_path=True)
    image = attach(sd, args.encoder, encoder)
    return sd, {"name": image.cfg.encoder, "width": image.cfg.width, "count": image.cfg.count,
                "sha256": sha256_of(weights)}


def settings_of(cfg: TrainConfig, sd, encoder: dict | None, shard_size: int) -> dict:
    """What the cache's rows depend on: a shard made with other settings is encoded again, and a training run checks
    these against its own flags (medti.training.cache_read). No path: the model by its sha256, the encoder by its
    name and sha256, --slice-mask only as given or not."""
    return {"format": FORMAT, "model_sha256": sha256_of(sd.path), "vae": {"scale_factor": sd.scale_factor,
            "latent_channels": sd.config.vae.z_channels, "dtype": str(next(sd.vae.parameters()).dtype)},
            "encoder": encoder, "resolution": cfg.resolution, "preprocess": cfg.preprocess, "channels": cfg.channels,
            "window": cfg.window, "plane": cfg.plane, "slices": cfg.slices, "slice_mask": bool(cfg.slice_mask),
            "strict": cfg.strict, "flip": cfg.flip, "seed": cfg.seed, "captions": cfg.captions,
            "shard_size": shard_size}


def encode_cache(args):
    out = check_encode(args)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                         if hasattr(args, f.name)})
    window = parse_window(cfg.window, arg("window")) if cfg.window else None
    sd, encoder = load_model(args, cfg)
    cfg = dataclasses.replace(cfg, resolution=cfg.resolution or sd.config.resolution)
    if cfg.resolution % sd.config.size_multiple:
        raise TrainError(f"{arg('resolution')} {cfg.resolution}: must be a multiple of {sd.config.size_multiple}")
    settings = settings_of(cfg, sd, encoder, args.shard_size)
    with distributed.process_group(next(sd.vae.parameters()).device):
        if distributed.main_process():
            out.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        try:
            reading = Reading(cfg.data, cfg.resolution, cfg.preprocess, parse_channels(cfg.channels), cfg.strict,
                              window, plane=cfg.plane, slices=cfg.slices, slice_mask=cfg.slice_mask,
                              captions=cfg.captions)
            manifest = encode(sd, reading, out, settings, args.shard_size)
        except DataError as e:   # the message names the folder or file; say which flag it came from
            raise TrainError(f"{arg('data')} {e}") from None
    warn_skipped(reading.skipped, arg("data"))
    if distributed.main_process():
        print(f"wrote {out}: {manifest['images']} image(s) in {len(manifest['shards'])} shard(s), {MANIFEST}, "
              "names.private.tsv (pseudonyms to paths: keep it private)")
