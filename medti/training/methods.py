"""What trains, for medti/training/trainer.py's one loop (`--method`): each method says which tensors train, how a batch
of prompts becomes the UNet's conditioning, and what file a save writes. The loop, the data, the randomness, the
resumable state and the checks are the trainer's, the same for every method.

A method is a small object with:
  params     {name: nn.Parameter}, fp32, the only tensors AdamW sees (saved with their moments in state.safetensors)
  stem       the saved file's name without `.safetensors` (`<stem>-<step>`, `<stem>-best` beside it)
  context(texts) -> [B, 77, width] conditioning, differentiable w.r.t. params where the text side trains
  prompt     what the previews show
  meta       what the saved file's metadata says of the method (the trainer adds base model, data and lr)
  record()   extra numbers for each log.jsonl line
  write(path, meta)   the shareable file (atomic)
  copies     whether each save also keeps `<stem>-<step>.safetensors` (a whole model only with --keep-saves:
             gigabytes each)
  buffers    {name: tensor} of state that is no parameter (an EMA), saved and restored with the run
  autocast   the dtype the forward runs in under torch.autocast, or None (what trains already runs in it)
  sync()     after each optimizer step (and a resume): update what follows the weights (the EMA)
"""
import re

import torch
from torch import nn

from minisd import lora
from minisd.errors import arg
from minisd.load import components, state_dict
from minisd.tokenizer import MAX_PROMPT_TOKENS

from ..files import embedding_file as emb
from ..files import lora_file
from ..files.atomic import safetensors_bytes, write_atomic
from . import TrainError
from .objective import initial_vectors

# The learning rate when --lr is not given: textual inversion's is A1111's (0.005, tuned for a few vectors); LoRA's
# is the diffusers DreamBooth LoRA example's (README of examples/dreambooth, train_dreambooth_lora.py: 1e-4).
# The full fine-tune's is the diffusers text-to-image example's (README of examples/text_to_image: 1e-5).
LEARNING_RATES = {"ti": "0.005", "lora": "1e-4", "unet": "1e-5"}


def attach_token(sd, cfg, prompts: list) -> torch.Tensor:
    """Add the token to the model's text conditioning and return its start vectors; every prompt must still fit."""
    start = initial_vectors(sd, cfg.init, cfg.vectors, cfg.seed)
    # a clash with a loaded word raises EmbeddingError, a UserError: it reaches the user as one line
    emb.attach(sd, {cfg.token: emb.Embedding(cfg.token, start, {}, source=arg("token"))})
    longest = max(sd.text.count(p) for p in prompts)
    if longest > MAX_PROMPT_TOKENS:
        raise TrainError(f"a training prompt holds {longest} tokens with {arg('vectors')} {cfg.vectors}; at most "
                         f"{MAX_PROMPT_TOKENS} fit")
    return start


class FrozenText:
    """The conditioning of each prompt by a text tower that does not train (LoRA on the UNet only, the UNet
    fine-tune without --train-text), computed once and reused: the tower never changes, so neither does a prompt's
    conditioning (the diffusers DreamBooth example's --pre_compute_text_embeddings, here always on). Each prompt is
    encoded alone, so its conditioning is the same bits whichever batch first met it: a resumed run, a rank of
    torchrun and an uninterrupted run agree. Up to KEEP prompts are kept, in host memory (SD2 fp16: 154 KiB each;
    the device's memory is the training step's, as tools/memory_estimate.py counts it); past that, the rest is
    encoded each time it is met (per-image captions of a large data set)."""
    KEEP = 4096

    def __init__(self, sd):
        self.sd, self.kept = sd, {}

    @torch.no_grad()
    def __call__(self, texts: list) -> torch.Tensor:
        rows = []
        for text in texts:
            row = self.kept.get(text)
            if row is None:
                row = self.sd.text([text])[0].cpu()
                if len(self.kept) < self.KEEP:
                    self.kept[text] = row
            rows.append(row)
        return torch.stack(rows).to(next(self.sd.unet.parameters()).device)   # where the UNet reads it


