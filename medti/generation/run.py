"""One `python -m medti.generate` run once its flags are checked (flags.py): plan the images, load the model with its
LoRAs and embeddings, sample batch by batch, and write each image with its manifest line -- resumable, and sharded
over the processes of a torchrun launch (image i on rank i % N).

Image i uses its own generator seeded with seed + i, so any image can be remade alone, whatever the batch or the
number of processes. A rank logs its images to its own DIR/manifest.part<r>.jsonl; whichever process finishes last
(or a later --resume) merges the parts into manifest.jsonl. No process group is needed.
"""
import os
import re
from pathlib import Path

import torch

import minisd
from minisd.config import resolve_device, resolve_dtype
from minisd.errors import quoted, some
from minisd.packing import can_pack, pack_convs

from ..cli import torchrun_world
from ..files import embedding_file as emb
from ..files.atomic import claim_folder, safetensors_bytes, write_atomic
from ..files.hashes import sha256_of
from ..files.images import contact_sheet, load_image, load_mask, paste_back, save_png, soft_mask, to_pil
from ..files.pseudonyms import KEY, Numbering, model_name, write_key
from ..medical import synthetic
from . import loras, variations
from .flags import UsageError, check_args
from .manifest import Job, append, batches, described, differences, merge, parameters_text, read_records, record, repair
from .pipeline import InitImage, SampleSettings, compile_for_inference, decode, sample
from .preflight import GenerateError, check_finite, check_memory, check_scale
from .progress import Progress
from .prompts import check_length, parse


def plan(args) -> tuple[list, list]:
    """(term texts, jobs). --sweep A B: row r (seed + r) has one image per weight w, prompt "A :1-w AND B :w"."""
    if args.condition_image:   # an image-conditioned model: one context per job, no prompt
        return [""], variations.plan(args)
    if args.sweep is None:
        terms = parse(loras.strip_tags(args.prompt))   # A1111 drops <lora:...> tags before splitting on AND
        for text, weight in terms:
            check_scale(f"--prompt term {quoted(text.strip())}: weight", weight)
        weights = [w for _, w in terms]
        return [t for t, _ in terms], [Job(i, args.seed + i, args.prompt, weights) for i in range(args.n)]
    a, b = args.sweep
    if any(re.search(r"\bAND\b", text) for text in (a, b)):
        raise UsageError("--sweep takes two single terms (no AND); their weights come from --weights")
    try:
        ws = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise UsageError(f"--weights {args.weights!r}: expected numbers separated by commas") from None
    for w in ws:
        check_scale("--weights: weight", w)
    jobs = [Job(r * len(ws) + c, args.seed + r, f"{a} :{1 - w:g} AND {b} :{w:g}", [1 - w, w])
            for r in range(args.n) for c, w in enumerate(ws)]
    return [loras.strip_tags(a), loras.strip_tags(b)], jobs


def conditioning(sd, texts: list, negative: str, name: str = "prompt"):
    """Encode the term texts (of --prompt, or `name`: --sweep) and the negative prompt once: ([K, 77, width],
    [1, 77, width])."""
    for text in texts + [negative]:
        unknown = [w for w in re.findall(r"<[^<>\s]+>", text) if w not in sd.text.vectors]
        if unknown:
            raise UsageError(f"prompt token {unknown[0]} matches no loaded embedding; load it with --embeddings "
                             f"(loaded: {some(sd.text.vectors) or 'none'})")
    check_length([(t, 1.0) for t in texts], sd.text.count, name=name)
    check_length([(negative, 1.0)], sd.text.count, name="negative")
    with torch.no_grad():
        return sd.text(texts), sd.text([negative])


def contexts(args, sd, texts: list, width: int, height: int) -> tuple:
    """(the contexts indexed by Job.condition, the uncond, the --condition-image sources): a prompt's terms, or an
    image-conditioned model's cases (medti.generation.variations) with the null as the uncond."""
    if not args.condition_image:
        conds, uncond = conditioning(sd, texts, args.negative, "prompt" if args.sweep is None else "sweep")
        return [conds], uncond, []
    sources = variations.read_sources(args, max(width, height))
    return variations.contexts(sd, sources, variations.fractions(args)), sd.image.null(1), sources


