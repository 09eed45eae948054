"""What tools/memory_estimate.py's estimates share (textual inversion, generation, and tools/memory_methods.py's
--method lora|unet): fake tensors with real bookkeeping, the live-bytes tracker, one training step, the report.

The real code runs on fake tensors (FakeTensorMode: shapes, dtypes, storages; no data, no memory). A dispatch mode
sums the bytes of each storage while it lives; the peak of that sum is the estimate. Not included: the CUDA context
(~300-500 MB), the caching allocator's rounding and fragmentation, cuDNN/cuBLAS workspaces.
Why the fake tensors claim "cpu", not "cuda": on this CPU-only torch, autograd aborts the process in backward over
fake cuda tensors ("PyTorch is not linked with support for cuda devices"). On "cpu", attention runs the CPU flash
kernel which, like CUDA's flash and memory-efficient kernels, never stores the [tokens x tokens] matrix.
"""
import contextlib
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import minisd
from medti.training import optim as inversion
from minisd.clip import LAYERS
from minisd.config import ModelConfig, parse_config

GiB, GB = 2 ** 30, 10 ** 9
CONTEXT = 0.3 * GB, 0.5 * GB   # CUDA context: outside every tensor, its size depends on driver and GPU
DEVICE = "cpu"                 # what the fake tensors claim (see above)


class LiveBytes(TorchDispatchMode):
    """Bytes of live fake storages: each op output's storage counted once (views, in-place results share it), until
    it dies (a weakref finalizer: torch keeps one Python object per storage while anything, autograd included,
    holds it). `peak`: the largest sum; reset it to start a phase."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0   # storage address -> bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for storage in [t.untyped_storage() for t in pytree.tree_leaves(out) if isinstance(t, FakeTensor)]:
            if storage._cdata not in self.live:   # _cdata: the C++ StorageImpl's address, unique while it lives
                self.live[storage._cdata] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self.free, storage._cdata)
        return out

    def free(self, key):
        self.now -= self.live.pop(key)


class RealBookkeeping(TorchDispatchMode):
    """What fake tensors cannot do, for the data-dependent lines of medti (none touches a big tensor):
      1. ops without a fake or meta tensor argument run for real: the CPU bookkeeping of a real run (token ids,
         masks, schedules, AdamW's step count, CPU random draws) whose values steer Python (`if not is_new.any()`,
         `.numpy()`). Device tensors come only from on_device()/materialise() and ops on them;
      2. a real boolean-mask index (`spliced[is_new]`) becomes the mask's nonzero(): same gather, known shape;
      3. any()/all() of fake data, i.e. the NaN/inf checks in emb.encode and pipeline.decode, answer "finite"."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if all(not isinstance(x, FakeTensor) and x.device.type != "meta" for x in tensors):
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
            big = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor) and x.nbytes > 2 ** 20]
            assert all(x.is_meta for x in big), f"{func}: a big real tensor would be missing from the estimate"
            return out
        if func in (torch.ops.aten.any.default, torch.ops.aten.all.default):
            return torch.tensor(func is torch.ops.aten.all.default)
        if func.overloadpacket in (torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_):
            with unset_fake_temporarily():   # [mask] -> [rows, cols, ...] of its True entries
                indices = [i.nonzero().unbind(1) if isinstance(i, torch.Tensor) and i.dtype == torch.bool
                           and not isinstance(i, FakeTensor) else (i,) for i in args[1]]
            args = (args[0], [j for group in indices for j in group], *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_device():
    """Fake tensors with real bookkeeping, and a LiveBytes tracker over them (yielded)."""
    with FakeTensorMode(allow_non_fake_inputs=True), RealBookkeeping(), LiveBytes() as tracker:
        yield tracker


def on_device(*shape, dtype=torch.float32):
    """A fake device tensor (inside fake_device()), made like a meta tensor so that rule 1 above does not apply."""
    return torch.zeros_like(torch.empty(shape, dtype=dtype, device="meta"), device=DEVICE)


def materialise(module, dtype):
    """Meta-built module -> frozen fake tensors on DEVICE, floats in `dtype` (to_empty cannot swap meta for fake)."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, torch.nn.Parameter(torch.zeros_like(p, dtype=dtype, device=DEVICE), False))
        for name, b in list(sub.named_buffers(recurse=False)):
            sub._buffers[name] = torch.zeros_like(b, dtype=dtype if b.is_floating_point() else b.dtype, device=DEVICE)


def training_step(mem, loss_fn, params, optimizer) -> dict:
    """Forward, backward, optimizer step: bytes kept after the forward, fwd/bwd peak above what lived before."""
    base = mem.peak = mem.now
    loss = loss_fn()
    saved = mem.now - base
    loss.backward()
    backward_peak, mem.peak = mem.peak, mem.now
    gradient = sum(p.grad.nbytes for p in params)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"saved_for_backward": saved, "activations": backward_peak - base, "gradient": gradient,
            "total": max(backward_peak, mem.peak)}


def model_config(model) -> ModelConfig:
    """A preset name, JSON config (path or dict), ModelConfig or diffusers folder (its config files, checked by
    minisd.diffusers; no weight is read) -> the ModelConfig to build."""
    if isinstance(model, (str, Path)) and Path(model).is_dir():
        from minisd.diffusers_config import read_config
        return parse_config(read_config(model), str(model))
    return minisd.load_config(model)


def report(title: str, parts: dict, labels: dict, limits: dict):
    """One recipe's lines, its total and whether each limit is met (also with a 0.5 GB CUDA context on top)."""
    print(f"\n{title}", *(f"  {label:<56} {parts[key] / 2 ** 20:>9.1f} MiB" for key, label in labels.items()), sep="\n")
    total, context = parts["total"], [(parts["total"] + c) / GB for c in CONTEXT]
    print(f"  {'TOTAL: peak of the step (not the sum of the lines)':<56} {total / 2 ** 20:>9.1f} MiB = "
          f"{total / GiB:.2f} GiB = {total / GB:.2f} GB; + CUDA context {context[0]:.1f}-{context[1]:.1f} GB")
    for name, limit in limits.items():   # the figure with each verdict; it is a GPU's, estimated on any machine
        print(f"  {name} <= {limit / GB:g} GB: {'met' if total <= limit else 'NOT met'} ({total / GB:.2f} GB "
              f"estimated; with a 0.5 GB CUDA context {context[1]:.2f} GB: "
              f"{'met' if total + CONTEXT[1] <= limit else 'NOT met'})")


def describe(cfg: ModelConfig) -> str:
    """SD1 or SD2, in the words of the report lines."""
    t = cfg.text
    if t.tower == "openai":
        return f"SD1 (OpenAI CLIP text tower, {t.num_hidden_layers} layers of {t.width})"
    return f"SD2 (OpenCLIP text tower, {t.layers - LAYERS[t.layer]} of {t.layers} layers of {t.width})"


def adamw(params, foreach: bool = False):
    """medti.training.trainer's AdamW (medti.training.optim.adamw: fused, no temporaries) past its first step (state
    allocated), as in every later step; the learning rate changes no byte. foreach=True: torch's default on CUDA instead
    (what the diffusers examples run), whose multi-tensor ops make temporaries as large as all trained weights."""
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, foreach=True) if foreach else inversion.adamw(
        params, 1e-5)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer
