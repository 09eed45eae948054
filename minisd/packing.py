"""CPU inference with every convolution weight laid out for oneDNN once, instead of at every call.

Why: eager `nn.Conv2d` on the CPU hands oneDNN the plain [out, in, kh, kw] weight, and oneDNN reorders it into its
blocked layout on every call. Where the feature map is small and the weight large -- the UNet's deepest levels,
1280 to 2560 channels at 8x8 and 16x16 latents -- that reorder costs more than the convolution: the UNet's
2560->1280 3x3 conv on 8x8 latents, batch 2, takes 0.227 s eager and 0.056 s packed (tools/benchmark.py section 1,
2 cores; for whole networks see docs/performance.md). inductor's weight `freezing` (`--compile`) does
the same, at the price of a long compile. Here it is done with the two oneDNN operators that inductor's frozen CPU
graphs call, present in every torch built with oneDNN (`can_pack` checks): `torch._C._nn.mkldnn_reorder_conv2d_weight`
(dense weight -> oneDNN weight for a given input size) and `torch.ops.mkldnn._convolution_pointwise` (the
convolution with such a weight).

Results equal nn.Conv2d's to fp32 rounding (tests/test_packing.py, per conv against F.conv2d and per network
against diffusers). The output comes back channels-last (NHWC in memory), which every later layer accepts as is, so
the networks then run channels-last throughout. Costs: a second copy of each conv weight per input size (fp32:
2.3 GB for the SD2 UNet, 0.3 GB for the VAE). On toy-sized models the packed call can be slower than eager; the
gain is measured on the full-size networks. Inference only: the packed operator has no backward pass, and a weight
changed after its first call would not be seen.
"""
import torch
from torch import nn


class PackedConv2d(nn.Module):
    """Stands in for one nn.Conv2d: the same `weight` and `bias` Parameters (so the same state_dict keys), plus
    the oneDNN copy of the weight for each input size [C, H, W] met so far, made at its first call."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        # the oneDNN operator pads with zeros from numeric sizes; anything else would be silently wrong
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}: only numeric zero "
                             "padding can be packed")
        self.weight, self.bias = conv.weight, conv.bias
        # (padding, stride, dilation, groups): the argument order of both oneDNN operators
        self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.packed = {}

    def forward(self, x):
        size = tuple(x.shape[1:])
        if size not in self.packed:
            # the layout oneDNN picks depends on the input's channels and spatial size, not on the batch
            dense = self.weight.detach().to_mkldnn()
            self.packed[size] = torch._C._nn.mkldnn_reorder_conv2d_weight(dense, *self.geometry, [1, *size])
        # "none", [], "": no fused activation (attribute, its scalars, its algorithm)
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed[size], self.bias, *self.geometry,
                                                       "none", [], "")

    def extra_repr(self) -> str:
        out, cin, kh, kw = self.weight.shape
        return f"{cin * self.geometry[3]}, {out}, kernel_size=({kh}, {kw}), packed for {len(self.packed)} size(s)"


def can_pack(module: nn.Module) -> bool:
    """True where packing applies: torch built with oneDNN, weights on the CPU in fp32, or in bf16 where the CPU
    has bf16 instructions (oneDNN refuses to pack bf16 weights without AVX-512 or AVX-NE-CONVERT)."""
    if not torch.backends.mkldnn.is_available():   # checked first: without oneDNN its operators are absent
        return False
    p = next(module.parameters())
    dtypes = (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)
    return p.device.type == "cpu" and p.dtype in dtypes


def pack_convs(module: nn.Module) -> nn.Module:
    """Replace every plain nn.Conv2d below `module` with a PackedConv2d, in place; returns `module`.

    Subclasses of nn.Conv2d are left alone (the UNet's Conv1x1 runs as a linear layer). Raises ValueError where
    `can_pack` is false, rather than running slower or failing inside oneDNN.
    """
    if not can_pack(module):
        p = next(module.parameters())
        raise ValueError(f"cannot pack conv weights on {p.device} in {p.dtype}: see minisd.packing.can_pack")
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Conv2d:
                setattr(parent, name, PackedConv2d(child))
    return module
