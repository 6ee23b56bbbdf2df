"""Make the tiny Wan2.1 VAE parity fixture with PyTorch + diffusers (CPU).

Writes tests/fixtures/wan_vae_tiny/:
  diffusers/config.json, diffusers/diffusion_pytorch_model.safetensors
      a random tiny `AutoencoderKLWan` (base_dim 6, z_dim 4, dim_mult [1, 2, 2, 2],
      1 res block, temperal_downsample [False, True, True] like Wan2.1) in
      diffusers' layout; it matches `crm_jax.models.vae.TINY_VAE`;
  original/Wan2.1_VAE.safetensors, original/Wan2.1_VAE.pth
      the same weights under the original Wan2.1 key names (`encoder.conv1`,
      `decoder.upsamples.N.residual.2`, `conv1`/`conv2` for (post_)quant_conv, ...),
      as safetensors and as a torch zip pickle. The renaming is checked against
      diffusers' own `convert_wan_vae_to_diffusers` on a 2-res-block model
      (that converter hard-codes Wan2.1's block indices);
  io.npz (float32, PyTorch layout [B, C, T, H, W]):
      video [1, 3, 9, 16, 24] in [-1, 1] and diffusers' posterior `mean`/`logvar`
      [1, 4, 3, 2, 3] of it (encode: first frame, then 4-frame chunks);
      z [1, 4, 3, 3, 4] random latents and `decoded` [1, 3, 9, 24, 32], diffusers' decode.

Run (needs torch and diffusers; the tests need neither):
  /tmp/torch_venv/bin/python scripts/make_vae_fixture.py [--out tests/fixtures/wan_vae_tiny]
"""

import argparse
import os

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import save_file

TINY = dict(
    base_dim=6,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    latents_mean=[0.1, -0.2, 0.3, -0.4],
    latents_std=[1.5, 0.5, 2.0, 1.0],
)

_RESIDUAL = {
    "norm1.gamma": "residual.0.gamma",
    "conv1": "residual.2",
    "norm2.gamma": "residual.3.gamma",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}


def _residual(rest: str) -> str:
    for a, b in _RESIDUAL.items():
        if rest.startswith(a):
            return b + rest[len(a) :]
    return rest


def to_original(key: str, num_res_blocks: int) -> str:
    """diffusers AutoencoderKLWan key -> original Wan2.1 key."""
    head = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}
    for a, b in head.items():
        if key.startswith(a):
            return b + key[len(a) :]
    part, rest = key.split(".", 1)  # encoder / decoder
    if rest.startswith("conv_in."):
        return f"{part}.conv1." + rest[len("conv_in.") :]
    if rest.startswith("norm_out."):
        return f"{part}.head.0." + rest[len("norm_out.") :]
    if rest.startswith("conv_out."):
        return f"{part}.head.2." + rest[len("conv_out.") :]
    if rest.startswith("mid_block."):
        _, kind, idx, sub = rest.split(".", 3)
        slot = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{kind}.{idx}"]
        return f"{part}.middle.{slot}." + (_residual(sub) if kind == "resnets" else sub)
    if rest.startswith("down_blocks."):
        _, idx, sub = rest.split(".", 2)
        return f"{part}.downsamples.{idx}." + _residual(sub)
    if rest.startswith("up_blocks."):
        _, level, kind, idx, sub = rest.split(".", 4)
        base = int(level) * (num_res_blocks + 2)
        if kind == "resnets":
            return f"{part}.upsamples.{base + int(idx)}." + _residual(sub)
        return f"{part}.upsamples.{base + num_res_blocks + 1}.{sub}"  # upsamplers.0
    raise KeyError(key)


def randomize(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():  # random norms and biases too, so no weight can hide
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))


def check_renaming_against_diffusers():
    """Our original key names, fed to diffusers' converter, give back the diffusers keys."""
    model = AutoencoderKLWan(base_dim=4, z_dim=4, num_res_blocks=2, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    sd = model.state_dict()
    original = {to_original(k, 2): v for k, v in sd.items()}
    assert len(original) == len(sd)
    back = convert_wan_vae_to_diffusers(original)
    assert set(back) == set(sd), sorted(set(back) ^ set(sd))
    assert all(back[k] is original[to_original(k, 2)] for k in sd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "wan_vae_tiny"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    check_renaming_against_diffusers()

    torch.manual_seed(args.seed)
    model = AutoencoderKLWan(**TINY).eval()
    randomize(model, args.seed)

    g = torch.Generator().manual_seed(args.seed + 1)
    video = torch.rand(1, 3, 9, 16, 24, generator=g) * 2 - 1
    z = torch.randn(1, TINY["z_dim"], 3, 3, 4, generator=g)
    with torch.no_grad():
        post = model.encode(video).latent_dist
        decoded = model.decode(z).sample
    assert decoded.shape == (1, 3, 9, 24, 32), decoded.shape

    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    ddir, odir = os.path.join(args.out, "diffusers"), os.path.join(args.out, "original")
    os.makedirs(ddir, exist_ok=True)
    os.makedirs(odir, exist_ok=True)
    model.save_config(ddir)
    save_file(sd, os.path.join(ddir, "diffusion_pytorch_model.safetensors"))
    original = {to_original(k, TINY["num_res_blocks"]): v for k, v in sd.items()}
    save_file(original, os.path.join(odir, "Wan2.1_VAE.safetensors"))
    torch.save(original, os.path.join(odir, "Wan2.1_VAE.pth"))

    np.savez_compressed(
        os.path.join(args.out, "io.npz"),
        video=video.numpy(),
        mean=post.mean.numpy(),
        logvar=post.logvar.numpy(),
        z=z.numpy(),
        decoded=decoded.numpy(),
    )
    n = sum(v.numel() for v in sd.values())
    print(
        "wrote",
        os.path.abspath(args.out),
        f"{n} parameters; decoded std {float(decoded.std()):.3f}, mean std {float(post.mean.std()):.3f}",
    )


if __name__ == "__main__":
    main()