def load_model(args, device, dtype, specs: list):
    """The model with the LoRAs merged and the embeddings attached, packed or compiled for inference; (sd,
    embeddings, packed)."""
    loaded = emb.read_all(args.embeddings) if args.embeddings else {}
    sd = minisd.load(args.model, config=args.config, dtype=dtype, device=device, encoder=args.encoder)
    sd = loras.apply(sd, specs)   # before packing
    emb.attach(sd, loaded)
    packed = not args.compile and not args.no_pack and can_pack(sd.unet)
    if args.compile:
        compile_for_inference(sd)   # inductor's freezing packs the conv weights itself
    elif packed:
        pack_convs(sd.unet), pack_convs(sd.vae)
    return sd, loaded, packed


def image_size(args, sd) -> tuple[int, int]:
    width = args.width or args.size or sd.config.resolution
    height = args.height or args.size or sd.config.resolution
    for name, value in (("width", width), ("height", height)):
        if value < sd.config.size_multiple or value % sd.config.size_multiple:
            flag = name if getattr(args, name) else "size" if args.size else "config's resolution"
            raise UsageError(f"--{flag} {value}: must be a multiple of {sd.config.size_multiple} for this model")
    if args.mask_blur > max(width, height):
        raise UsageError(f"--mask-blur {args.mask_blur:g}: at most {max(width, height)} pixels (the image's side); "
                         "a wider blur turns the mask into one flat value")
    return width, height


def init_inputs(args, sd, width: int, height: int) -> tuple:
    """(InitImage or None, the blurred soft mask for --paste-back or None)."""
    init = load_image(args.init_image, width, height) if args.init_image else None
    mask = load_mask(args.mask, width, height, args.mask_blur) if args.mask else None
    if sd.config.inpainting and mask is None:
        raise UsageError("the inpainting model (9 input channels) needs --init-image and --mask")
    soft = soft_mask(args.mask, width, height, args.mask_blur) if args.paste_back else None
    return (InitImage(init, mask, args.strength) if init is not None else None), soft


def input_names(args) -> tuple[dict, list, dict]:
    """How the manifest names --init-image and --mask: by pseudonyms of their bytes (medti.files.pseudonyms; an init
    image is often a patient's scan, and its file name the patient's), with the key file's rows and what an earlier
    release's record held instead (medti.generation.manifest.as_written_now). Called once both were read."""
    numbering, names, rows = Numbering(), {}, []
    for flag in ("init_image", "mask"):
        path = getattr(args, flag)
        names[flag] = numbering.item({path: Path(path).read_bytes()}) if path else None
        rows += [(names[flag], os.path.abspath(path))] if path else []
    renamed = {flag: {getattr(args, flag): names[flag]} for flag in names if names[flag]}
    return names, rows, {**renamed, "model": {str(args.model): model_name(args.model)}}


def write_outputs(args, out: Path, sd, job: Job, rec: dict, latent, image, part: Path):
    """The latent (--save-latents), the PNG, then its manifest line: a record always has its image. A write that
    fails (disk full) leaves no temporary file and no half line, and the run can be resumed."""
    try:
        if args.save_latents:   # scaled latent, as the sampler ends; divide by scale_factor to decode
            write_atomic(out / f"{job.index:05d}.safetensors", safetensors_bytes(
                {"latent": latent.float()}, {"scale_factor": sd.scale_factor, "file": job.file}))
        picture, text = to_pil(image), loras.parameters(rec, parameters_text(rec))
        save_png(out / job.file, picture, text)
        if args.format == "dicom":   # NNNNN.dcm beside the PNG; its UIDs derive from the run's settings
            synthetic.write_dicom(out / f"{job.index:05d}.dcm", picture, text, vars(args), job.index)
        append(part, rec)
    except OSError as e:
        raise GenerateError(f"{e.filename or out}: {e.strerror or e}; nothing half-written was left behind: free "
                            "space (or fix permissions) and rerun with --resume") from None


def write_grid(args, out: Path, jobs: list):
    """grid.png: one row per seed; with --sweep one column per weight, each image labelled with both, under a
    header that says which prompt is A and which B."""
    columns = len(jobs) // args.n if args.sweep else 0
    labels = [f"seed {j.seed}" + (f", w {j.weights[1]:g}" if args.sweep else "") for j in jobs]
    header = [f"A: {args.sweep[0]}", f"B: {args.sweep[1]}", "each image: A :1-w AND B :w"] if args.sweep else None
    save_png(out / "grid.png", contact_sheet([out / j.file for j in jobs], columns, labels, header))


