"""Speed and memory of medti against diffusers on identical random full-size SD2 weights,
and SD1's networks (section 11).

    python tools/benchmark.py                # full size, ~1 hour on 2 cores: run it on an otherwise idle machine
    python tools/benchmark.py --quick        # tiny models, 1 run each: checks that the script works, no meaning
    python tools/benchmark.py --only 1,5 --runs 5
    python tools/benchmark.py --only 11      # SD1 only: UNet forward and text tower (~5 minutes on 2 cores)
    python tools/benchmark.py --only 13      # image-conditioned step vs diffusers (~5 minutes on 2 cores)

diffusers' UNet/VAE and transformers' CLIPTextModel are built with our configs' sizes and random weights, converted
to the official layout by tools/convert_diffusers.py, saved, and loaded back with minisd.load (tools/bench_models.py):
both sides compute with the same numbers. A time is the median of --runs calls per side, interleaved (ours, theirs,
ours, ...) so that load drift hits both. Sections, each in a tools/bench_*.py module: 1 UNet forward, 2
text-to-image (bench_unet), 3 textual-inversion step (bench_training), 4 fastest CPU path, 5 FLOP/s vs a matmul
(bench_cpu), 6 cost growth + estimated GPU memory, 7 loading a fp16 file in a fresh process (bench_memory), 8 the
study's 2,000-image set (bench_dataset), 9 evaluation vs torchmetrics (bench_eval), 10 the privacy audit
(bench_audit), 11 SD1's UNet and text tower (bench_sd1), 12 a LoRA and a full UNet fine-tuning step against the
diffusers examples (bench_finetune: one UNet of its own), 13 an image-conditioned training step (`--condition dinov2`)
against train_text_to_image.py with DINOv2 embeddings (bench_image: SD1's UNet at 256²). Sections 9-13 need no SD2
models of setup(): `--only 9,10,11,12,13` skips building them.
"""
import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path[:0] = [str(TOOLS), str(TOOLS.parent / "tests")]   # tests/ and tools/ are not packages
from bench_audit import section10 as audit_time  # noqa: E402
from bench_common import CAVEATS, announce, machine, packed, table, verdict  # noqa: E402
from bench_cpu import bf16_speedup, section4, section5  # noqa: E402
from bench_dataset import section8 as dataset_time  # noqa: E402
from bench_eval import section9 as evaluation_time  # noqa: E402
from bench_finetune import section12  # noqa: E402
from bench_image import section13  # noqa: E402
from bench_memory import section6, section7  # noqa: E402
from bench_models import setup  # noqa: E402
from bench_sd1 import section11  # noqa: E402
from bench_training import section3  # noqa: E402
from bench_unet import section1, section2  # noqa: E402

SD2_SECTIONS = range(1, 9)   # the sections that measure the SD2 models built by setup()
NAMES = {1: "UNet forward", 2: "text-to-image", 3: "textual-inversion step", 4: "fastest CPU path",
         5: "achieved FLOP/s", 6: "cost growth", 7: "loading a fp16 file", 8: "the study's 2,000-image set",
         9: "evaluation", 10: "privacy audit", 11: "SD1", 12: "LoRA and UNet fine-tuning steps",
         13: "image-conditioned training step"}


def timed_section(n: int, fn, *args, **kwargs):
    """Run section n, announced when it starts and when it ends: a full-size section takes minutes (a --compile
    variant compiles first), and a benchmark silent for an hour looks hung."""
    announce(f"section {n}, {NAMES[n]}: started")
    start = time.perf_counter()
    fn(*args, **kwargs)
    announce(f"section {n}, {NAMES[n]}: done in {time.perf_counter() - start:.0f} s")


def sd2_sections(args, sections: list, tmp: Path):
    """Sections 1-8 on one set of SD2 models (tiny with --quick); section 4 last, as it frees diffusers' models."""
    announce(f"building the {'tiny ' if args.quick else ''}SD2 models (diffusers' random weights, converted and "
             "loaded by ours)")
    b = setup(args, "sd2-tiny" if args.quick else "sd2", tmp)
    speedup = bf16_speedup()
    b.bf16 = speedup > 1
    print(f"# bf16 512² matmul {speedup:.3g}x the speed of fp32 on this CPU: bf16 variants "
          f"{'measured' if b.bf16 else 'skipped (emulated; a full-size bf16 UNet forward would take hours)'}")
    functions = {1: section1, 2: section2, 3: section3, 4: section4, 5: section5, 6: section6, 7: section7,
                 8: lambda b: dataset_time(b, packed(b), table)}
    for n in sorted(sections, key=lambda n: n == 4):
        if n == 4:   # diffusers is done with: free its models before copies of ours are made
            b.refs = None
            gc.collect()
        timed_section(n, functions[n], b)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models, 1 run each: checks the script, no meaning")
    p.add_argument("--only", default="1,2,3,4,5,6,7,8,9,10,11,12,13", help="comma-separated section numbers")
    p.add_argument("--runs", type=int, default=0, help="timed runs per side (median); default 3, 1 with --quick")
    args = p.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    sections = sorted(int(s) for s in args.only.split(","))
    if unknown := sorted(set(sections) - set(range(1, 14))):
        p.error(f"--only: no section {unknown[0]} (sections 1-13)")
    machine()
    print(f"# {'TINY models (--quick): checks the script only' if args.quick else 'full-size, random weights'}"
          f"; median of {args.runs} interleaved run(s); sections {sections}", flush=True)
    if args.quick:
        CAVEATS.append("tiny models (--quick): their times are per-call overhead, not the arithmetic the targets "
                       "are about")
    if args.runs == 1:
        CAVEATS.append("a single run per side: no median to even out noise")
    with tempfile.TemporaryDirectory(prefix="medti-bench-") as tmp:
        if chosen := [n for n in sections if n in SD2_SECTIONS]:
            sd2_sections(args, chosen, Path(tmp))
            gc.collect()   # the SD2 models are unreachable now: free them before section 11 builds SD1's
        if 9 in sections:
            timed_section(9, evaluation_time, args.runs, table, verdict, Path(tmp), n_images=16 if args.quick else 64)
        if 10 in sections:
            timed_section(10, audit_time, args.runs, table, quick=args.quick)
        if 11 in sections:
            timed_section(11, section11, args, Path(tmp), args.quick)
        if 12 in sections:
            gc.collect()   # section 11's SD1 models are unreachable now
            timed_section(12, section12, args, args.quick)
        if 13 in sections:
            gc.collect()   # section 12's SD2 models are unreachable now
            timed_section(13, section13, args, Path(tmp), args.quick)


if __name__ == "__main__":
    main()
