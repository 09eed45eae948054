"""ESTIMATED peak GPU memory of one LoRA or full-UNet training step: tools/memory_estimate.py --method lora|unet.

The same machinery as the textual-inversion estimate (tools/memory_common.py: fake tensors, live storage bytes),
on the code that trains: the model is built on the meta device in the run's dtype, medti.training.methods builds the
method on it exactly as `python -m medti.train --method lora|unet` does (LoRA adapters in fp32 on the fp16 base; or the
trained UNet weights cast to fp32 masters in the model), then every tensor becomes a fake one with its dtype and
requires_grad kept, and one step runs: medti.training.objective.diffusion_loss under the method's autocast
(medti.training.optim.precision), backward, AdamW past its first step (both moments allocated; medti's fused AdamW, or
with --foreach torch's CUDA default). --ema adds the method's one fp32 copy of what trains. The VAE stays off the device
(latents are cached, as for TI).

Why fp16 autocast can be estimated on the fake "cpu" device: CPU autocast accepts float16 (it does in torch 2.14,
used here), and fp16 and bf16 have the same byte sizes, so the estimate would be the same in bf16.
"""
import torch

import minisd
from medti.training import methods
from medti.training.config import TrainConfig
from medti.training.objective import diffusion_loss
from medti.training.optim import enable_checkpointing, precision
from memory_common import DEVICE, GB, adamw, fake_device, model_config, on_device, report, training_step

PROMPT = "a chest x-ray of sks"   # the instance prompt: its length does not change the 77-token conditioning
EMA_DECAY = 0.9999                # --ema: any decay in (0, 1) keeps the same one copy
LIMITS = {"lora": {"required": 8 * GB, "target": 4 * GB},
          "unet": {"one 8 GB GPU": 8 * GB, "one 24 GB GPU": 24 * GB}}
LABELS = {"frozen": "frozen weights (run dtype)", "trained": "trained weights (fp32)",
          "optimizer": "AdamW state (2 fp32 moments per trained weight)", "ema": "EMA copy (fp32)",
          "inputs": "inputs on the device", "saved_for_backward": "saved for backward, after the forward",
          "gradient": "gradients (fp32), at the end of backward",
          "activations": "fwd/bwd peak minus the rest (activations, gradients)",
          "backward_peak": "PEAK of forward + backward", "optimizer_peak": "PEAK of the AdamW step"}


def method_model(method: str, config, dtype, trainable="all", rank=4, ema=False):
    """The meta-built model with `method` (medti.training.methods) applied as medti.train applies it: (sd, method)."""
    cfg = model_config(config)
    if cfg.inpainting:   # medti's training feeds the UNet 4-channel latents
        raise ValueError(f"--method {method} trains a 4-channel model, not the 9-channel inpainting UNet")
    sd = minisd.build(cfg, device="meta")
    for module in (sd.unet, sd.text.tower, sd.vae):   # what minisd.load(dtype=...) hands the trainer
        module.to(dtype)
    train = TrainConfig(method=method, instance_prompt=PROMPT, rank=rank, trainable=trainable,
                        ema=EMA_DECAY if ema else 0.0)
    return sd, methods.make(sd, train, [PROMPT], torch.device("meta"))


def materialise_as_built(module):
    """Meta module -> fake tensors on DEVICE with each tensor's own dtype and requires_grad: the method decided
    them (fp32 adapters or masters, the frozen rest in the run dtype)."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, torch.nn.Parameter(torch.zeros_like(p, device=DEVICE), p.requires_grad))
        for name, b in list(sub.named_buffers(recurse=False)):
            sub._buffers[name] = torch.zeros_like(b, device=DEVICE)


def nbytes(tensors) -> int:
    return sum(t.nbytes for t in tensors)


def estimate_method(method: str, resolution=512, batch=1, checkpointing=True, dtype=torch.float16,
                    config="sd2-base", trainable="all", ema=False, rank=4, foreach=False) -> dict:
    """Bytes per category (LABELS' keys, "total" the peak) of one step of medti's loop for --method lora|unet."""
    sd, m = method_model(method, config, dtype, trainable, rank, ema)
    h = resolution // sd.config.latent_factor
    with fake_device() as mem:
        materialise_as_built(sd.unet), materialise_as_built(sd.text.tower)
        params = [p for model in (sd.unet, sd.text.tower) for p in model.parameters() if p.requires_grad]
        assert len(params) == len(m.params), "the fake model trains other tensors than the method does"
        parts = {"trained": nbytes(params), "frozen": mem.now - nbytes(params)}
        optimizer = adamw(params, foreach)
        parts["optimizer"] = mem.now - parts["trained"] - parts["frozen"]
        copies = [p.detach().clone() for p in params] if m.buffers else []   # UNetFineTune's buffers["ema.*"]
        assert len(copies) == len(m.buffers), "the EMA holds other tensors than the method's"
        parts["ema"] = nbytes(copies)
        if checkpointing:   # after the method, as medti.training.trainer.setup does
            enable_checkpointing(sd)
        before = mem.now
        latents, noise = on_device(batch, 4, h, h), on_device(batch, 4, h, h)
        t = torch.randint(0, 1000, (batch,))
        parts["inputs"] = mem.now - before

        def loss_fn():
            with precision(m, torch.device(DEVICE)):
                return diffusion_loss(sd, m.context([PROMPT] * batch), latents, noise, t)
        base = mem.now
        parts |= training_step(mem, loss_fn, params, optimizer)
    # training_step's total is the larger of the two; with foreach AdamW (--foreach) a whole-UNet step peaks in the
    # optimizer: its foreach ops make temporaries as large as all trained weights together
    parts["backward_peak"] = base + parts["activations"]
    parts["optimizer_peak"] = mem.peak
    parts["parameters"] = sum(p.numel() for p in params)
    return parts


def describe_method(args, parts: dict, width: int) -> str:
    """The title of a method's report."""
    n = f"{parts['parameters'] / 1e6:,.1f} M"
    if args.method == "lora":
        return (f"medti --method lora: fp16 base (UNet + text tower), rank-{args.rank} fp32 adapters on the UNet's "
                f"attention q/k/v/out ({n} parameters) in AdamW; latents cached on the CPU")
    adam = "foreach AdamW (torch's CUDA default, --foreach)" if args.foreach else "fused AdamW (medti's)"
    what = "every UNet weight" if args.trainable == "all" else "the UNet's attention layers"
    return (f"medti --method unet --trainable {args.trainable}: {what} ({n} parameters) held in fp32 in the model, "
            f"the rest fp16, forward under fp16 autocast, {adam}{' + EMA' if args.ema else ''}; text tower fp16 "
            f"(frozen, {width} wide)")


def main(args, cfg, checkpointing: bool):
    """tools/memory_estimate.py --method lora|unet: one report for the configuration the flags name."""
    parts = estimate_method(args.method, args.resolution, args.batch, checkpointing, config=cfg,
                            trainable=args.trainable, ema=args.ema, rank=args.rank, foreach=args.foreach)
    labels = {k: v for k, v in LABELS.items() if k != "ema" or args.ema}
    report(describe_method(args, parts, cfg.text.width), parts, labels, LIMITS[args.method])