def generate(args, out: Path, texts: list, jobs: list, specs: list, rank: int, world: int, device, dtype):
    sd, loaded, packed = load_model(args, device, dtype, specs)
    variations.check_model(args, sd)   # a prompt for a text model, an image for an image-conditioned one
    width, height = image_size(args, sd)
    per_call = max(1, args.batch // (len(texts) + 1)) if args.batch else 1   # each image: K terms + uncond rows
    check_memory(sd, device, width, height, args.batch or len(texts) + 1, per_call, packed)   # before any resize
    init, soft = init_inputs(args, sd, width, height)
    conds, uncond, sources = contexts(args, sd, texts, width, height)
    mix = variations.fractions(args)
    settings = SampleSettings(width=width, height=height, steps=args.steps, cfg=args.cfg, sampler=args.sampler,
                              sigmas=args.sigmas, batch=args.batch)
    model_hash = sha256_of(sd.path)   # cached by medti.files.hashes: hashing GBs once, not per run
    emb.warn_other_base(loaded, model_hash)
    inputs, rows, renamed = input_names(args)
    planned = {job.file: record(args, job, width, height, model_hash, loaded, inputs) | loras.record(specs)
               | (variations.record(job, sources, mix) if sources else {}) for job in jobs}
    rows += variations.key_rows(sources)
    done = read_records(out)   # only records whose PNG is on disk count
    changed = [file for file in done if file in planned and differences(done[file], planned[file], renamed)]
    if changed:
        file = changed[0]
        raise UsageError(f"--out {out}: {file} was made with other parameters: "
                         f"{described(done[file], planned[file], args.seed, renamed)}; --resume continues the same "
                         "run: give its parameters, or another --out")
    if rows and rank == 0:   # the files behind the manifest's pseudonyms, for the user alone
        write_key(out / KEY, rows)
    mine = [job for job in jobs if job.index % world == rank]   # this rank's share, fixed by the index alone
    todo = [job for job in mine if job.file not in done]
    part = out / f"manifest.part{rank}.jsonl"
    repair(part)   # a torn last line from a crash would otherwise glue onto the next record
    progress = Progress(len(todo), rank, world)   # stderr: a line per step, ETA, summary
    for group in batches(todo, per_call):
        progress.begin(len(group))
        latents = sample(sd, conds[group[0].condition], uncond, group[0].weights, [job.seed for job in group],
                         settings, init, progress=progress.step)
        files = [job.file for job in group]
        check_finite("latents", latents, files, dtype)   # both checks come before any file of the batch
        images = decode(sd, latents)
        check_finite("decoded images", images, files, dtype)
        if soft is not None:
            images = paste_back(images, init.image, soft)
        for job, latent, image in zip(group, latents, images, strict=True):
            write_outputs(args, out, sd, job, planned[job.file], latent, image, part)
        progress.end_batch()
    progress.summary(out, len(mine) - len(todo))
    if merge(out, planned, renamed) and args.grid:
        if sources:
            save_png(out / "grid.png", variations.grid(out, jobs, sources, mix, args.n))
        else:
            write_grid(args, out, jobs)


def run(args):
    check_args(args)
    variations.check(args)
    rank, world = torchrun_world()
    texts, jobs = plan(args)   # parses the prompt: its mistakes are reported before a folder is made
    prompts = args.sweep or [p for p in [args.prompt] if p is not None]   # none for an image-conditioned model
    specs = loras.plan(args.lora, args.lora_dir, prompts, args.negative)
    local = os.environ.get("LOCAL_RANK", rank)   # torchrun: this process's index on its machine = its GPU
    name = f"cuda:{local}" if args.device == "cuda" and world > 1 else args.device
    device = resolve_device(name)
    dtype = resolve_dtype(args.dtype, device)   # the project's one dtype rule
    # a second run on --out is refused (medti.files.atomic.claim_folder): the ranks of one launch share the folder
    # (they write disjoint files), a single run and a launch never do, and each rank of a second launch meets its
    # counterpart of the first
    with claim_folder(args.out, rank=rank, world=world) as out:
        if not args.resume and (list(out.glob("manifest*.jsonl")) or list(out.glob("[0-9]*.png"))):
            raise UsageError(f"--out {out} already holds a run; pass --resume to continue it or choose another folder")
        generate(args, out, texts, jobs, specs, rank, world, device, dtype)

