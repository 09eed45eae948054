"""How long `python -m medti.audit` takes at the scale of a real audit: 2,000 synthetic x 1,000 training images at 512².

The images are made here: tests/test_privacy.py's simulated chest X-rays, drawn at 128 px and enlarged to the size
asked, with 8-bit noise so the PNGs are as large and slow to decode as real ones (~200 kB at 512²). Among the
synthetic images are PLANTED copies of training images, one change of CHANGES each, so the run also shows that
the planted copies are found at this scale (and nothing else). The audit runs end to end through medti.audit.main,
then its stages again one by one (reading, descriptors, comparison, the training set against itself, outputs).

    python tools/bench_audit.py [n_synthetic n_train size]
"""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_privacy import CHANGES, chest  # noqa: E402 (tests/ is not a package)

from bench_common import verdict  # noqa: E402
from medti.audit import main  # noqa: E402
from medti.quality import privacy  # noqa: E402
from medti.quality.audit_report import Audit, outputs  # noqa: E402
from medti.quality.folders import load_set  # noqa: E402

PLANTED = 21   # 3 copies per change


def enlarged(array: np.ndarray, size: int, rng) -> np.ndarray:
    big = np.asarray(Image.fromarray(array).resize((size, size), Image.BICUBIC), dtype=np.float64)
    return np.clip(np.round(big + rng.normal(0, 2, big.shape)), 0, 255).astype(np.uint8)


def make_sets(root: Path, n_synthetic: int, n_train: int, size: int):
    """root/train: n_train patients; root/synthetic: PLANTED changed copies of training patients 0.., then new
    patients. compress_level 1: quick to write; decoding costs about the same at any level."""
    rng, changes = np.random.default_rng(0), list(CHANGES.values())
    (root / "train").mkdir(), (root / "synthetic").mkdir()
    train = []
    for i in range(n_train):
        train.append(enlarged(chest(i, 128), size, rng))
        Image.fromarray(train[-1]).save(root / "train" / f"p{i:05d}.png", compress_level=1)
    for i in range(n_synthetic):
        planted = i < PLANTED
        image = changes[i % len(changes)](train[i], rng) if planted else enlarged(chest(10 ** 6 + i, 128), size, rng)
        Image.fromarray(image).save(root / "synthetic" / f"{i:05d}.png", compress_level=1)


def stages(root: Path) -> dict:
    """The audit's stages timed one by one (what main() does, in order)."""
    times, start = {}, time.perf_counter()

    def lap(name):
        nonlocal start
        times[name], start = time.perf_counter() - start, time.perf_counter()
    train, synthetic = load_set(root / "train", "train", 2), load_set(root / "synthetic", "synthetic")
    lap("read and decode the PNGs")
    train_desc, syn_desc = privacy.descriptors(train.images), privacy.descriptors(synthetic.images)
    lap("descriptors (gray, 64 x 64)")
    ref = privacy.fit(train_desc)
    match = privacy.nearest(ref, syn_desc)
    lap("synthetic vs training (prefilter + exact)")
    own = privacy.nearest(ref, train_desc, exclude_self=True)
    lap("training vs training")
    outputs(Audit(train, synthetic, match, own, privacy.THRESHOLD, {}, {"train": "t", "synthetic": "s"}))
    lap("report and contact sheets")
    return times


def run(n_synthetic: int = 2000, n_train: int = 1000, size: int = 512) -> dict:
    """Print and return {"total": seconds of the whole command, stage: seconds, "flagged": n}."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        make_sets(root, n_synthetic, n_train, size)
        print(f"made {n_synthetic} synthetic ({PLANTED} planted copies) and {n_train} training images at {size}² "
              f"in {time.perf_counter() - start:.0f} s (not timed)")
        start = time.perf_counter()
        status = main(["--train", str(root / "train"), "--synthetic", str(root / "synthetic"), "--out",
                       str(root / "audit")])
        total = time.perf_counter() - start
        assert status == 0
        flagged = sum('"flagged": true' in line for line in (root / "audit" / "audit.json").read_text().splitlines())
        found = {"total": total, **stages(root), "flagged": flagged}
    print(f"python -m medti.audit, {n_synthetic} x {n_train} at {size}², {torch.get_num_threads()} threads: "
          f"{total:.0f} s in all; {flagged} flagged (planted: {PLANTED})")
    for name, seconds in found.items():
        if name not in ("total", "flagged"):
            print(f"  {name:45s} {seconds:7.1f} s")
    return found


def section10(runs: int, table, quick: bool = False):
    """tools/benchmark.py's section 10 (one run: the audit is deterministic and its stages are printed too)."""
    n_synthetic, n_train, size = (200, 100, 128) if quick else (2000, 1000, 512)
    found = run(n_synthetic, n_train, size)
    rows = [[f"python -m medti.audit, {n_synthetic} synthetic x {n_train} training at {size}²",
             f"{found['total']:.1f} s", f"{found['flagged']} flagged of {PLANTED} planted",
             "minutes on a CPU: " + verdict(found["total"], 600, " s")]]
    rows += [[f"  {name}", f"{seconds:.1f} s", "", ""] for name, seconds in found.items()
             if name not in ("total", "flagged")]
    table(f"10. privacy audit (no reference tool has one), {torch.get_num_threads()} threads, CPU", rows,
          ("", "time", "copies", "target"))


if __name__ == "__main__":
    run(*map(int, sys.argv[1:]))