class TextualInversion:
    """--method ti: one [vectors, width] fp32 tensor, spliced into the frozen token embeddings wherever the token
    appears in a prompt (the token alone, or --template lines); the UNet and the text tower never change."""

    def __init__(self, sd, cfg, prompts: list, device):
        self.sd, self.token = sd, cfg.token
        self.vectors = nn.Parameter(attach_token(sd, cfg, prompts).to(device))
        self.params = {"vectors": self.vectors}
        self.stem = cfg.token.strip("<>")   # the token without <>: names the embedding files
        self.prompt = cfg.token              # previews: the token alone
        self.meta = {"token": cfg.token, "vectors": str(cfg.vectors), "init": cfg.init}
        self.buffers, self.autocast, self.copies = {}, None, True

    def context(self, texts: list) -> torch.Tensor:
        return self.sd.text(texts, override={self.token: self.vectors})

    def record(self) -> dict:
        return {"vector_norm": self.vectors.detach().norm(dim=1).mean().item()}

    def write(self, path, meta: dict):
        emb.write(path, emb.Embedding(self.token, self.vectors.detach().float().cpu().clone(), meta))

    def sync(self):
        pass   # the vectors are used where they are: nothing in the model holds a copy


MAX_RANK = 1280   # the widest layer of SD1 and SD2 (the UNet's deepest level); checked before the model loads


def smallest_side(layer) -> int:
    """min(outputs, inputs) of a layer's weight (a conv's inputs are in_channels x kernel; a fused q/k/v in_proj
    [3E, E] gives E): a LoRA rank beyond it adds nothing, an update of that rank being a full matrix already."""
    weight = getattr(layer, "weight", None)
    weight = weight if weight is not None else layer.in_proj_weight
    return min(weight.shape[0], weight[0].numel())


def check_rank(sd, kinds: list, rank: int):
    """--rank against the loaded model's targeted layers, before any adapter is allocated (--rank 100000 used to
    grow the process to 23 GB)."""
    sides = [smallest_side(model.get_submodule(name)) for model, group in
             ((sd.unet, lora.UNET_TARGETS), (sd.text.tower, lora.TEXT_TARGETS))
             for name in lora.targets(model, [k for k in kinds if k in group])]
    if sides and rank > min(sides):
        raise TrainError(f"{arg('rank')} {rank}: larger than the smallest targeted layer of this model "
                         f"({min(sides)} features, where a rank-{min(sides)} update is already full); give at most "
                         f"{min(sides)}")


class LoRAMethod:
    """--method lora: rank-r fp32 adapters (minisd.lora) on the frozen model's layers that --lora-targets names;
    the base weights stay bit-identical, and what is saved is lora.safetensors in the kohya/A1111 layout
    (medti.files.lora_file), which A1111, ComfyUI and diffusers' load_lora_weights read."""

    def __init__(self, sd, cfg, prompts: list, device):
        self.sd, self.kinds = sd, targets(cfg)
        # the adapters' random start (kaiming-uniform down) comes from --seed, like every other draw of the run
        check_rank(sd, self.kinds, cfg.rank)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            for model, kinds in ((sd.unet, lora.UNET_TARGETS), (sd.text.tower, lora.TEXT_TARGETS)):
                chosen = [k for k in self.kinds if k in kinds]
                model.requires_grad_(False)
                if chosen:
                    lora.attach(model, lora.targets(model, chosen), cfg.rank, cfg.alpha or None)
        self.text = any(k in lora.TEXT_TARGETS for k in self.kinds)
        self.frozen = FrozenText(sd)
        self.params = {f"{part}.{name}": p for part, model in (("unet", sd.unet), ("text", sd.text.tower))
                       for name, p in model.named_parameters() if ".lora" in name}
        self.stem, self.prompt = "lora", prompts[0]
        self.meta = {"method": "lora", "instance_prompt": cfg.instance_prompt}
        self.buffers, self.autocast, self.copies = {}, None, True

    def context(self, texts: list) -> torch.Tensor:
        return self.sd.text(texts) if self.text else self.frozen(texts)   # the tower's adapters act inside it

    def record(self) -> dict:
        return {}

    def write(self, path, meta: dict):
        lora_file.write(path, self.sd.unet, self.sd.text.tower if self.text else None, meta)

    def sync(self):
        pass   # the adapters are used where they are


