"""Where a run's training images come from, as the trainer's latent cache: --data read into memory and encoded once
(folder_cache), or an on-disk cache made by `python -m medti.data encode` (--cache, medti.training.cache_read),
with --val's held-out images read from their folder either way. `medti.data preview` reads --data with load_data
too, so it shows exactly the images a run trains on.
"""
from minisd.errors import arg

from ..dataset.folder import DataError, check_captions, load_dataset, parse_channels
from ..dataset.report import summary, warn_skipped, warn_survey
from ..medical.window import parse_window
from . import TrainError, distributed
from .config import Plan, TrainConfig
from .objective import cache_latents, cache_tokens
from .validation import HeldOut, hold_out


def load_data(cfg: TrainConfig, flag: str = "data", tokens=None):
    """The images of --data (or --val) at cfg.resolution; skipped files are listed in one warning. `tokens`: with
    --captions, caption -> tokens of the longest training prompt holding it (checked: medti.dataset.folder)."""
    window = parse_window(cfg.window, arg("window")) if cfg.window else None
    try:
        channels = parse_channels(cfg.channels)
        data = load_dataset(getattr(cfg, flag), cfg.resolution, cfg.preprocess, channels, cfg.strict, window,
                            plane=cfg.plane, slices=cfg.slices, slice_mask=cfg.slice_mask, captions=cfg.captions)
        if cfg.captions and flag == "data":   # the class images (DreamBooth) and --val use no captions
            check_captions(data, getattr(cfg, flag), arg(flag), tokens)
    except DataError as e:   # the message names the folder or file; say which flag it came from
        raise TrainError(f"{arg(flag)} {e}") from None
    warn_skipped(data.skipped, arg(flag))
    warn_survey(data.survey, arg(flag))
    if distributed.main_process():   # one report of the set, not one per torchrun process
        print(f"{arg(flag)}: {summary(data)}")   # stdout, with the step lines: stderr keeps errors to one line
    return data


def folder_cache(sd, cfg: TrainConfig, plan: Plan) -> tuple:
    """(the latent cache of --data's training images, the held-out images or None, --data's fingerprint)."""
    # each caption in each template line that has a slot for it, counted by the model's own tokenizer
    data = load_data(cfg, tokens=lambda caption: max((sd.text.count(p.replace("{caption}", caption))
                                                      for p in plan.prompts if "{caption}" in p), default=0))
    rows, held = hold_out(data, load_data(cfg, "val") if cfg.val else None, plan.val_fraction, cfg.seed)
    cache = cache_latents(sd, data.images[rows], cfg.flip, cfg.seed)
    cache["captions"] = [data.captions[i] for i in rows]   # "" for an image without one (--captions)
    if cfg.condition:   # each image's own global tokens are its condition (medti.training.image_method)
        cache["tokens"] = cache_tokens(sd.image, data.images[rows], cfg.flip)
    return cache, held, data.fingerprint, data.pseudonyms[rows[0]]


def cache_source(sd, cfg: TrainConfig, plan: Plan, cache) -> tuple:
    """(the latent cache, the held-out images or None, the data's fingerprint, the pseudonym of the first training
    image): from --cache (opened in setup) and --val, or from --data (folder_cache)."""
    if not cfg.cache:
        return folder_cache(sd, cfg, plan)
    if distributed.main_process():   # as --data's summary: what the run trains on, once the shards are verified
        made = cache.manifest
        print(f"{arg('cache')}: {made['images']} image(s) of {len(set(made['patients']))} patient(s) in "
              f"{len(made['shards'])} shard(s), each matching its sha256"
              + (", with their mirror images (--flip)" if made["flip"] else ""))
    val = load_data(cfg, "val") if cfg.val else None
    held = val and HeldOut(val.images, val.names, {"folder_sha256": val.fingerprint}, val.pseudonyms)
    return cache, held, cache.manifest["data_sha256"], cache.manifest["pseudonyms"][0]
