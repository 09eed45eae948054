"""Speed and memory of medti against diffusers on identical random full-size SD2 weights (issue 5's benchmark).

    python tools/benchmark.py                # full size, ~20 min on 2 cores: run it on an otherwise idle machine
    python tools/benchmark.py --quick        # tiny models, 1 run each: checks that the script works, no meaning
    python tools/benchmark.py --only 1,5 --runs 5

diffusers' UNet/VAE and transformers' CLIPTextModel are built with SD2's configs and random weights, converted to
the official layout by tools/convert_diffusers.py, saved, and loaded back with minisd.load: both sides compute with
the same numbers. A time is the median of --runs calls per side, interleaved (ours, theirs, ours, ...) so that load
drift hits both. Sections: 1 UNet forward, 2 text-to-image, 3 textual-inversion step, 4 fastest CPU path,
5 FLOP/s vs a matmul, 6 cost growth + estimated GPU memory, 7 loading a fp16 file (each load in a fresh process),
8 the study's 2,000-image set, 9 evaluation vs torchmetrics (tools/bench_eval.py), 10 the privacy audit
(tools/bench_audit.py). Sections 9 and 10 need no SD2 models: `--only 9,10` skips building them.
"""
import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

import minisd
from medti import embeddings as emb
from medti.inversion import denoising_loss, enable_checkpointing, initial_vectors
from medti.pipeline import SampleSettings, compile_for_inference, decode, sample
from minisd.load import state_dict
from minisd.packing import pack_convs
from minisd.sampling import GuidedDenoiser, denoiser

TOOLS = Path(__file__).resolve().parent
sys.path[:0] = [str(TOOLS), str(TOOLS.parent / "tests")]
from bench_audit import section10 as audit_time  # noqa: E402
from bench_eval import section9 as evaluation_time  # noqa: E402

from bench_dataset import section8 as dataset_time  # noqa: E402
from conftest import randomize_  # noqa: E402 (tests/ and tools/ are not packages)
from convert_diffusers import PREFIXES as CONVERT_PREFIXES  # noqa: E402
from convert_diffusers import convert_text, convert_unet, convert_vae  # noqa: E402

try:   # tools/memory_estimate.py: fake-tensor estimates of peak GPU memory
    from memory_estimate import estimate_generation, estimate_training
except ImportError:
    estimate_generation = estimate_training = None

# SD2 as diffusers/transformers configure it (stabilityai/stable-diffusion-2-base); block types: the defaults.
FULL = {"unet": dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        "text": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16),
        "ours": "sd2-base", "size": 512, "big": 768}
# --quick: the same architecture shrunk (16-wide heads, a 64-wide text tower with the real vocabulary).
TINY = {"unet": dict(block_out_channels=(32, 64, 64, 64), attention_head_dim=(2, 4, 4, 4), cross_attention_dim=64,
                     use_linear_projection=True),
        "vae": dict(FULL["vae"], block_out_channels=(32, 32, 64, 64)),
        "text": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
        "ours": {"unet": {"model_channels": 32, "channel_mult": [1, 2, 2, 2], "num_head_channels": 16,
                          "context_dim": 64}, "vae": {"ch": 32, "ch_mult": [1, 1, 2, 2]},
                 "text": {"width": 64, "layers": 4, "heads": 4}}, "size": 128, "big": 192}
TOKEN, N_VECTORS, STEPS, GB, CL = "<bench>", 64, 3, 1e9, torch.channels_last

def machine():
    cpu = open("/proc/cpuinfo").read()
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name")), "?")
    flags = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f" {f}" in cpu]
    load = os.getloadavg()[0]
    print(f"# machine: {model} ({' '.join(flags)}), {os.cpu_count()} cores; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, diffusers {diffusers.__version__}; load average {load:.2f}"
          + ("  -- WARNING: machine busy, times unreliable" if load > 0.5 else ""))

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
    if limit is None or value is None:
        return ""
    return f"{'≥' if at_least else '≤'} {limit:g}{unit}: " + \
        ("met" if (value >= limit if at_least else value <= limit) else "NOT met")

def row(what, ours, theirs, limit=None):
    """A timing row: seconds, ratio ours/theirs and the target on that ratio."""
    ratio = ours / theirs if theirs else None
    return [what, f"{ours:.2f} s", f"{theirs:.2f} s" if theirs else "-", f"{ratio:.2f}×" if ratio else "-",
            verdict(ratio, limit)]