# --trainable attention: the attention layers of the UNet's transformer blocks (self and cross), q/k/v/out, the
# cheapest full-weight variant that still changes how the image attends to the prompt (Chambon et al. compare it)
ATTENTION = re.compile(r".+\.transformer_blocks\.\d+\.attn[12]\..+")
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class UNetFineTune:
    """--method unet: the UNet's own weights train (all, or --trainable attention), optionally the text tower's too
    (--train-text); AdamW keeps fp32 masters of exactly what trains: those weights are held in fp32 in the model,
    the frozen rest in the run's dtype, and the forward runs under autocast in that dtype (`autocast`), so the
    fp16/bf16 compute sees rounded copies while updates accumulate in fp32 (the diffusers examples' mixed
    precision). --ema DECAY keeps an exponential moving average of what trains, saved instead of the raw weights.
    What is saved is the whole model as one official-layout file, model.safetensors (fp16 unless --save-dtype)."""

    def __init__(self, sd, cfg, prompts: list, device):
        self.sd, self.decay, self.save_dtype = sd, cfg.ema, SAVE_DTYPES[cfg.save_dtype]
        self.train_text, self.frozen = cfg.train_text, FrozenText(sd)
        dtype = next(sd.vae.parameters()).dtype
        self.autocast = dtype if dtype != torch.float32 else None
        # what trains, by the name its params start with (an image-conditioned run adds its projection)
        self.parts = {"unet": sd.unet, **({"text": sd.text.tower} if cfg.train_text else {})}
        sd.unet.requires_grad_(False), sd.text.tower.requires_grad_(False)
        self.params = {}
        for part, model in self.parts.items():
            for name, param in model.named_parameters():
                if part == "text" or cfg.trainable == "all" or ATTENTION.fullmatch(name):
                    param.data = param.data.float()   # the fp32 master is the model's own weight
                    self.params[f"{part}.{name}"] = param.requires_grad_(True)
        self.buffers = {f"ema.{n}": p.detach().clone() for n, p in self.params.items()} if self.decay else {}
        self.stem, self.prompt, self.copies = "model", prompts[0], cfg.keep_saves
        self.meta = {"method": "unet", "instance_prompt": cfg.instance_prompt, "trainable": cfg.trainable,
                     "train_text": str(cfg.train_text), "ema": f"{cfg.ema:g}"}

    def context(self, texts: list) -> torch.Tensor:
        return self.sd.text(texts) if self.train_text else self.frozen(texts)

    def record(self) -> dict:
        return {}

    @torch.no_grad()
    def sync(self):
        """The EMA step after each optimizer step: ema = decay * ema + (1 - decay) * weight, in fp32."""
        for name, ema in self.buffers.items():
            ema.lerp_(self.params[name.removeprefix("ema.")], 1 - self.decay)

    def write(self, path, meta: dict):
        """The whole model in the official single-file layout (minisd.load reads it; so do A1111 and diffusers'
        from_single_file), with the EMA weights in place of the trained ones when --ema is on."""
        prefix = {part: key for key, module in components(self.sd).items()   # the official key prefixes
                  for part, ours in self.parts.items() if module is ours}
        ema = {prefix[name.split(".")[1]] + name.split(".", 2)[2]: t for name, t in self.buffers.items()}
        state = {k: v.to(self.save_dtype) for k, v in state_dict(self.sd, replace=ema).items()}
        bad = next((k for k, v in state.items() if not torch.isfinite(v).all()), None)
        if bad is not None:
            raise TrainError(f"{bad} is not finite in {str(self.save_dtype)[6:]}; use {arg('save_dtype')} fp32")
        write_atomic(path, safetensors_bytes(state, {**meta, "format": "medti-unet",
                                                     "dtype": str(self.save_dtype)[6:]}))


