"""Sections 4 and 5 of tools/benchmark.py: the fastest CPU path (channels_last, packed convs, bf16 where the CPU
has it natively) and the UNet's achieved FLOP/s against a plain matmul in the same run."""
import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import minisd
from bench_common import CL, autocast, medians, pack_sd, packed, psnr, row, table, txt2img_ours, unet_inputs, verdict
from bench_training import ti_step_ours


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
        sd16 = minisd.load(b.file, config=b.ours, dtype=torch.bfloat16)
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
