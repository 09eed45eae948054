"""Sections 6 and 7 of tools/benchmark.py: how a guided sampler step's cost grows (with tools/memory_estimate.py's
estimated GPU peaks), and loading a fp16 file, each load in a fresh process."""
import json
import statistics
import subprocess
import sys

import torch
from safetensors.torch import save_file

from bench_common import GB, medians, packed, row, table, unet_inputs, verdict
from minisd.load import state_dict
from minisd.sampling import GuidedDenoiser, denoiser

try:   # tools/memory_estimate.py: fake-tensor estimates of peak GPU memory
    from memory_estimate import estimate_generation, estimate_training
except ImportError:
    estimate_generation = estimate_training = None


def estimate(fn, **kwargs) -> str:
    if fn is None:
        return "-"
    try:
        with torch.enable_grad():
            return f"{fn(**kwargs)['total'] / GB:.2f}"
    except Exception as e:   # someone else's module, still changing: report, do not stop the benchmark
        return f"failed ({type(e).__name__}: {str(e)[:40]})"


def section6(b):
    """Time of one guided sampler step (UNet rows = images x (terms + uncond)) and estimated fp16 GPU peaks."""
    rows, first = [], None
    for size, images, terms in ((b.size, 1, 1), (b.big, 1, 1), (b.size, 4, 1), (b.size, 1, 3)):
        x = unet_inputs(b, images, size)[0]
        model = GuidedDenoiser(denoiser(packed(b).unet, b.sd.prediction), b.cond.repeat(terms, 1, 1), b.uncond,
                               [1.0] * terms, cfg=2.0)
        with torch.no_grad():
            s = medians({"": lambda model=model, x=x: model(x, 14.6)}, b.runs)[""]
        first = first or s
        gen = estimate(estimate_generation, resolution=size, config=b.ours) if images == terms == 1 else "-"
        train = estimate(estimate_training, resolution=size, batch=images, config=b.ours) if terms == 1 else "-"
        rows.append([f"{size}², {images} image(s), {terms} AND term(s)", images * (terms + 1), f"{s:.2f} s",
                     f"{s / first:.2f}×", gen, train])
    table(f"6. cost growth: one sampler step with CFG, ours fp32 with packed convs; estimated GPU peak fp16 "
          f"(targets: generation {b.size}² ≤ 3 GB, training ≤ 3.5 GB)", rows,
          ("", "UNet rows", "time", "vs first", "est. GB generation", "est. GB training (TI step)"))


CHILD = """import json, time, torch, minisd, transformers
from diffusers import StableDiffusionPipeline
def status(key):
    return int(next(line.split()[1] for line in open('/proc/self/status') if line.startswith(key))) * 1024
before, start = status('VmRSS:'), time.perf_counter()
model = {load}
seconds = time.perf_counter() - start
# safetensors maps the file: tensors not converted on loading are read from it at first use. Reading every weight
# once makes both sides pay for all bytes.
# Ours keeps the text tower in model.text (minisd.conditioning), diffusers in model.text_encoder.
text = model.text.tower if hasattr(model, 'text') else model.text_encoder
for module in (model.unet, model.vae, text):
    for p in module.parameters():
        p.float().sum()
print(json.dumps({{'seconds': seconds, 'read': time.perf_counter() - start, 'before': before,
                  'peak': status('VmHWM:')}}))"""


def section7(b):
    """Each load in a fresh process: time, and peak RSS (VmHWM, mapped file pages included) above the RSS after
    imports, after every weight was read once."""
    path = b.tmp / "sd2-fp16.safetensors"
    save_file({k: v.half().contiguous() for k, v in state_dict(b.sd).items()}, str(path))
    size = path.stat().st_size
    loads = {"ours": f"minisd.load({str(path)!r}, config={b.ours!r}, dtype=torch.float16)",
             "theirs": f"StableDiffusionPipeline.from_single_file({str(path)!r}, config={str(b.folder)!r}, "
                       "local_files_only=True, torch_dtype=torch.float16, tokenizer=None)"}
    found = {name: [] for name in loads}
    for _ in range(b.runs):   # interleaved; the file is in the page cache after the first load
        for name, load in loads.items():
            out = subprocess.run([sys.executable, "-c", CHILD.format(load=load)], capture_output=True, text=True,
                                 check=True).stdout
            found[name].append(json.loads(out.splitlines()[-1]))
    t = {name: statistics.median(r["seconds"] for r in runs) for name, runs in found.items()}
    read = {name: statistics.median(r["read"] for r in runs) for name, runs in found.items()}
    peak = {name: max(r["peak"] - r["before"] for r in runs) for name, runs in found.items()}
    table(f"7. loading a {size / GB:.2f} GB fp16 file to fp16 (RSS after imports, before loading: "
          f"{found['ours'][0]['before'] / GB:.2f} GB ours, {found['theirs'][0]['before'] / GB:.2f} GB diffusers)",
          [row("time to load", t["ours"], t["theirs"], 1.0),
           row("time to load and read every weight once", read["ours"], read["theirs"], 1.0),
           ["peak RSS above that, / file size", f"{peak['ours'] / size:.2f}×", f"{peak['theirs'] / size:.2f}×",
            f"{peak['ours'] / peak['theirs']:.2f}×", verdict(peak["ours"] / size, 1.25, "× file")]])
    path.unlink()
