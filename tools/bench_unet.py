"""Sections 1 and 2 of tools/benchmark.py: the UNet forward and text-to-image, ours (packed convs, plain,
torch.compile) against diffusers on the same random weights."""
import diffusers
import torch

from bench_common import (
    STEPS,
    compiled,
    first_call,
    medians,
    packed,
    psnr,
    row,
    shared_copy,
    table,
    txt2img_ours,
    unet_inputs,
)
from bench_models import euler_a
from minisd.packing import pack_convs

KERNELS = ("convolution", "addmm", "aten::mm", "aten::bmm", "scaled_dot_product")


def kernel_seconds(fn) -> tuple:
    """(seconds in conv, matmul and attention kernels, seconds in all ops) of one call: torch.profiler self times."""
    with torch.profiler.profile() as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if any(k in e.key for k in KERNELS)) / 1e6, total / 1e6

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
