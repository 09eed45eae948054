"""What trains, for medti/trainer.py's one loop (`--method`): each method says which tensors train, how a batch of
prompts becomes the UNet's conditioning, and what file a save writes. The loop, the data, the randomness, the
resumable state and the checks are the trainer's, the same for every method.

A method is a small object with:
  params     {name: nn.Parameter}, fp32, the only tensors AdamW sees (saved with their moments in state.safetensors)
  stem       the saved file's name without `.safetensors` (`<stem>-<step>`, `<stem>-best` beside it)
  context(texts) -> [B, 77, width] conditioning, differentiable w.r.t. params where the text side trains
  prompt     what the previews show
  meta       what the saved file's metadata says of the method (the trainer adds base model, data and lr)
  record()   extra numbers for each log.jsonl line
  write(path, meta)   the shareable file (atomic)
  sync()     after each optimizer step: copy what trained into the model where the model holds a copy of it
"""
import math

import torch
from torch import nn

from minisd import lora
from minisd.errors import arg
from minisd.tokenizer import MAX_PROMPT_TOKENS

from . import embeddings as emb
from . import lora_files
from .inversion import TrainError, initial_vectors

# The learning rate when --lr is not given: textual inversion's is A1111's (0.005, tuned for a few vectors); LoRA's
# is the diffusers DreamBooth LoRA example's (README of examples/dreambooth, train_dreambooth_lora.py: 1e-4).
LEARNING_RATES = {"ti": "0.005", "lora": "1e-4"}


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

    def context(self, texts: list) -> torch.Tensor:
        return self.sd.text(texts, override={self.token: self.vectors})

    def record(self) -> dict:
        return {"vector_norm": self.vectors.detach().norm(dim=1).mean().item()}

    def write(self, path, meta: dict):
        emb.write(path, emb.Embedding(self.token, self.vectors.detach().float().cpu().clone(), meta))

    def sync(self):
        pass   # the vectors are used where they are: nothing in the model holds a copy


class LoRAMethod:
    """--method lora: rank-r fp32 adapters (minisd.lora) on the frozen model's layers that --lora-targets names;
    the base weights stay bit-identical, and what is saved is lora.safetensors in the kohya/A1111 layout
    (medti.lora_files), which A1111, ComfyUI and diffusers' load_lora_weights read."""

    def __init__(self, sd, cfg, prompts: list, device):
        self.sd, self.kinds = sd, targets(cfg)
        # the adapters' random start (kaiming-uniform down) comes from --seed, like every other draw of the run
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            for model, kinds in ((sd.unet, lora.UNET_TARGETS), (sd.text.tower, lora.TEXT_TARGETS)):
                chosen = [k for k in self.kinds if k in kinds]
                model.requires_grad_(False)
                if chosen:
                    lora.attach(model, lora.targets(model, chosen), cfg.rank, cfg.alpha or None)
        self.text = any(k in lora.TEXT_TARGETS for k in self.kinds)
        self.params = {f"{part}.{name}": p for part, model in (("unet", sd.unet), ("text", sd.text.tower))
                       for name, p in model.named_parameters() if ".lora" in name}
        self.stem, self.prompt = "lora", prompts[0]
        self.meta = {"method": "lora", "instance_prompt": cfg.instance_prompt}

    def context(self, texts: list) -> torch.Tensor:
        return self.sd.text(texts)   # the text tower's own adapters, if any, act inside it

    def record(self) -> dict:
        return {}

    def write(self, path, meta: dict):
        lora_files.write(path, self.sd.unet, self.sd.text.tower if self.text else None, meta)

    def sync(self):
        pass   # the adapters are used where they are


METHODS = {"ti": TextualInversion, "lora": LoRAMethod}


def targets(cfg) -> list:
    return [k.strip() for k in cfg.lora_targets.split(",") if k.strip()]


def learning_rate(cfg) -> str:
    """--lr, or the method's default (LEARNING_RATES)."""
    return cfg.lr or LEARNING_RATES.get(cfg.method, LEARNING_RATES["ti"])


def check_method(cfg):
    """The method's own settings, before anything loads; one line naming the flag."""
    if cfg.method not in METHODS:
        raise TrainError(f"{arg('method')} {cfg.method!r}: one of {', '.join(METHODS)}")
    if cfg.method == "ti":
        return
    if cfg.token:
        raise TrainError(f"{arg('token')} is textual inversion's; {arg('method')} {cfg.method} trains on "
                         f"{arg('instance_prompt')} (e.g. \"a chest x-ray of sks\")")
    if not cfg.instance_prompt.strip():
        raise TrainError(f"{arg('method')} {cfg.method}: give {arg('instance_prompt')}, the training prompt, e.g. "
                         "\"a chest x-ray of sks\"")
    unknown = [k for k in targets(cfg) if k not in lora.TARGETS]
    if unknown or not targets(cfg):
        raise TrainError(f"{arg('lora_targets')} {cfg.lora_targets!r}: comma-separated, from "
                         f"{', '.join(lora.TARGETS)}")
    if cfg.rank < 1:
        raise TrainError(f"{arg('rank')} {cfg.rank}: must be at least 1")
    if not (math.isfinite(cfg.alpha) and cfg.alpha >= 0):
        raise TrainError(f"{arg('alpha')} {cfg.alpha:g}: must be 0 (= the rank) or more")


def make(sd, cfg, prompts: list, device):
    """The method --method names, built on the loaded model."""
    return METHODS[cfg.method](sd, cfg, prompts, device)