METHODS = {"ti": TextualInversion, "lora": LoRAMethod, "unet": UNetFineTune}


def targets(cfg) -> list:
    return [k.strip() for k in cfg.lora_targets.split(",") if k.strip()]


def learning_rate(cfg) -> str:
    """--lr, or the method's default (LEARNING_RATES)."""
    return cfg.lr or LEARNING_RATES.get(cfg.method, LEARNING_RATES["ti"])


def check_method(cfg):
    """The method's own settings, before anything loads; one line naming the flag."""
    if cfg.method not in METHODS:
        raise TrainError(f"{arg('method')} {cfg.method!r}: one of {', '.join(METHODS)}")
    defaults = type(cfg)()   # TrainConfig's defaults: a flag left alone is no mistake
    given = [name for name, methods in FLAG_METHODS.items()
             if getattr(cfg, name) != getattr(defaults, name) and cfg.method not in methods]
    if given:
        raise TrainError(f"{arg(given[0])} is for {arg('method')} {' or '.join(FLAG_METHODS[given[0]])}, not "
                         f"{cfg.method}")
    if cfg.method == "ti":
        return
    if not cfg.instance_prompt.strip() and not cfg.condition:   # an image-conditioned run has no prompt
        raise TrainError(f"{arg('method')} {cfg.method}: give {arg('instance_prompt')}, the training prompt, e.g. "
                         "\"a chest x-ray of sks\"")
    unknown = [k for k in targets(cfg) if k not in lora.TARGETS]
    if unknown or not targets(cfg):
        raise TrainError(f"{arg('lora_targets')} {cfg.lora_targets!r}: comma-separated, from "
                         f"{', '.join(lora.TARGETS)}")
    if not 1 <= cfg.rank <= MAX_RANK:
        raise TrainError(f"{arg('rank')} {cfg.rank}: from 1 to {MAX_RANK} (the widest layer of SD1 and SD2; a rank "
                         "as large as a layer is already a full update of it)")
    # the largest scale alpha/rank medti reads back from a LoRA file (medti.files.lora_file): a run past it trained
    # for nothing, and --alpha 1e30 overflowed in the first steps and was blamed on --lr
    scale = lora_file.MAX_ALPHA_SCALE
    if not 0 <= cfg.alpha <= scale * cfg.rank:   # NaN fails too
        raise TrainError(f"{arg('alpha')} {cfg.alpha:g}: from 0 (= the rank) to {scale * cfg.rank:g}, {scale:g} x "
                         f"{arg('rank')} {cfg.rank} (the scale alpha/rank is at most {scale:g}; kohya's recipes keep "
                         "it at 1 or below)")
    if cfg.trainable not in ("all", "attention"):
        raise TrainError(f"{arg('trainable')} {cfg.trainable!r}: all or attention")
    if not 0 <= cfg.ema < 1:   # NaN fails too
        raise TrainError(f"{arg('ema')} {cfg.ema:g}: a decay in [0, 1), e.g. 0.9999; 0: no EMA")
    if cfg.save_dtype not in SAVE_DTYPES:
        raise TrainError(f"{arg('save_dtype')} {cfg.save_dtype!r}: one of {', '.join(SAVE_DTYPES)}")


# Each method's own flags and the methods they belong to: given to another method, they would be silently
# ignored, so they are refused.
FLAG_METHODS = {"token": ("ti",), "vectors": ("ti",), "init": ("ti",), "instance_prompt": ("lora", "unet"),
                "captions": ("lora", "unet"),
                "rank": ("lora",), "alpha": ("lora",),
                "lora_targets": ("lora",), "trainable": ("unet",), "train_text": ("unet",), "ema": ("unet",),
                "save_dtype": ("unet",), "keep_saves": ("unet",)}


def make(sd, cfg, prompts: list, device):
    """The method --method names, built on the loaded model."""
    return METHODS[cfg.method](sd, cfg, prompts, device)
