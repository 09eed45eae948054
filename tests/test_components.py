"""Each network equals its reference (diffusers UNet2DConditionModel / AutoencoderKL, transformers
CLIPTextModel) on identical random weights: tiny configs with SD2's block structure here, full size in
test_full_size.py.

Tolerance: max abs error <= 1e-4 of the output's scale in fp32. Both sides compute the same operations in a
different order (fused vs split projections, SDPA vs explicit softmax), so agreement is to float32 rounding
accumulated over the network's depth -- measured 1e-7..1e-6 here; 1e-4 leaves room for other CPUs while
any real mistake (a swapped norm, a wrong eps, sin/cos order, a missing block) gives errors of 1e-3..1.
"""

from dataclasses import replace

import torch
import torch.nn.functional as F

from conftest import rel_err

TOL = 1e-4


@torch.no_grad()
def test_unet_matches_diffusers(tiny):
    refs, sd = tiny
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 77, 32, generator=gen)
    for t in (torch.tensor([999.0, 0.0]), torch.tensor([417.25, 3.5])):   # fractional t, as samplers give
        ref = refs["unet"](x, t, encoder_hidden_states=context).sample
        err = rel_err(sd.unet(x, t, context), ref)
        assert err <= TOL, f"UNet relative error {err:.2e} at t={t.tolist()}"


@torch.no_grad()
def test_unet_scalar_timestep_broadcasts(tiny):
    _, sd = tiny
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    torch.testing.assert_close(sd.unet(x, 500, context), sd.unet(x, torch.tensor([500.0, 500.0]), context))


@torch.no_grad()
def test_vae_matches_diffusers(tiny):
    refs, sd = tiny
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    dist = refs["vae"].encode(images).latent_dist
    mean, logvar = sd.vae.encode(images)
    assert rel_err(mean, dist.mean) <= TOL and rel_err(logvar, dist.logvar) <= TOL
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    err = rel_err(sd.vae.decode(z), refs["vae"].decode(z).sample)
    assert err <= TOL, f"VAE decode relative error {err:.2e}"


@torch.no_grad()
def test_text_tower_matches_transformers(tiny):
    refs, sd = tiny
    ids = torch.randint(0, 1000, (3, 77), generator=torch.Generator().manual_seed(3))
    ids[:, 10:] = 0    # SD2 pads with id 0 and conditions on every position, padding included
    ref = refs["text"](input_ids=ids).last_hidden_state
    err = rel_err(sd.text.tower(ids), ref)
    assert err <= TOL, f"text tower relative error {err:.2e}"
    # token embeddings in, same result: the path textual inversion uses
    err = rel_err(sd.text.tower.forward_embeddings(sd.text.tower.token_embedding(ids)), ref)
    assert err <= TOL


@torch.no_grad()
def test_causal_mask_is_applied(tiny):
    """Changing a later token must not change earlier positions (and must change the later ones)."""
    _, sd = tiny
    ids = torch.randint(1, 1000, (1, 77), generator=torch.Generator().manual_seed(4))
    other = ids.clone()
    other[0, 40] = (ids[0, 40] + 1) % 1000
    a, b = sd.text.tower(ids), sd.text.tower(other)
    assert torch.equal(a[:, :40], b[:, :40]) and not torch.allclose(a[:, 40:], b[:, 40:])


def test_upcast_attention_option():
    """SD2.1-v's fp32 attention: the config flag reaches every attention layer, and an upcast product of
    half-precision inputs equals the fp32 product rounded once to the output dtype (bf16: 2**-8 relative)."""
    from minisd.attention import CrossAttention, attention
    from minisd.unet import UNetConfig, UNetModel
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1,), num_head_channels=16,
                     context_dim=32)
    for flag in (True, False):
        layers = [m for m in UNetModel(replace(cfg, upcast_attention=flag)).modules()
                  if isinstance(m, CrossAttention)]
        assert layers and all(m.upcast == flag for m in layers)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 64, 64, generator=gen) * 4 for _ in range(3))
    half = [t.bfloat16() for t in (q, k, v)]
    exact = attention(*(t.float() for t in half), heads=4)
    upcast = attention(*half, heads=4, upcast=True)
    assert upcast.dtype == torch.bfloat16
    assert torch.equal(upcast, exact.bfloat16())


@torch.no_grad()
def test_conv1x1_is_sd1s_projection():
    """SD1's SpatialTransformer projects with 1x1 convs (ldm attention.py, use_linear=False). Conv1x1 must store
    what SD1 checkpoints store -- proj_in/proj_out weight [C, C, 1, 1] and bias [C], as in SD1's
    `model.diffusion_model.input_blocks.1.1.proj_in.weight` [320, 320, 1, 1] -- and compute what that 1x1 conv
    computes on the image before flattening (ldm: proj_in, then rearrange 'b c h w -> b (h w) c').
    Tolerance: fp32 rounding of a 64-term dot product computed by two kernels (conv vs matmul), 1e-5 relative."""
    from minisd.attention import Conv1x1, SpatialTransformer
    gen = torch.Generator().manual_seed(0)
    block = SpatialTransformer(64, 16, 1, 32, use_linear=False, upcast=False)
    for p in block.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items() if k.startswith("proj_")}
    assert shapes == {"proj_in.weight": (64, 64, 1, 1), "proj_in.bias": (64,),
                      "proj_out.weight": (64, 64, 1, 1), "proj_out.bias": (64,)}
    assert isinstance(block.proj_in, Conv1x1) and isinstance(block.proj_in, torch.nn.Conv2d)
    x = torch.randn(2, 64, 8, 8, generator=gen)
    # the 1x1 conv as SD1 runs it, on [B, C, H, W]: torch's own conv kernel, then flattened to tokens
    reference = F.conv2d(x, block.proj_in.weight, block.proj_in.bias).flatten(2).transpose(1, 2)
    assert rel_err(block.proj_in(x.flatten(2).transpose(1, 2)), reference) <= 1e-5
    # the whole block equals the Linear variant with the same numbers: the projection is the only difference
    linear = SpatialTransformer(64, 16, 1, 32, use_linear=True, upcast=False)
    linear.load_state_dict({k: v.flatten(1) if k.endswith("proj_in.weight") or k.endswith("proj_out.weight")
                            else v for k, v in block.state_dict().items()})
    context = torch.randn(2, 77, 32, generator=gen)
    assert rel_err(block(x, context), linear(x, context)) <= 1e-5
