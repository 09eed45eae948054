"""Training: setup, then start or resume, then the one visible loop (get_batch, loss, backward, skip a non-finite
step, optimizer step, validation loss at a save, log, save, preview). `python -m medti.train` is its command line
(medti/train.py); the demo (medti/training/demo.py) is another user of it; neither is imported here.

What trains is the method's (medti/training/methods.py, --method): textual inversion's [vectors, width] fp32 tensor
spliced into the token embeddings, with the UNet and text tower frozen. The loop is the same for every method.
"""
import contextlib
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import minisd
from minisd.errors import arg
from minisd.schedule import NUM_TIMESTEPS
from minisd.vae import posterior_sample

from ..files.atomic import claim_folder, text_bytes, write_atomic
from ..files.hashes import sha256_of
from ..files.pseudonyms import KEY, model_name, write_key
from . import TrainError, distributed, image_method, methods
from .cache_read import open_cache
from .command import write_command
from .config import Plan, TrainConfig, check, check_out
from .dreambooth import class_cache, prior_preservation_loss
from .objective import cache_latents, cache_tokens, diffusion_loss, epoch_order, step_generator
from .optim import adamw, enable_checkpointing, lr_at, precision, set_lr, total_norm
from .outputs import report, save
from .previews import preview, preview_due
from .progress import Clock
from .prompts import uncaptioned
from .resume import MAY_CHANGE, resume
from .sources import cache_source, load_data
from .state import read_log, stored, write_log
from .validation import ValidationSet, best_so_far, validation_loss

SKIPS_TO_STOP = 10   # non-finite steps in a row after which the run stops: the lr or precision is wrong, not luck


@dataclass
class Session:
    """What setup() builds and the loop uses."""
    cfg: TrainConfig                     # with resolution filled in
    plan: Plan
    sd: object                           # minisd model, frozen
    cache: dict                          # cache_latents() of the training images
    method: object                       # what trains (medti.training.methods): its params are all AdamW sees
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    settings: dict                       # what a resumed run must share (saved in state.safetensors)
    meta: dict                           # metadata of the embedding file
    val: ValidationSet | None            # fixed validation draws (medti/training/validation.py), or None
    prior: dict | None = None            # DreamBooth's class images' latent cache (medti.training.dreambooth), or None
    best: tuple | None = None            # (step, val_loss) of the best save so far
    clock: Clock | None = None           # this session's timing, for the rate and the ETA (set by the loop)

    @property
    def name(self) -> str:               # names the saved files: the token without <> for textual inversion
        return self.method.stem

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def setup(cfg: TrainConfig, plan: Plan) -> Session:
    """Model, data -> cached latents (the VAE then leaves the device), what trains (the method) and its optimizer."""
    sd = minisd.load(cfg.model, config=cfg.config or None, dtype=plan.dtype, device=plan.device)
    # sd.image from --encoder (frozen; the projection, where there is one, started from --seed)
    encoder_file = image_method.attach_encoder(sd, cfg, plan.device) if cfg.condition else None
    cache = None
    if cfg.cache:   # latents from an on-disk cache (medti.training.cache_read), with the data flags it was made with
        cfg, cache = open_cache(cfg, sha256_of(sd.path), encoder_file and sha256_of(encoder_file))
    cfg = dataclasses.replace(cfg, resolution=cfg.resolution or sd.config.resolution, lr=methods.learning_rate(cfg))
    if cfg.resolution % sd.config.size_multiple:
        raise TrainError(f"{arg('resolution')} {cfg.resolution}: must be a multiple of {sd.config.size_multiple}")
    cache, held, fingerprint, shown = cache_source(sd, cfg, plan, cache)
    held_tokens = list(cache_tokens(sd.image, held.images, False)) if cfg.condition and held else None
    if cfg.condition:   # training reads only the cached tokens from here on
        sd.image.encoder.to("cpu")
    # validation latents: the posterior mean, unflipped (a fixed, noise-free latent of each image as it is)
    val = held and ValidationSet(cache_latents(sd, held.images, False, 0)["mean"] * sd.scale_factor,
                                 held.pseudonyms, held.names, cfg.val_draws, cfg.seed, cfg.token,
                                 uncaptioned(plan.prompts), held_tokens)
    sd.vae.to("cpu")
    # the class images come from the model before anything trains (the frozen model's own view of the class)
    prior = class_cache(sd, cfg, Path(cfg.out), plan.device,
                        lambda folder: load_data(dataclasses.replace(cfg, class_images=str(folder)), "class_images"))
    method = (image_method.ImageFineTune(sd, cfg, plan.device, cache["tokens"][[0]][0], shown)
              if cfg.condition else methods.make(sd, cfg, uncaptioned(plan.prompts), plan.device))
    optimizer = adamw(list(method.params.values()), lr_at(plan.schedule, 0))
    scaler = torch.amp.GradScaler(plan.device.type, enabled=plan.dtype == torch.float16)
    # Checkpointing recomputes each block's activations in the backward pass: same gradients, ~1/3 more UNet
    # work (tools/benchmark.py section 3), far less activation memory (tools/memory_estimate.py).
    if cfg.checkpointing == "on" or (cfg.checkpointing == "auto" and plan.device.type == "cuda"):
        enable_checkpointing(sd)
    # what the state file keeps: no path, no file name (medti.files.pseudonyms), the model by its sha256
    settings = stored({k: v for k, v in dataclasses.asdict(cfg).items() if k not in MAY_CHANGE})
    settings["data_fingerprint"] = fingerprint   # with --val-fraction: of all of --data, held-out part too
    settings["model_sha256"] = sha256_of(sd.path)
    if cfg.condition:   # the encoder's identity is its weights, as the model's is (a folder is stored by name)
        settings["encoder_sha256"] = sha256_of(encoder_file)
    if held:
        settings["validation"] = {**held.about, "draws": cfg.val_draws, "files": held.pseudonyms}
    meta = {**method.meta, "base_model": model_name(sd.preset or cfg.model), "base_sha256": settings["model_sha256"],
            "lr": cfg.lr, "data_sha256": fingerprint}
    return Session(cfg, plan, sd, cache, method, optimizer, scaler, settings, meta, val, prior)


