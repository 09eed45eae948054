"""The figures that need a GPU, ours and diffusers side by side on identical random full-size SD2 weights.

    python tools/gpu_check.py --json gpu-figures.json      # one CUDA GPU, full size: a few minutes (< 8 on an H200)
    python tools/gpu_check.py --model sd15                 # the same for SD1's networks (sd15's configuration)
    python tools/gpu_check.py --tiny --device cpu          # tiny random models on any device: checks the script only
    python tools/gpu_check.py --condition dinov2           # image-conditioned: a training step and a variation (SD1)

What it measures (fp16 on CUDA, the training and generation default there):
  1. peak GPU memory of one textual-inversion step at 512², gradient checkpointing on: torch.cuda's
     max_memory_allocated (live tensors) and max_memory_reserved (what the caching allocator holds), next to
     tools/memory_estimate.py's fake-tensor estimate of the same step (live tensor bytes, so comparable with
     "allocated"; neither includes the CUDA context);
  2. textual-inversion steps per second (ours: medti's step; diffusers: its examples/textual_inversion recipe);
  3. text-to-image images per second at 512², 25 Euler-a steps, CFG, VAE decode included, batch 1 and 4;
  4. fp16 sanity: no NaN/inf in latents or decoded images with the `sd21` configuration (attention upcast to fp32);
     with --model sd15, SD1 as it runs (no upcast; SD1 has no such problem, the check shows it).
With --condition dinov2 it measures instead, on SD1's networks with a DINOv2 ViT-B/14 reg4 (DiNO-Diffusion's shapes),
one image-conditioned training step (time, peak memory) and one variation, ours against train_text_to_image.py
with image embeddings and StableDiffusionPipeline(prompt_embeds=tokens): tools/gpu_image.py says how.
The models are tools/bench_models.py's (diffusers/transformers modules with random weights, converted to the official
layout and loaded back by minisd.load), so both sides compute with the same numbers.
Random weights give meaningless images; speed and memory do not depend on the values.
"""
import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent
TOKEN, N_VECTORS, GIB = "<gpu-check>", 64, 2 ** 30
STARTED = [time.perf_counter()]   # when main() began: progress lines say the time since
# --model -> tools/bench_models.py's MODELS name (+ "-tiny" with --tiny)
MODELS = {"sd2-base": "sd2", "sd15": "sd1"}


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def say(text: str):
    """A progress line on stderr as each figure is measured (the table comes at the end, on stdout): the full check
    takes minutes, and a silent one looks hung."""
    print(f"[{time.perf_counter() - STARTED[0]:4.0f} s] {text}", file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device, runs: int) -> float:
    """Median wall time of `runs` calls after one warm-up call (cuDNN/cuBLAS pick their kernels on the first)."""
    fn()
    times = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(fn, device) -> dict:
    """Peak allocated and reserved GiB during one call (after a warm-up call), or "n/a" without CUDA."""
    if device.type != "cuda":
        return {"allocated_gib": "n/a (no CUDA)", "reserved_gib": "n/a (no CUDA)"}
    fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return {"allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


def estimated(fn, **kwargs):
    """tools/memory_estimate.py's total in GiB; its failure is reported, not fatal (it runs other people's code
    on fake tensors, and a change there should not cost the GPU figures)."""
    try:
        return fn(**kwargs)["total"] / GIB
    except Exception as e:
        return f"failed ({type(e).__name__}: {str(e)[:60]})"


def ours_ti_step(sd, size: int, device):
    """One step of medti's training loop: cached latents (the VAE leaves the device, as medti/training/trainer.py does),
    64 fp32 vectors in AdamW, fp16 weights with a grad scaler, gradient checkpointing."""
    from medti.files import embedding_file as emb
    from medti.training.objective import denoising_loss, initial_vectors
    from medti.training.optim import enable_checkpointing
    enable_checkpointing(sd)
    emb.attach(sd, {TOKEN: emb.Embedding(TOKEN, torch.zeros(N_VECTORS, sd.text.width))})
    vectors = torch.nn.Parameter(initial_vectors(sd, "*", N_VECTORS, 0).to(device))
    optimizer = torch.optim.AdamW([vectors], lr=5e-3, weight_decay=0.0)
    dtype = next(sd.unet.parameters()).dtype
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    with torch.no_grad():
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        latents = sd.vae.encode(image.to(device, dtype))[0].float() * sd.scale_factor
    sd.vae.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()

    def step():
        optimizer.zero_grad(set_to_none=True)
        t = torch.randint(0, 1000, (1,), device=device)
        loss = denoising_loss(sd, TOKEN, vectors, [TOKEN], latents, torch.randn_like(latents), t)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def ours_txt2img(sd, cond, uncond, batch: int, size: int, steps: int):
    """What `python -m medti.generate` runs: medti.generation.pipeline.sample (Euler a, CFG 2), then the VAE decode."""
    from medti.generation.pipeline import SampleSettings, decode, sample
    settings = SampleSettings(width=size, height=size, steps=steps, cfg=2.0)
    return lambda: decode(sd, sample(sd, cond, uncond, [1.0], list(range(batch)), settings))


def finite_ours(sd, cond, uncond, size: int, steps: int) -> bool:
    """No NaN/inf in the final latents and in the VAE decode in the model's own dtype (medti.generation.pipeline.decode
    would hide an overflow by redoing it in fp32)."""
    from medti.generation.pipeline import SampleSettings, sample
    latents = sample(sd, cond, uncond, [1.0], [0], SampleSettings(width=size, height=size, steps=steps))
    with torch.no_grad():
        images = sd.vae.decode(latents / sd.scale_factor)
    return bool(torch.isfinite(latents).all() and torch.isfinite(images).all())


def sanity_ours(b, sd, load: dict, cond, uncond, steps: int) -> dict:
    """SD2: with the sd21 configuration (v, attention upcast to fp32) and without the upcast. SD1 (no sd21):
    as it is configured."""
    import minisd
    if b.model.startswith("sd1"):
        return {"sd15": finite_ours(sd, cond, uncond, b.size, steps)}
    upcast = {**(b.ours if isinstance(b.ours, dict) else {}), "prediction": "v",
              "unet": {**(b.ours.get("unet", {}) if isinstance(b.ours, dict) else {}), "upcast_attention": True}}
    sd21 = minisd.load(b.file, **{**load, "config": upcast})
    return {"sd21 (upcast)": finite_ours(sd21, cond, uncond, b.size, steps),
            "sd2 (no upcast)": finite_ours(sd, cond, uncond, b.size, steps)}


def measure_ours(b, args, device, dtype) -> dict:
    import minisd
    from memory_estimate import estimate_training
    load = {"config": b.ours, "dtype": dtype, "device": device}
    sd = minisd.load(b.file, **load)
    cond, uncond = b.cond.to(device, dtype), b.uncond.to(device, dtype)
    out = {"txt2img_images_per_s": {}}
    for batch in (1, 4):
        fn = ours_txt2img(sd, cond, uncond, batch, b.size, args.steps)
        out["txt2img_images_per_s"][f"batch {batch}"] = batch / seconds(fn, device, args.runs)
        say(f"ours: text-to-image, batch {batch}: {figure(out['txt2img_images_per_s'][f'batch {batch}'])} images/s")
    out["fp16_sanity_no_nan"] = sanity_ours(b, sd, load, cond, uncond, args.steps)
    say(f"ours: no NaN/inf: {out['fp16_sanity_no_nan']}")
    step = ours_ti_step(sd, b.size, device)
    out["ti_step_peak"] = peak_memory(step, device)
    out["ti_step_peak"]["estimated_gib"] = estimated(estimate_training, resolution=b.size, batch=1,
                                                     checkpointing=True, config=b.ours)
    out["ti_steps_per_s"] = 1 / seconds(step, device, args.runs)
    say(f"ours: textual-inversion step: {figure(out['ti_steps_per_s'])} steps/s")
    return out


def measure_diffusers(b, args, device, dtype) -> dict:
    from diffusers.models.attention_processor import Attention
    from gpu_diffusers import diffusers_pipe, diffusers_ti_step, diffusers_txt2img

    import minisd
    from memory_estimate import estimate_diffusers_recipe
    refs = {name: m.to(device, dtype) for name, m in b.refs.items()}
    cond, uncond = b.cond.to(device, dtype), b.uncond.to(device, dtype)
    pipe, out = diffusers_pipe(refs), {"txt2img_images_per_s": {}}
    for batch in (1, 4):
        fn = diffusers_txt2img(pipe, cond, uncond, batch, b.size, args.steps)
        out["txt2img_images_per_s"][f"batch {batch}"] = batch / seconds(fn, device, args.runs)
        say(f"diffusers: text-to-image, batch {batch}: {figure(out['txt2img_images_per_s'][f'batch {batch}'])} "
            "images/s")
    sd1 = b.model.startswith("sd1")
    attention = [m for m in refs["unet"].modules() if isinstance(m, Attention)]
    for m in attention:   # what diffusers' SD2.1 config sets (upcast_attention: true); SD1 runs as it is
        m.upcast_attention = not sd1
    images = diffusers_txt2img(diffusers_pipe(refs, "epsilon" if sd1 else "v_prediction"), cond, uncond, 1, b.size,
                               args.steps)()
    out["fp16_sanity_no_nan"] = {"sd15" if sd1 else "sd21 (upcast)": bool(torch.isfinite(images).all())}
    say(f"diffusers: no NaN/inf: {out['fp16_sanity_no_nan']}")
    for m in attention:
        m.upcast_attention = False
    step = diffusers_ti_step(refs, b.size, device, dtype, minisd.load_config(b.ours).text.pad_id)
    out["ti_step_peak"] = peak_memory(step, device)
    out["ti_step_peak"]["estimated_gib"] = estimated(estimate_diffusers_recipe, resolution=b.size, batch=1,
                                                     checkpointing=True, config=b.ours)
    out["ti_steps_per_s"] = 1 / seconds(step, device, args.runs)
    say(f"diffusers: textual-inversion step: {figure(out['ti_steps_per_s'])} steps/s")
    return out


def figure(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def report(results: dict):
    """The figures side by side, one line each."""
    ours, theirs = results["ours"], results["diffusers"]
    rows = [(f"TI step peak, {k.replace('_gib', '')} (GiB)", ours["ti_step_peak"][k], theirs["ti_step_peak"][k])
            for k in ("allocated_gib", "reserved_gib", "estimated_gib")]
    rows += [("TI steps/s", ours["ti_steps_per_s"], theirs["ti_steps_per_s"])]
    rows += [(f"txt2img images/s, {k}", ours["txt2img_images_per_s"][k], theirs["txt2img_images_per_s"][k])
             for k in ours["txt2img_images_per_s"]]
    rows += [(f"no NaN/inf, {k}", ours["fp16_sanity_no_nan"][k], theirs["fp16_sanity_no_nan"].get(k, "-"))
             for k in ours["fp16_sanity_no_nan"]]
    print(f"# {results['device']}, {results['dtype']}, {results['size']}², {results['steps']} steps, "
          f"torch {results['torch']}, {results['mode']}")
    print(f"{'':<34} {'ours':>22} {'diffusers':>22}")
    for name, a, b in rows:
        print(f"{name:<34} {figure(a):>22} {figure(b):>22}")


def measure_text(args, device, dtype, tmp: Path) -> dict:
    """Textual inversion and text-to-image: both sides' figures, ours first, freed before diffusers' peak is taken."""
    from bench_models import setup  # diffusers, transformers and the identical-weights setup: after the checks
    b = setup(argparse.Namespace(runs=args.runs), MODELS[args.model] + ("-tiny" if args.tiny else ""), tmp)
    b.sd = None   # the fp32 CPU copy setup() made: only its prompt embeddings are needed
    results = {"size": b.size, "ours": measure_ours(b, args, device, dtype)}
    gc.collect()   # our models are unreachable now; free their GPU memory before diffusers' peak is taken
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results["diffusers"] = measure_diffusers(b, args, device, dtype)
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random models on any device: checks the script only")
    p.add_argument("--model", default=None, choices=tuple(MODELS),
                   help="whose networks: SD2 (default) or SD1 (sd15); random weights either way")
    p.add_argument("--condition", default="", choices=("", "dinov2"),
                   help="dinov2: the image-conditioned figures instead (a training step and a variation; SD1 with a "
                        "DINOv2 ViT-B/14 reg4, DiNO-Diffusion's shapes)")
    p.add_argument("--device", default=None, help="default: cuda (required without --tiny)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps per image (default 25)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per figure, median (default 3)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    STARTED[0] = time.perf_counter()
    if args.condition and args.model not in (None, "sd15"):
        return fail(f"--model {args.model}: --condition {args.condition} measures SD1's networks (the paper's "
                    "model); leave out --model, or give --model sd15")
    args.model = args.model or ("sd15" if args.condition else "sd2-base")
    cuda = torch.cuda.is_available()
    if not args.tiny and not cuda:
        return fail("no CUDA GPU is visible to torch here; run on a GPU machine, or use --tiny to check the script")
    device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    if device.type == "cuda" and not cuda:
        return fail(f"--device {args.device}: no CUDA GPU is visible to torch here")
    if args.json and not args.json.parent.is_dir():
        return fail(f"--json {args.json}: the folder {args.json.parent} does not exist")
    sys.path[:0] = [str(TOOLS), str(TOOLS.parent / "tests")]   # tools/ and tests/ (conftest) are not packages
    what = f"image-conditioned ({args.condition}) {args.model}" if args.condition else args.model
    say(f"building {'tiny' if args.tiny else 'full-size'} {what} models with random weights (diffusers', "
        f"converted and loaded by ours) on {device}; {args.runs} timed run(s) per figure, {args.steps} steps")
    from minisd.config import default_dtype
    dtype = default_dtype(device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
               "dtype": str(dtype).replace("torch.", ""), "steps": args.steps, "torch": torch.__version__,
               "mode": "tiny models (checks the script only)" if args.tiny else f"full-size {what}, random weights"}
    with tempfile.TemporaryDirectory(prefix="medti-gpu-check-") as tmp:
        if args.condition:
            import gpu_image
            results |= gpu_image.measure(args, device, dtype, Path(tmp))
        else:
            results |= measure_text(args, device, dtype, Path(tmp))
    (gpu_image.report if args.condition else report)(results)
    if args.json:
        from medti.files.atomic import write_atomic
        write_atomic(args.json, json.dumps(results, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
