"""Make the tiny Wan2.1 parity fixture with PyTorch + diffusers (CPU).

Writes tests/fixtures/wan_tiny/:
  diffusers/config.json, diffusers/diffusion_pytorch_model.safetensors
      a random tiny `WanTransformer3DModel` in diffusers' layout;
  original/diffusion_pytorch_model.safetensors, original/config.json
      the same weights in the original Wan2.1 key layout (checked against
      diffusers' own original->diffusers converter);
  io.npz: inputs (x [B, C, T, H, W], per-frame RF time t [B, T], context) and
      diffusers' output, float32.

Run (needs torch and diffusers, not needed by the tests):
  python scripts/make_wan_fixture.py [--out tests/fixtures/wan_tiny]
"""

import argparse
import json
import os

import numpy as np
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=128,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

# diffusers name fragment -> original Wan2.1 name fragment (applied in order).
TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"),
    ("attn2", "cross_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("norm2", "norm3"),  # diffusers' cross-attention norm is the original's norm3
]


def to_original(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    if key.startswith("proj_out"):
        return key.replace("proj_out", "head.head")
    for a, b in TO_ORIGINAL:
        key = key.replace(a, b)
    return key.replace("scale_shift_table", "modulation")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "wan_tiny"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model = WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():  # random everything, norms included, so no weight can hide
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))

    b, c, t, h, w = 2, 4, 3, 8, 12
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(b, c, t, h, w, generator=g)
    t_frame = torch.rand(b, t, generator=g)
    t_frame[0, 0] = 0.0  # a clean context frame
    context = torch.randn(b, 8, TINY["text_dim"], generator=g)
    tokens_per_frame = (h // 2) * (w // 2)
    timestep = (1000.0 * t_frame).repeat_interleave(tokens_per_frame, dim=1)  # per token [B, L]
    with torch.no_grad():
        out = model(x, timestep, context, return_dict=False)[0]

    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    ddir, odir = os.path.join(args.out, "diffusers"), os.path.join(args.out, "original")
    os.makedirs(ddir, exist_ok=True)
    os.makedirs(odir, exist_ok=True)
    model.save_config(ddir)
    save_file(sd, os.path.join(ddir, "diffusion_pytorch_model.safetensors"))

    original = {to_original(k): v for k, v in sd.items()}
    back = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in original.items()})
    assert set(back) == set(sd), sorted(set(back) ^ set(sd))
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    save_file(original, os.path.join(odir, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(odir, "config.json"), "w") as f:
        json.dump(
            dict(
                model_type="t2v",
                patch_size=[1, 2, 2],
                text_len=8,
                in_dim=c,
                dim=64,
                ffn_dim=128,
                freq_dim=32,
                text_dim=32,
                out_dim=c,
                num_heads=4,
                num_layers=2,
                eps=1e-6,
            ),
            f,
            indent=1,
        )

    np.savez_compressed(
        os.path.join(args.out, "io.npz"), x=x.numpy(), t=t_frame.numpy(), context=context.numpy(), out=out.numpy()
    )
    print("wrote", os.path.abspath(args.out), "output norm", float(out.norm()))


if __name__ == "__main__":
    main()