def start_or_resume(s: Session) -> int:
    """The step to start from: 0 with an empty log, or the last save's step with what trains, AdamW and grad-scaler
    state restored and the log cut back to that step (the steps after it are done again, identically). With
    validation: val.txt names its images by pseudonym (names.private.tsv maps them to their paths), and the best
    save so far is recovered (not reset) on resume."""
    log = s.out / "log.jsonl"
    step = resume(s) if s.cfg.resume else 0
    records = [record for record in read_log(log) if record["step"] <= step] if s.cfg.resume else []
    if distributed.main_process():   # one writer; every rank restores the same state
        if s.cfg.resume and step < s.cfg.max_steps:   # a kill after a later step's files leaves them: say which counts
            print(f"{arg('resume')}: from step {step}, the last save in state.safetensors (later steps are trained "
                  "again, identically)")
        write_log(log, records)
        if s.val:
            write_key(s.out / KEY, list(zip(s.val.names, s.val.paths, strict=True)))
            write_atomic(s.out / "val.txt", text_bytes("".join(f"{name}\n" for name in s.val.names)))
    if s.val:
        s.best = best_so_far(records, s.out / f"{s.name}-best.safetensors", step)
    return step


def draw_latents(cache: dict, rows: list, mode: str, g: torch.Generator) -> torch.Tensor:
    """The cached latents of `rows`: a fresh posterior draw at every use (--latents random), else the draw made
    when caching ("once") or the posterior mean ("mean")."""
    if mode == "random":
        mean = cache["mean"][rows]
        return posterior_sample(mean, cache["logvar"][rows], torch.randn(mean.shape, generator=g))
    return cache[mode][rows]


