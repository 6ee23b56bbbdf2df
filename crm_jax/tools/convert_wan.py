"""Convert Wan2.1 transformer checkpoints between layouts (local files only).

  python -m crm_jax.tools.convert_wan --src DIR --dst DIR [--to nnx|diffusers|original]

The source layout is detected: diffusers (`WanTransformer3DModel`), original
Wan2.1, or a crm_jax NNX (Orbax) checkpoint. A missing, partial or mismatched
checkpoint stops with an error naming the keys and shapes; nothing is written then.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from crm_jax.models import convert


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="source checkpoint directory")
    ap.add_argument("--dst", required=True, help="destination directory (must not exist or be empty)")
    ap.add_argument("--to", default="nnx", choices=["nnx", "diffusers", "original"])
    ap.add_argument("--text_len", type=int, default=None, help="text tokens (default: from config, else 512)")
    args = ap.parse_args(argv)

    if os.path.exists(args.dst) and os.listdir(args.dst):
        print(f"error: destination {args.dst!r} exists and is not empty; refusing to overwrite", file=sys.stderr)
        return 2
    overrides = {} if args.text_len is None else {"text_len": args.text_len}
    t0 = time.time()
    try:
        model = convert.load_any(args.src, **overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.to == "nnx":
        convert.save_nnx(model, args.dst)
    else:
        convert.save_wan(model, args.dst, layout=args.to)
    cfg = model.cfg
    print(
        f"converted {args.src} -> {args.dst} ({args.to}): {cfg.num_layers} layers, dim {cfg.dim}, "
        f"{cfg.num_heads} heads in {time.time() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