def table(title: str, rows: list, header=("", "ours", "diffusers", "ratio", "target (issue 5)")):
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

@contextlib.contextmanager
def checkpointing(sd):
    """medti.inversion.enable_checkpointing (train.py's default) for a while; then the blocks are unwrapped."""
    enable_checkpointing(sd)
    try:
        yield
    finally:
        for blocks in (sd.unet.input_blocks, sd.unet.output_blocks, sd.text.tower.blocks):
            for i, block in enumerate(blocks):
                blocks[i] = block.block
        sd.unet.middle_block = sd.unet.middle_block.block

def euler_a():   # SD2's betas; timestep spacing "linspace", as ours
    return diffusers.EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                     steps_offset=1)

def setup(args, cfg, tmp: Path) -> argparse.Namespace:
    """Random reference models, their official-layout file, ours loaded from it, a diffusers config folder."""
    torch.manual_seed(0)
    refs = {"unet": randomize_(diffusers.UNet2DConditionModel(**cfg["unet"]), 1).requires_grad_(False),
            "vae": randomize_(diffusers.AutoencoderKL(**cfg["vae"]), 2).requires_grad_(False),
            "text": randomize_(CLIPTextModel(CLIPTextConfig(**cfg["text"], hidden_act="gelu")), 3)}
    state = {}
    for name, convert, ref in (("unet", convert_unet, "unet"), ("vae", convert_vae, "vae"),
                               ("text_encoder", convert_text, "text")):
        state |= {CONVERT_PREFIXES[name] + k: v.contiguous() for k, v in convert(refs[ref].state_dict()).items()}
    save_file(state, str(tmp / "sd2.safetensors"))
    del state
    folder = tmp / "diffusers"   # configs only, for from_single_file(config=...)
    refs["unet"].save_config(folder / "unet"), refs["vae"].save_config(folder / "vae")
    refs["text"].config.save_pretrained(folder / "text_encoder"), euler_a().save_config(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"], "tokenizer": [None, None],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index))
    sd = minisd.load(tmp / "sd2.safetensors", config=cfg["ours"])
    with torch.no_grad():
        cond, uncond = sd.text(["chest x-ray, PA view"]), sd.text([""])
    return argparse.Namespace(cfg=cfg, refs=refs, sd=sd, folder=folder, cond=cond, uncond=uncond, tmp=tmp,
                              size=cfg["size"],
                              big=cfg["big"], ours=cfg["ours"], runs=args.runs, results={})

def unet_inputs(b, rows=2, size=None, dtype=torch.float32):
    gen, h = torch.Generator().manual_seed(0), (size or b.size) // 8
    x, context = torch.randn(rows, 4, h, h, generator=gen), torch.randn(rows, 77, b.cond.shape[-1], generator=gen)
    return x.to(dtype), torch.full((rows,), 500.0), context.to(dtype)

def txt2img_ours(sd, b):
    settings = SampleSettings(width=b.size, height=b.size, cfg=2.0, steps=STEPS)
    return decode(sd, sample(sd, b.cond, b.uncond, [1.0], [0], settings))

def ti_step_ours(sd, size):
    """One step of medti/train.py's loop: latents cached once, 64 fp32 vectors in AdamW (checkpointing: caller)."""
    if TOKEN not in sd.text.vectors:
        emb.attach(sd, {TOKEN: emb.Embedding(TOKEN, torch.zeros(N_VECTORS, sd.text.width))})
    vectors = torch.nn.Parameter(initial_vectors(sd, "*", N_VECTORS, 0))
    optimizer = torch.optim.AdamW([vectors], lr=5e-3, weight_decay=0.0)
    with torch.no_grad():
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        latents = sd.vae.encode(image.to(next(sd.vae.parameters()).dtype))[0].float() * sd.scale_factor

    def step():
        optimizer.zero_grad(set_to_none=True)
        t = torch.randint(0, 1000, (1,))
        denoising_loss(sd, TOKEN, vectors, [TOKEN], latents, torch.randn_like(latents), t).backward()
        optimizer.step()
    return step

def ti_step_diffusers(refs, size):
    """diffusers' examples/textual_inversion step: VAE encode every step, DDPM add_noise, fp32 text encoder whose
    whole (resized) token table is in AdamW, all rows but the new token's restored after the step."""
    text, vae, unet = refs["text"], refs["vae"], refs["unet"]
    text.resize_token_embeddings(text.config.vocab_size + 1)   # the placeholder token, as the example adds it
    table = text.requires_grad_(False).get_input_embeddings().weight.requires_grad_(True)
    original, keep = table.detach().clone(), torch.arange(len(table)) != len(table) - 1
    optimizer = torch.optim.AdamW([table], lr=5e-3, weight_decay=1e-2)
    scheduler = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids = torch.tensor([[49406, len(table) - 1, 49407] + [0] * 74])

    def step():
        latents = vae.encode(pixels).latent_dist.sample().detach() * vae.config.scaling_factor
        noise, t = torch.randn_like(latents), torch.randint(0, 1000, (1,))
        prediction = unet(scheduler.add_noise(latents, noise, t), t, text(ids)[0]).sample
        F.mse_loss(prediction.float(), noise.float()).backward()
        optimizer.step(), optimizer.zero_grad()
        with torch.no_grad():
            table[keep] = original[keep]
    return step

KERNELS = ("convolution", "addmm", "aten::mm", "aten::bmm", "scaled_dot_product")

def kernel_seconds(fn) -> tuple:
    """(seconds in conv, matmul and attention kernels, seconds in all ops) of one call: torch.profiler self times."""
    with torch.profiler.profile() as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if any(k in e.key for k in KERNELS)) / 1e6, total / 1e6

