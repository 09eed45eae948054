"""Smoke run: every minisd component once, on a tiny randomly initialised model of the SD2 architecture.

    python tools/smoke.py

It needs no download and runs in seconds. It shows that the pipeline runs end to end (tokenizer -> text tower ->
UNet -> VAE decoder); with random weights the numbers mean nothing about image quality.
"""
import time

import torch

import minisd

TINY = {"unet": {"model_channels": 32, "channel_mult": [1, 2, 2, 2], "num_head_channels": 16, "context_dim": 64},
        "vae": {"ch": 32, "ch_mult": [1, 2, 2]},
        "text": {"width": 64, "layers": 4, "heads": 4}}


@torch.no_grad()
def main():
    start = time.perf_counter()
    torch.manual_seed(0)
    sd = minisd.build(minisd.load_config(TINY), device="cpu")   # random weights, labelled as such below
    ids = sd.tokenizer(["chest x-ray, PA view, cardiomegaly", ""])
    context = sd.text_encoder(ids)
    latents = torch.randn(2, 4, 16, 16)
    out = sd.unet(latents, torch.tensor([999.0, 999.0]), context)
    images = sd.vae.decode(out / sd.scale_factor)
    print("tiny RANDOM-weight SD2-architecture model (not a real model)")
    print(f"tokens {tuple(ids.shape)} first ids {ids[0, :6].tolist()}")
    print(f"text {tuple(context.shape)}  unet {tuple(out.shape)}  images {tuple(images.shape)}")
    print(f"all finite: {bool(torch.isfinite(images).all())}  ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
