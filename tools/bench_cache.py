"""How the on-disk latent cache (medti.training.cache_read) scales: `python tools/bench_cache.py`.

1. Memory: the peak RSS of a real training process (`python -m medti.train --cache`, the tiny random model of
   medti.training.demo at 64 x 64 pixels: [4, 8, 8] latents) reading from a cache of 1,000 and of 100,000 images.
   The caches are fabricated, not encoded: random latents written by the encoder's own writer
   (medti.training.cache_write.write_shard) under a manifest as `python -m medti.data encode` writes it, with the
   tiny model's sha256, so the run accepts them. What grows with the set is the manifest's per-image lists
   (pseudonyms, captions, patients: about 100 bytes an image); the latents are read row by row.
2. Throughput: images per second the reader gives the loop at SD's 512-pixel latents ([4, 64, 64] fp32, 64 KiB a
   column's row): random rows, in batches of 8, of the "once" column (what a --latents once step reads), from a
   cache of 2,048 images (shards in the page cache after the first pass: a warm cache; the first pass is the cold
   figure only if the files were not just written).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from medti.files.atomic import text_bytes, write_atomic
from medti.files.hashes import sha256_of
from medti.training.cache_read import ShardCache, read_manifest
from medti.training.cache_write import FORMAT, MANIFEST, write_shard
from medti.training.demo import tiny_model

SHARD = 256


def fabricate(folder: Path, images: int, shape: tuple, model_sha256: str) -> Path:
    """A cache of `images` random latents of `shape`, as encode writes it (settings for 64-pixel, unflipped)."""
    folder.mkdir(parents=True)
    settings = {"format": FORMAT, "model_sha256": model_sha256, "vae": {"scale_factor": 0.18215,
                "latent_channels": shape[0], "dtype": "torch.float32"}, "encoder": None, "resolution": 64,
                "preprocess": "center", "channels": "", "window": "", "plane": "axial", "slices": "all",
                "slice_mask": False, "strict": False, "flip": False, "seed": 0, "captions": False,
                "shard_size": SHARD}
    names, records = [f"img-{i:012x}" for i in range(images)], []
    g = torch.Generator().manual_seed(0)
    for index, first in enumerate(range(0, images, SHARD)):
        count = min(SHARD, images - first)
        columns = {name: torch.randn((count, *shape), generator=g) for name in ("mean", "logvar", "once")}
        record = write_shard(folder, index, columns, settings, names[first:first + count])
        records.append({key: record[key] for key in ("file", "sha256", "count")})
    manifest = {**settings, "images": images, "rows": images, "data_sha256": "0" * 64, "pseudonyms": names,
                "texts": [""] * images, "patients": [f"patient-{i + 1:03d}" for i in range(images)],
                "shards": records}
    write_atomic(folder / MANIFEST, text_bytes(json.dumps(manifest)))
    return folder


def peak_rss(model: Path, config: Path, cache: Path, out: Path, steps: int) -> float:
    """MiB: the peak RSS of a training run of `steps` steps at batch 8 from `cache` (its own process)."""
    code = ("import resource, sys; from medti.train import main; rc = main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    args = ["--model", str(model), "--config", str(config), "--cache", str(cache), "--token", "<t>", "--vectors",
            "2", "--batch", "8", "--max-steps", str(steps), "--save-every", str(steps), "--preview-every", "0",
            "--out", str(out)]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return int(done.stdout.strip().splitlines()[-1]) / 1024   # ru_maxrss: KiB on Linux


def throughput(cache: Path, batches: int) -> tuple:
    """(images/s of the first pass, images/s of the second) over `batches` random batches of 8 rows."""
    reader = ShardCache(cache, read_manifest(cache))
    order = torch.randperm(len(reader["once"]), generator=torch.Generator().manual_seed(1)).tolist()
    rates = []
    for _ in range(2):
        start = time.perf_counter()
        for b in range(batches):
            reader["once"][[order[(b * 8 + i) % len(order)] for i in range(8)]]
        rates.append(batches * 8 / (time.perf_counter() - start))
    return tuple(rates)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,100000", help="images in the caches of the memory figure")
    p.add_argument("--steps", type=int, default=20, help="training steps of each memory run")
    p.add_argument("--work", default="", help="folder for the caches (default: a temporary one, removed after)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work or None) as tmp:
        work = Path(tmp)
        model, config = tiny_model(work / "model")
        sha = sha256_of(model)
        for size in map(int, args.sizes.split(",")):
            start = time.perf_counter()
            cache = fabricate(work / f"cache-{size}", size, (4, 8, 8), sha)
            made = time.perf_counter() - start
            rss = peak_rss(model, config, cache, work / f"run-{size}", args.steps)
            print(f"{size:>7,} images ([4, 8, 8] latents, fabricated in {made:.1f} s): training peak RSS "
                  f"{rss:.0f} MiB", flush=True)
        cache = fabricate(work / "cache-sd", 2048, (4, 64, 64), "0" * 64)
        cold, warm = throughput(cache, 256)
        print(f"reader at [4, 64, 64] fp32 latents, random batches of 8: {cold:,.0f} images/s (first pass), "
              f"{warm:,.0f} images/s (second)")


if __name__ == "__main__":
    main()