def get_batch(s: Session, step: int, micro: int) -> tuple:
    """Micro-batch `micro` of optimizer step `step`: (scaled latents, noise, timesteps, prompt texts) on the device.

    Images: running sample numbers k = (step * grad_accum + micro) * batch + 0..batch-1, epoch k // N through a
    fresh shuffle of the N images. Flips, posterior draws (--latents random), timesteps, noise and prompts come from
    the (seed, step, micro) generator, so a resumed run draws exactly what an uninterrupted one would. With
    DreamBooth's prior preservation, as many class images follow (drawn after the instance images' draws, so those
    stay what they would be without it), under --class-prompt."""
    cfg, g = s.cfg, step_generator(s.cfg.seed, step, micro)
    n = len(s.cache["mean"]) // (2 if cfg.flip else 1)   # with --flip, row i + n is image i mirrored
    first = (step * cfg.grad_accum + micro) * cfg.batch
    rows = [int(epoch_order(cfg.seed, k // n, n)[k % n]) for k in range(first, first + cfg.batch)]
    if cfg.flip:
        rows = [i + n * int(torch.rand((), generator=g) < 0.5) for i in rows]
    latents = draw_latents(s.cache, rows, cfg.latents, g)
    t = torch.randint(0, NUM_TIMESTEPS, (cfg.batch,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    texts = [s.plan.prompts[int(i)] for i in torch.randint(0, len(s.plan.prompts), (cfg.batch,), generator=g)]
    if cfg.captions:   # each row's own caption, where the template asks for it ({caption}); none: the slot goes
        texts = [text.replace("{caption}", s.cache["captions"][row % n]) if s.cache["captions"][row % n] else
                 uncaptioned([text])[0] for text, row in zip(texts, rows, strict=True)]
    if cfg.condition:   # each row's own tokens, or None (the null); drawn last, so text runs draw what they did
        texts = image_method.conditions(s.cache["tokens"], rows, image_method.draw_dropped(cfg.batch,
                                                                                           cfg.condition_dropout, g))
    if s.prior:   # class rows at random, mirrored ones included with --flip (the cache holds them)
        rows = torch.randint(0, len(s.prior["mean"]), (cfg.batch,), generator=g).tolist()
        extra = draw_latents(s.prior, rows, cfg.latents, g)
        latents, noise = torch.cat([latents, extra]), torch.cat([noise, torch.randn(extra.shape, generator=g)])
        t = torch.cat([t, torch.randint(0, NUM_TIMESTEPS, (cfg.batch,), generator=g)])
        texts = texts + [cfg.class_prompt] * cfg.batch
    # several processes: this rank's share of the instance rows (and of the class rows after them)
    share = range(cfg.batch)[distributed.share(cfg.batch)]
    mine = [segment + i for segment in range(0, len(texts), cfg.batch) for i in share]
    latents, noise, t, texts = latents[mine], noise[mine], t[mine], [texts[i] for i in mine]
    device = s.plan.device
    return (latents * s.sd.scale_factor).to(device), noise.to(device), t.to(device), texts


def batch_loss(s: Session, latents, noise, t, texts):
    """The step's objective: the denoising loss, or with prior preservation the instance rows' plus
    --prior-weight times the class rows' (medti.training.dreambooth)."""
    context = s.method.context(texts)
    if s.prior:   # the first half of the rows are the instance images (get_batch)
        return prior_preservation_loss(s.sd, context, latents, noise, t, len(texts) // 2, s.cfg.prior_weight)
    return diffusion_loss(s.sd, context, latents, noise, t)


def skip(step: int, in_a_row: int) -> int:
    """A non-finite step, said in a warning; SKIPS_TO_STOP in a row stop the run. Returns the count in a row."""
    print(f"warning: step {step}: non-finite loss or gradient, step skipped", file=sys.stderr)
    if in_a_row + 1 == SKIPS_TO_STOP:
        raise TrainError(f"{SKIPS_TO_STOP} steps in a row had a non-finite loss or gradient (last: step {step}); "
                         f"try a lower {arg('lr')}, {arg('dtype')} fp32 or bf16, or a model with fp32 attention "
                         "(upcast)")
    return in_a_row + 1


def loop(s: Session, step: int) -> Path:
    """The training loop, from `step` to --max-steps; returns the path of the saved file (the embedding for TI)."""
    cfg, s.clock = s.cfg, Clock(step)
    in_a_row, skipped = 0, 0
    # A run killed during the preview of a save step resumes after that step: the preview would never be made.
    if cfg.resume and preview_due(cfg, step) and not (s.out / f"preview-{step:06d}.png").exists():
        preview(s, step)
    while step < cfg.max_steps:
        lr = set_lr(s.optimizer, lr_at(s.plan.schedule, step))
        s.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            latents, noise, t, texts = get_batch(s, step, micro)
            with precision(s.method, s.plan.device):
                loss = batch_loss(s, latents, noise, t, texts) / cfg.grad_accum
            s.scaler.scale(loss).backward()
            loss_sum += loss.item()
        distributed.average_grads(s.method.params.values())   # several processes: the whole batch's gradient
        loss_sum = distributed.mean(loss_sum)
        s.scaler.unscale_(s.optimizer)
        grad_norm = total_norm([p.grad for p in s.method.params.values()])
        finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
        if finite:
            s.scaler.step(s.optimizer)
            s.method.sync()
            in_a_row = 0
        else:   # skip: what trains stays as it was (with fp16 the scaler also lowers its scale)
            in_a_row, skipped = skip(step, in_a_row), skipped + 1
        s.scaler.update()
        step += 1
        rate = s.clock.tick(step)   # steps/s: warm-up and previews left out (medti.training.progress)
        record = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "it_s": round(rate, 3),
                  **s.method.record(), "skipped": not finite}
        saving = step % cfg.save_every == 0 or step == cfg.max_steps
        if saving and s.val:   # on the save step's own record, before it is logged and plotted
            with precision(s.method, s.plan.device):
                record["val_loss"] = validation_loss(s.sd, s.method.context, s.val)
        report(s, record)
        if saving:
            save(s, step, record.get("val_loss"))
        if preview_due(cfg, step):
            preview(s, step)
    if distributed.main_process():
        print(f"done: {step} steps ({skipped} skipped as non-finite in this session)", file=sys.stderr)
    return s.out / f"{s.name}.safetensors"


def train(cfg: TrainConfig, plan: Plan, argv: list | None = None) -> Path:
    """Setup, start or resume, loop: in cfg.out, which the caller holds (claim_folder). The command (`argv`, the
    flags as typed; None for a Python caller) and the settings are recorded once the run has started, so that a
    run that fails in setup leaves nothing behind."""
    check_out(cfg)
    session = setup(cfg, plan)
    step = start_or_resume(session)
    if distributed.main_process():   # one writer
        write_command(session.out, cfg, argv)   # cfg as given: "" and 0 still mean "the method's", "the model's"
    return loop(session, step)


def run(cfg: TrainConfig, argv: list | None = None) -> Path:
    """Check, hold --out for this run (a second run on it is refused; a failed run leaves no empty folder), train.
    Returns the path of the saved file. Under torchrun rank 0 holds the folder and writes; the others wait for it,
    then train alongside (medti.training.distributed)."""
    plan = check(cfg)
    with distributed.process_group(plan.device):
        with claim_folder(cfg.out) if distributed.main_process() else contextlib.nullcontext():
            distributed.barrier()
            return train(cfg, plan, argv)
