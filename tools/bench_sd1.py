"""Section 11 of tools/benchmark.py: SD1 (the `sd15` preset's networks) against diffusers/transformers on
identical random weights: the UNet forward (8 heads, 1x1-conv projections, 768-wide context) and the OpenAI CLIP
text tower (12 quick_gelu layers of 768), each with the largest difference between the two outputs as a check
that both sides computed the same thing.

The models are tools/bench_models.py's "sd1" ("sd1-tiny" with --quick), built apart from the SD2 ones of sections
1-8: the SD2 models are freed first, so the two never share the machine's memory.
"""
import torch

from bench_common import medians, packed, row, table, unet_inputs
from bench_models import setup

PROMPTS = ["chest x-ray, PA view, cardiomegaly", ""]   # a guided call's two rows: prompt and unconditional
TEXT_CALLS = 10   # text-tower calls per timed run: one takes ~0.1 s, too short to time alone on a shared VM


def largest_difference(a, b) -> str:
    """max |a - b| relative to max |b|: a few 1e-6 in fp32 when both sides run the same maths."""
    return f"max |ours - ref| / max |ref| = {((a - b).abs().max() / b.abs().max()).item():.1e}"


@torch.no_grad()
def unet_rows(b) -> list:
    x, t, context = unet_inputs(b)
    ours, plain, ref = packed(b).unet, b.sd.unet, b.refs["unet"]
    m = medians({"ours": lambda: ours(x, t, context), "plain": lambda: plain(x, t, context),
                 "theirs": lambda: ref(x, t, encoder_hidden_states=context).sample}, b.runs, warmup=True)
    check = largest_difference(plain(x, t, context), ref(x, t, encoder_hidden_states=context).sample)
    latent = b.size // b.sd.config.latent_factor
    return [row(f"UNet forward, {latent}² latents, batch 2, packed convs (generation's CPU default)", m["ours"],
                m["theirs"]),
            row(f"the same, plain nn.Conv2d; {check}", m["plain"], m["theirs"])]


@torch.no_grad()
def text_rows(b) -> list:
    ids = b.sd.text.tokenizer(PROMPTS)   # [2, 77], SD1's padding (the end token)
    tower, ref = b.sd.text.tower, b.refs["text"].eval()

    def repeat(fn):
        return lambda: [fn() for _ in range(TEXT_CALLS)]
    m = medians({"ours": repeat(lambda: tower(ids)), "theirs": repeat(lambda: ref(ids)[0])}, b.runs, warmup=True)
    # SD1 conditions on the last layer after final_layer_norm: transformers' last_hidden_state
    check = largest_difference(tower(ids), ref(ids)[0])
    cfg = b.sd.config.text
    ours, theirs = m["ours"] / TEXT_CALLS, m["theirs"] / TEXT_CALLS   # milliseconds: one call is short
    return [[f"text tower, {cfg.num_hidden_layers} layers of {cfg.width}, batch 2 x 77 tokens, per call (median of "
             f"runs of {TEXT_CALLS}); {check}", f"{ours * 1e3:.1f} ms", f"{theirs * 1e3:.1f} ms",
             f"{ours / theirs:.2f}×", ""]]


def section11(args, tmp, quick: bool):
    """Build the SD1 models (a minute or two at full size), time both parts, print one table."""
    b = setup(args, "sd1-tiny" if quick else "sd1", tmp)
    rows = unet_rows(b) + text_rows(b)
    table(f"11. SD1 ({'tiny' if quick else 'sd15'} configuration, random weights), fp32, no grad: ours against "
          "diffusers' UNet2DConditionModel and transformers' CLIPTextModel (quick_gelu)", rows,
          ("", "ours", "diffusers/transformers", "ratio", ""))
