"""What every section of tools/benchmark.py shares: the machine line, interleaved medians, the table printer, and
our model's variants (packed convs, torch.compile) built once per run and kept in b.results."""
import contextlib
import copy
import dataclasses
import os
import statistics
import time

import diffusers
import torch
import torch.nn.functional as F

from medti.generation.pipeline import SampleSettings, compile_for_inference, decode, sample
from minisd.packing import pack_convs

TOKEN, N_VECTORS, STEPS, GB, CL = "<bench>", 64, 3, 1e9, torch.channels_last


# Why a target may not be met on this machine, in words, for every "NOT met" (verdict): filled by machine() and
# benchmark.py's main from what they find (tiny models, a busy machine, a single run).
CAVEATS = []
BUSY = 0.5   # load average above which other processes share the cores with the timed runs


def machine():
    cpu = open("/proc/cpuinfo").read()
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name")), "?")
    flags = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f" {f}" in cpu]
    load = os.getloadavg()[0]
    print(f"# machine: {model} ({' '.join(flags)}), {os.cpu_count()} cores; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, diffusers {diffusers.__version__}; load average {load:.2f}"
          + ("  -- WARNING: machine busy, times unreliable" if load > BUSY else ""), flush=True)
    if load > BUSY:
        CAVEATS.append(f"load average {load:.1f} on {os.cpu_count()} cores: other processes took CPU time from "
                       "the timed runs")


def announce(text: str):
    """A progress line, printed at once: a section of the full benchmark runs for minutes."""
    print(f"# {time.strftime('%H:%M:%S')} {text}", flush=True)


def medians(fns: dict, runs: int, warmup=False) -> dict:
    """name -> median seconds of `runs` calls of each function, interleaved (a, b, a, b, ...)."""
    for fn in fns.values() if warmup else ():
        fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def verdict(value, limit, unit="×", at_least=False) -> str:
    """`≤ 0.9×: met`, or `≤ 0.9×: NOT met (1.07× here; why)`: the target, the figure, and what on this machine may
    explain the shortfall (CAVEATS), or that nothing does."""
    if limit is None or value is None:
        return ""
    target = f"{'≥' if at_least else '≤'} {limit:g}{unit}"
    if value >= limit if at_least else value <= limit:
        return f"{target}: met"
    why = "; ".join(CAVEATS) or "full size on an idle machine: a shortfall of the code on this CPU"
    return f"{target}: NOT met ({value:.3g}{unit} here; {why})"


def row(what, ours, theirs, limit=None):
    """A timing row: seconds, ratio ours/theirs and the target on that ratio."""
    ratio = ours / theirs if theirs else None
    return [what, f"{ours:.2f} s", f"{theirs:.2f} s" if theirs else "-", f"{ratio:.2f}×" if ratio else "-",
            verdict(ratio, limit)]


def table(title: str, rows: list, header=("", "ours", "diffusers", "ratio", "target")):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n## {title}")
    for r in [header, *rows]:
        print("  " + "  ".join(f"{c:<{w}}" if i in (0, len(r) - 1) else f"{c:>{w}}"
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def psnr(a, b) -> float:
    """PSNR in dB of two images in [-1, 1] (peak-to-peak 2)."""
    return (10 * torch.log10(4 / F.mse_loss(a.double(), b.double()))).item()


def autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def txt2img_ours(sd, b):
    settings = SampleSettings(width=b.size, height=b.size, cfg=2.0, steps=STEPS)
    return decode(sd, sample(sd, b.cond, b.uncond, [1.0], [0], settings))


def unet_inputs(b, rows=2, size=None, dtype=torch.float32):
    gen, h = torch.Generator().manual_seed(0), (size or b.size) // 8
    x, context = torch.randn(rows, 4, h, h, generator=gen), torch.randn(rows, 77, b.cond.shape[-1], generator=gen)
    return x.to(dtype), torch.full((rows,), 500.0), context.to(dtype)

def compiled(b):
    """Ours with --compile (medti.generation.pipeline.compile_for_inference), built once; the first calls compile and
    are timed apart: (sd, {what: seconds})."""
    if "compiled" not in b.results:
        fast = dataclasses.replace(b.sd, vae=copy.deepcopy(b.sd.vae))   # the decoder is compiled in place
        b.results["compiled"] = (compile_for_inference(fast), {})
    return b.results["compiled"]

def shared_copy(module):
    """A copy of the module tree that shares the parameters: packing it leaves the original as it was."""
    return copy.deepcopy(module, {id(p): p for p in module.parameters()})

def pack_sd(sd):
    return dataclasses.replace(sd, unet=pack_convs(shared_copy(sd.unet)), vae=pack_convs(shared_copy(sd.vae)))

def packed(b):
    """Ours as `python -m medti.generate` runs on the CPU by default: conv weights packed for oneDNN
    (minisd.packing); only the packed weights take new memory."""
    if "packed" not in b.results:
        b.results["packed"] = pack_sd(b.sd)
    return b.results["packed"]

def first_call(b, what: str, fn):
    """Run fn once (compiling what it needs) and note how long that took."""
    start = time.perf_counter()
    fn()
    compiled(b)[1][what] = time.perf_counter() - start