def compiled(b):
    """Ours with --compile (medti.pipeline.compile_for_inference), built once; the first calls compile and are
    timed apart: (sd, {what: seconds})."""
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

@torch.no_grad()
def section1(b):
    x, t, context = unet_inputs(b)
    fast, unet = compiled(b)[0], packed(b).unet
    first_call(b, "UNet", lambda: fast.unet(x, t, context))
    m = medians({"plain": lambda: b.sd.unet(x, t, context), "ours": lambda: unet(x, t, context),
                 "compiled": lambda: fast.unet(x, t, context),
                 "theirs": lambda: b.refs["unet"](x, t, encoder_hidden_states=context).sample}, b.runs, warmup=True)
    b.results["unet"] = m["theirs"]
    profiles = {name: kernel_seconds(fn) for name, fn in (("plain", lambda: b.sd.unet(x, t, context)),
                                                          ("ours", lambda: unet(x, t, context)),
                                                          ("theirs", lambda: b.refs["unet"](x, t, context)))}
    (k_plain, _), (k_ours, all_ours), (k_theirs, all_theirs) = profiles.values()
    # one conv of the deepest level alone (full size: 2560 -> 1280 channels on 8x8), where packing gains the most
    conv = b.sd.unet.output_blocks[0][0].in_layers[2]
    y = torch.randn(2, conv.in_channels, b.size // 64, b.size // 64)
    one = pack_convs(torch.nn.Sequential(shared_copy(conv)))
    mc = medians({"packed": lambda: one(y), "plain": lambda: conv(y)}, b.runs, warmup=True)
    table("1. UNet forward, fp32, no grad", [
        row(f"{b.size // 8}² latents, batch 2, conv weights packed (generation's CPU default)", m["ours"],
            m["theirs"], 0.9),
        row("the same, plain nn.Conv2d (--no-pack)", m["plain"], m["theirs"], 0.9),
        row(f"the same, --compile (compiling took {compiled(b)[1]['UNet']:.0f} s once)", m["compiled"],
            m["theirs"], 0.9),
        [f"one {conv.in_channels}->{conv.out_channels} 3x3 conv on {y.shape[-1]}², batch 2: packed vs plain",
         f"{mc['packed']:.3f} s", f"{mc['plain']:.3f} s", f"{mc['packed'] / mc['plain']:.2f}×",
         "plain = diffusers' call"],
        ["profiled, packed: conv/matmul/attention kernels", f"{k_ours:.2f} s", f"{k_theirs:.2f} s",
         f"{k_ours / k_theirs:.2f}×", f"plain nn.Conv2d: {k_plain:.2f} s, the same oneDNN calls as diffusers"],
        ["profiled, packed: everything else (copies, norms, ...)", f"{all_ours - k_ours:.2f} s",
         f"{all_theirs - k_theirs:.2f} s", "", f"without any: {k_ours / all_theirs:.2f}× at best"]])

def section2(b):
    pipe = diffusers.StableDiffusionPipeline(vae=b.refs["vae"], text_encoder=None, tokenizer=None, unet=b.refs["unet"],
                                             scheduler=euler_a(), safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out, fast, sd = {}, compiled(b)[0], packed(b)
    first_call(b, "txt2img", lambda: txt2img_ours(fast, b))
    m = medians({"plain": lambda: out.update(plain=txt2img_ours(b.sd, b)),
                 "ours": lambda: out.update(ours=txt2img_ours(sd, b)),
                 "compiled": lambda: out.update(compiled=txt2img_ours(fast, b)),
                 "theirs": lambda: out.update(theirs=pipe(
                     prompt_embeds=b.cond, negative_prompt_embeds=b.uncond, guidance_scale=2.0, width=b.size,
                     height=b.size, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                     output_type="pt").images * 2 - 1)}, b.runs)
    b.results |= {"txt2img": m["theirs"], "image": out["plain"]}
    table(f"2. text-to-image {b.size}², CFG 2, {STEPS} Euler-a steps + VAE decode, fp32 (same images? PSNR vs "
          f"diffusers: packed {psnr(out['ours'], out['theirs']):.0f} dB, plain {psnr(out['plain'], out['theirs']):.0f}"
          f" dB, compiled {psnr(out['compiled'], out['theirs']):.0f} dB)", [
                   row("conv weights packed (generation's CPU default)", m["ours"], m["theirs"], 0.85),
                   row("plain nn.Conv2d (--no-pack)", m["plain"], m["theirs"], 0.85),
                   row(f"--compile (first call, compiling the decoder too: {compiled(b)[1]['txt2img']:.0f} s)",
                       m["compiled"], m["theirs"], 0.85)])

def ti_flops(b) -> tuple:
    """FLOPs of one TI step each way, counted on meta tensors: text tower and UNet forward + backward to the
    token vectors (ours); the same plus the example's VAE encode (diffusers). Their ratio is the time ratio at
    equal FLOP/s -- the floor that a faster implementation of the same kernels cannot go below."""
    sd, h = minisd.build(minisd.load_config(b.ours)), b.size // 8
    for module in (sd.unet, sd.text.tower):
        module.requires_grad_(False)
    with torch.device("meta"):
        tokens = torch.zeros(1, 77, sd.text.width, requires_grad=True)   # the spliced embeddings
        latents, t = torch.zeros(1, 4, h, h), torch.tensor([500.0])
        with FlopCounterMode(display=False) as ours:
            F.mse_loss(sd.unet(latents, t, sd.text.tower.forward_embeddings(tokens)), latents).backward()
        unet = diffusers.UNet2DConditionModel(**b.cfg["unet"]).requires_grad_(False)
        vae = diffusers.AutoencoderKL(**b.cfg["vae"]).requires_grad_(False)
        text = CLIPTextModel(CLIPTextConfig(**b.cfg["text"], hidden_act="gelu")).requires_grad_(False)
        text.get_input_embeddings().weight.requires_grad_(True)
        with FlopCounterMode(display=False) as theirs:
            latents = vae.encode(torch.zeros(1, 3, b.size, b.size)).latent_dist.sample()
            context = text(torch.zeros(1, 77, dtype=torch.long))[0]
            F.mse_loss(unet(latents, t, encoder_hidden_states=context).sample, latents).backward()
    return ours.get_total_flops(), theirs.get_total_flops()

def section3(b):
    ours = ti_step_ours(b.sd, b.size)

    def checkpointed():
        with checkpointing(b.sd):
            ours()
    m = medians({"on": checkpointed, "off": ours, "theirs": ti_step_diffusers(b.refs, b.size)}, b.runs)
    b.results["ti"] = m["theirs"]
    flops, flops_theirs = ti_flops(b)
    table(f"3. one textual-inversion step at {b.size}², fp32 (diffusers: the example's defaults, no checkpointing)",
          [row("ours, checkpointing on (the default with CUDA)", m["on"], m["theirs"], 0.5),
           row("ours, checkpointing off (the default on the CPU)", m["off"], m["theirs"], 0.5),
           ["TFLOP per step (counted; ratio = floor at equal FLOP/s)", f"{flops / 1e12:.2f}",
            f"{flops_theirs / 1e12:.2f}", f"{flops / flops_theirs:.2f}×", ""]])

def bf16_speedup() -> float:
    """fp32 time / bf16 time of a 512² matmul. bf16 pays only with hardware support (AMX, AVX512-BF16); emulated
    (AVX2 only) it is far slower than fp32."""
    a32 = torch.randn(512, 512)
    a16 = a32.bfloat16()
    m = medians({"fp32": lambda: a32 @ a32, "bf16": lambda: a16 @ a16}, 3, warmup=True)
    return m["fp32"] / m["bf16"]

def cl_copy(module):
    return copy.deepcopy(module).to(memory_format=CL)

def section4(b):
    """UNet variants (channels_last, packed convs; where bf16 is fast, bf16 autocast and weights); the fastest then
    runs text-to-image, the fastest differentiable one (packed convs have no backward) a TI step. Ratios against
    diffusers fp32 (sections 1-3)."""
    def channels_last(sd):
        return dataclasses.replace(sd, unet=cl_copy(sd.unet), vae=cl_copy(sd.vae))
    sd32 = b.sd
    variants = {"fp32": (sd32, False), "fp32, channels_last": (channels_last(sd32), False),
                "fp32, packed convs": (packed(b), False)}   # name -> (model, bf16 autocast)
    if b.bf16:
        sd16 = minisd.load(b.tmp / "sd2.safetensors", config=b.ours, dtype=torch.bfloat16)
        variants |= {"fp32 weights, bf16 autocast": (sd32, True), "bf16 weights": (sd16, False),
                     "bf16 weights, channels_last": (channels_last(sd16), False),
                     "bf16 weights, packed convs": (pack_sd(sd16), False)}

    @torch.no_grad()
    def forward(sd, cast):
        with autocast(cast):
            sd.unet(*unet_inputs(b, dtype=next(sd.unet.parameters()).dtype))
    m = medians({name: lambda v=v: forward(*v) for name, v in variants.items()}, b.runs, warmup=True)
    rows = [row(f"UNet forward: {name}", s, b.results.get("unet")) for name, s in m.items()]
    best, best_ti = min(m, key=m.get), min((n for n in m if "packed" not in n), key=m.get)
    (fast, cast), (fast_ti, cast_ti) = variants[best], variants[best_ti]
    fast_ti.embeddings = getattr(sd32, "embeddings", {})
    image32 = b.results["image"] if "image" in b.results else txt2img_ours(sd32, b)
    out, step = {}, ti_step_ours(fast_ti, b.size)

    def txt2img():
        with autocast(cast):
            out.update(image=txt2img_ours(fast, b))

    def ti():
        with autocast(cast_ti):
            step()
    m = medians({"txt2img": txt2img, "ti": ti}, b.runs)
    table("4. fastest CPU path" + ("" if b.bf16 else " (bf16 skipped: slower than fp32 on this CPU)"), rows + [
        row(f"text-to-image ({best}; PSNR {psnr(out['image'], image32):.1f} dB vs our plain fp32, 30 wanted)",
            m["txt2img"], b.results.get("txt2img"), 0.33),
        row(f"textual-inversion step ({best_ti})", m["ti"], b.results.get("ti"))])
    if b.bf16:
        kernels(b, sd32, sd16)

@torch.no_grad()
def kernels(b, sd32, sd16):
    """Why bf16 gains less than its matmul speed-up: the parts of text-to-image timed in fp32 and in bf16."""
    n, h = 2048, b.size // 8
    a, q, z = torch.randn(n, n), torch.randn(2, 5, h * h, 64), torch.randn(1, 4, h, h)
    vae32, vae16 = cl_copy(sd32.vae), cl_copy(sd16.vae)
    fns = {("2048² matmul", "fp32"): lambda: a @ a, ("2048² matmul", "bf16"): lambda: a16 @ a16,
           (f"attention, {h * h} tokens, 5 heads of 64", "fp32"): lambda: F.scaled_dot_product_attention(q, q, q),
           (f"attention, {h * h} tokens, 5 heads of 64", "bf16"): lambda: F.scaled_dot_product_attention(q16, q16, q16),
           (f"VAE decode {b.size}², channels_last", "fp32"): lambda: vae32.decode(z),
           (f"VAE decode {b.size}², channels_last", "bf16"): lambda: vae16.decode(z.bfloat16())}
    a16, q16 = a.bfloat16(), q.bfloat16()
    m = medians(fns, b.runs, warmup=True)
    names = list(dict.fromkeys(name for name, _ in fns))
    table("4b. the same work in fp32 and bf16 (ours): matmuls gain the most, the CPU attention kernel the least",
          [[name, f"{m[name, 'fp32']:.3f} s", f"{m[name, 'bf16']:.3f} s", f"{m[name, 'bf16'] / m[name, 'fp32']:.2f}×"]
           for name in names], ("", "fp32", "bf16", "bf16 / fp32"))

@torch.no_grad()
def section5(b):
    """UNet FLOPs counted once on meta tensors (the CPU SDPA kernel counts 0 on real ones: FACTS.md)."""
    with FlopCounterMode(display=False) as counter:
        minisd.build(minisd.load_config(b.ours)).unet(*(v.to("meta") for v in unet_inputs(b)))
    flops, x, t, context = counter.get_total_flops(), *unet_inputs(b)
    sizes = {2048: 10, 4096: 2}   # matrix size: products per timed call (~1 s each at 200 GFLOP/s)
    mats = {n: torch.randn(n, n) for n in sizes}
    products = {n: lambda n=n, k=k: [mats[n] @ mats[n] for _ in range(k)] for n, k in sizes.items()}
    m = medians({"unet": lambda: b.sd.unet(x, t, context)} | products, b.runs, warmup=True)
    unet = flops / m["unet"]
    best = max(sizes, key=lambda n: sizes[n] * 2 * n ** 3 / m[n])
    matmul = sizes[best] * 2 * best ** 3 / m[best]
    rows = [["fp32: UNet vs matmul", f"{unet / 1e9:.0f}", f"{matmul / 1e9:.0f}", f"{unet / matmul:.0%}",
             verdict(100 * unet / matmul, 60, " %", at_least=True)]]
    table(f"5. achieved FLOP/s: UNet forward, batch 2 ({flops / 1e9:.0f} GFLOP counted) vs the faster of a 2048² "
          f"and a 4096² matmul ({best}²)", rows, ("", "UNet GFLOP/s", "matmul GFLOP/s", "% of matmul", "target"))

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
for name in ('unet', 'vae', 'text_encoder'):
    for p in getattr(model, name).parameters():
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

def evaluation_and_audit(args, sections, tmp: Path):
    if 9 in sections:
        evaluation_time(args.runs, table, verdict, tmp, n_images=16 if args.quick else 64)
    if 10 in sections:
        audit_time(args.runs, table, quick=args.quick)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models, 1 run each: checks the script, no meaning")
    p.add_argument("--only", default="1,2,3,4,5,6,7,8,9,10", help="comma-separated section numbers")
    p.add_argument("--runs", type=int, default=0, help="timed runs per side (median); default 3, 1 with --quick")
    args = p.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    sections = sorted(int(s) for s in args.only.split(","))
    machine()
    print(f"# {'TINY models (--quick): checks the script only' if args.quick else 'full-size SD2, random weights'}"
          f"; median of {args.runs} interleaved run(s); sections {sections}")
    with tempfile.TemporaryDirectory(prefix="medti-bench-") as tmp:
        if not any(n <= 8 for n in sections):   # evaluation and audit only: no SD2 models to build
            evaluation_and_audit(args, sections, Path(tmp))
            return
        b = setup(args, TINY if args.quick else FULL, Path(tmp))
        speedup = bf16_speedup()
        b.bf16 = speedup > 1
        print(f"# bf16 512² matmul {speedup:.3g}x the speed of fp32 on this CPU: bf16 variants "
              f"{'measured' if b.bf16 else 'skipped (emulated; a full-size bf16 UNet forward would take hours)'}")
        functions = {1: section1, 2: section2, 3: section3, 4: section4, 5: section5, 6: section6, 7: section7,
                     8: lambda b: dataset_time(b, packed(b), table),
                     9: lambda b: evaluation_and_audit(args, [9], b.tmp),
                     10: lambda b: evaluation_and_audit(args, [10], b.tmp)}
        for n in sorted(sections, key=lambda n: n == 4):   # 4 frees diffusers' models: run it after the others
            if n == 4:   # diffusers is done with: free its models before copies of ours are made
                b.refs = None
                gc.collect()
            functions[n](b)
            sys.stdout.flush()

if __name__ == "__main__":
    main()
