"""minisd.packing: convolutions with oneDNN weights packed once give nn.Conv2d's results.

References: torch's own eager F.conv2d for single convolutions; diffusers' UNet2DConditionModel and AutoencoderKL
(on the weights the tiny fixture shares with ours) for the packed networks. Tolerances: 1e-5 of the output's scale
for one convolution (fp32 sums of at most 9 * 64 products in another order: measured ~1e-6), and the 1e-4 of
test_components.py for whole networks.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import rel_err
from minisd.packing import PackedConv2d, can_pack, pack_convs


@torch.no_grad()
@pytest.mark.parametrize("geometry", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2),
                                      dict(kernel_size=1), dict(kernel_size=3, padding=1, bias=False)])
def test_packed_conv_equals_conv2d(geometry):
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(64, 32, **geometry)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    packed = PackedConv2d(copy.deepcopy(conv))
    for size in (16, 9):   # a second input size gets its own packed weight
        x = torch.randn(2, 64, size, size, generator=gen)
        ref = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
        err = rel_err(packed(x), ref)
        assert err <= 1e-5, f"{geometry}, {size}x{size}: relative error {err:.2e}"
    assert len(packed.packed) == 2


def test_packing_keeps_parameters_and_refuses_what_it_cannot_run(tiny):
    _, sd = tiny
    unet = copy.deepcopy(sd.unet)
    before = unet.state_dict()
    pack_convs(unet)
    after = unet.state_dict()
    assert list(after) == list(before)   # same keys, same order: state_dict and loading are unchanged
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before)   # the very same tensors
    n_conv = sum(type(m) is nn.Conv2d for m in sd.unet.modules())
    assert sum(isinstance(m, PackedConv2d) for m in unet.modules()) == n_conv > 0
    assert not any(type(m) is nn.Conv2d for m in unet.modules())
    half = copy.deepcopy(sd.vae).half()
    assert not can_pack(half)
    with pytest.raises(ValueError, match="cannot pack conv weights on cpu in torch.float16"):
        pack_convs(half)
    for conv in (nn.Conv2d(4, 4, 3, padding="same"), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")):
        with pytest.raises(ValueError, match="only numeric zero padding can be packed"):
            PackedConv2d(conv)


@torch.no_grad()
def test_packed_networks_equal_diffusers(tiny):
    refs, sd = tiny
    unet, vae = pack_convs(copy.deepcopy(sd.unet)), pack_convs(copy.deepcopy(sd.vae))
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([999.0, 417.25])
    err = rel_err(unet(x, t, context), refs["unet"](x, t, encoder_hidden_states=context).sample)
    assert err <= 1e-4, f"packed UNet: relative error {err:.2e}"
    images = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
    mean = vae.encode(images)[0]
    err = rel_err(mean, refs["vae"].encode(images).latent_dist.mean)
    assert err <= 1e-4, f"packed VAE encode: relative error {err:.2e}"
    err = rel_err(vae.decode(mean), refs["vae"].decode(mean).sample)
    assert err <= 1e-4, f"packed VAE decode: relative error {err:.2e}"
