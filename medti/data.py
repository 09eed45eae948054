"""Look before training: `python -m medti.data preview --data DIR --out DIR [medti.train's data flags]`; and
`python -m medti.data encode --data DIR --model M --out CACHE`, a set encoded once into an on-disk latent cache for
`python -m medti.train --cache CACHE` (medti.training.cache_encode; docs/training.md).

`preview` writes the exact images medti.train would train on -- read, windowed, sliced, resampled and preprocessed by
the same code (medti.training.sources.load_data) -- as PNGs, with a contact sheet and data.jsonl (one line per
image: file, source, slice, patient, window), so a person can check windowing, orientation and cropping before
hours of GPU time.

    python -m medti.data preview --data picai/images --channels t2w,adc,hbv --resolution 512 --out preview/

`patient` in data.jsonl is a pseudonym (patient-001, ... in the order met), never the PatientID, and `source` the
image's pseudonym (img-<hash of its bytes>, medti.files.pseudonyms), never its path: the file is made to be looked at
and passed around. names.private.tsv beside it maps each image's pseudonym to its path, for the user alone.
"""
import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from minisd.config import check_side

from .cli import ArgumentParser, run_main
from .dataset.folder import pseudonyms
from .files.atomic import inside, write_atomic
from .files.images import contact_sheet, save_png
from .files.pseudonyms import KEY, write_key
from .training import TrainError, check_folder
from .training.cache_encode import encode_cache
from .training.config import TrainConfig, add_flags
from .training.sources import load_data

# medti.train's flags that decide what the training images are (the same names, helps and defaults)
DATA_FLAGS = ("data", "preprocess", "channels", "window", "plane", "slices", "slice_mask", "strict")
# and the ones that decide the cached latents (medti.training.cache_write)
ENCODE_FLAGS = ("model", "config", "resolution", "flip", "seed", "captions", "dtype", "device", "condition", "encoder")
# What encode does with the flags whose training help would mislead here: it stores what a run with them reads
ENCODE_HELPS = {"flip": "also encode each image's mirror image, for runs with --flip (a run from the cache must "
                        "give --flip exactly when the cache was encoded with it)",
                "captions": "store each image's caption file (image.txt beside image.png), for runs with --captions "
                            "(given exactly when the cache was encoded with it)",
                "seed": "0 <= seed < 2**32: draws each image's --latents once sample (a run with another --seed and "
                        "--latents once is refused)"}
SHEET_MAX = 256   # images on the contact sheet; data.jsonl and the PNGs hold all of them


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m medti.data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("preview", help="write the exact training images, a contact sheet and data.jsonl")
    add_flags(q, DATA_FLAGS)
    q.add_argument("--resolution", type=int, default=512, help="training image size: the model's native size "
                   "(SD2-base, SD1.5: 512; SD2 768-v: 768) unless you train at another one (default: 512)")
    q.add_argument("--out", required=True, help="a new or empty folder, not inside --data")
    e = sub.add_parser("encode", help="encode a set once into an on-disk latent cache for medti.train --cache")
    add_flags(e, DATA_FLAGS + ENCODE_FLAGS, helps=ENCODE_HELPS)
    e.add_argument("--shard-size", type=int, default=256, help="images per shard, a multiple of 4 (default: 256)")
    e.add_argument("--out", required=True, help="the cache folder: new, or one an encode was stopped in (re-run "
                   "the same command to finish it)")
    return p


def check_out(args):
    out = Path(args.out)
    check_side("resolution", args.resolution)
    check_folder("data", args.data, "images")
    if inside(out, args.data):
        raise TrainError(f"--out {out} is inside --data {args.data}: its PNGs would become training images there; "
                         "choose an --out outside that folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainError(f"--out {out}: exists and is not an empty folder; choose a new one")
    return out


def run(args):
    out = check_out(args)
    settings = {k: v for k, v in vars(args).items() if k in DATA_FLAGS}
    data = load_data(TrainConfig(**settings, resolution=args.resolution))   # checks the flags, then reads
    out.mkdir(parents=True, exist_ok=True)
    names = pseudonyms(data.patients)
    pixels = ((data.images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    lines, files = [], []
    for row, (name, patient, window) in enumerate(zip(data.pseudonyms, data.patients, data.windows, strict=True)):
        file = f"{row:05d}.png"
        save_png(out / file, Image.fromarray(np.ascontiguousarray(pixels[row])))
        source, _, piece = name.partition("#")
        lines.append({"file": file, "source": source, "slice": piece or None, "patient": names[patient],
                      "window": window})
        files.append(out / file)
    write_key(out / KEY, data.key)
    write_atomic(out / "data.jsonl", "".join(json.dumps(line) + "\n" for line in lines).encode())
    save_png(out / "contact-sheet.png", contact_sheet(files[:SHEET_MAX], labels=[str(i) for i in
                                                                                   range(min(len(files), SHEET_MAX))]))
    more = f" (the first {SHEET_MAX} on the sheet)" if len(files) > SHEET_MAX else ""
    print(f"wrote {len(files)} image(s) of {len(names)} patient(s) to {out}: 00000.png ..., contact-sheet.png"
          f"{more}, data.jsonl, {KEY} (pseudonyms to paths: keep it private)")


def dispatch(args):
    return (encode_cache if args.command == "encode" else run)(args)


def main(argv=None) -> int:
    return run_main(build_parser(), dispatch, argv)


if __name__ == "__main__":
    raise SystemExit(main())
