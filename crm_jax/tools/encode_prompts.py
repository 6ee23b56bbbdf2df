"""Encode prompts with the umT5 text encoder into the files the data pipeline reads (local files only).

  python -m crm_jax.tools.encode_prompts --encoder=DIR_OR_FILE --tokenizer=PATH --prompts=FILE.txt \
      --negative_prompt="..." --out=DIR [--max_len 512 --batch_size 8 --dtype bfloat16]

--encoder: a transformers `UMT5EncoderModel` directory (e.g. a diffusers Wan pipeline's
  `text_encoder/`) or Wan2.1's `models_t5_umt5-xxl-enc-bf16.pth` (see `umt5_convert`).
--tokenizer: google/umt5-xxl's `tokenizer.json` or a directory holding it.
--prompts: a prompt file (`crm_jax.data.prompts` format: one prompt per line, `#` comments,
  optional `| actions`; with actions every line needs the same number of them).

Writes, in `--out`:
  embeddings.npz  `context [n, max_len, d_model]` (each prompt's embeddings, zero past its
                  tokens, as Wan feeds its DiT), `prompts [n]`, `lengths [n]` (tokens incl. </s>),
                  `negative_context [max_len, d_model]`, `negative_prompt`, and `actions [n, T]`
                  if the prompt file has them. This is what `python -m crm_jax.data.generate`
                  reads with `--config.cond.kind=embeddings --config.cond.embeddings=OUT/embeddings.npz`.
  negative.npz    `prompt_embed [max_len, d_model]`, `prompt`: the negative prompt for
                  `python -m crm_jax.data.external --negative=OUT/negative.npz`.

Missing inputs are reported before any work; an existing output is not overwritten.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

EMBEDDINGS = "embeddings.npz"
NEGATIVE = "negative.npz"
# The English negative prompt of diffusers' Wan examples (Wan2.1's own default is its Chinese original).
DEFAULT_NEGATIVE = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people "
    "in the background, walking backwards"
)


def read_prompts(path: str, num_actions: int):
    """`(texts [n], actions [n, T] int32 or None)` of a prompt file."""
    from crm_jax.data.prompts import read_prompt_file

    lines = read_prompt_file(path, num_actions=num_actions)
    with_actions = [pl for pl in lines if pl.actions is not None]
    if not with_actions:
        return [pl.prompt for pl in lines], None
    if len(with_actions) != len(lines):
        bad = next(pl for pl in lines if pl.actions is None)
        raise ValueError(f"{path}:{bad.line}: no actions, but other lines have them; give all lines actions or none")
    lens = {len(pl.actions) for pl in lines}
    if len(lens) > 1:
        raise ValueError(f"{path}: lines have different numbers of actions {sorted(lens)}; use one per latent frame")
    return [pl.prompt for pl in lines], np.asarray([pl.actions for pl in lines], np.int32)


def encode_all(model, ids: np.ndarray, mask: np.ndarray, batch_size: int, store_dtype, progress: bool = True):
    """Embeddings `[n, L, d_model]` (padding zeroed) of `ids`/`mask` `[n, L]`, `batch_size` rows at a
    time (the last batch padded, so one compiled shape serves all)."""
    from tqdm import tqdm

    from crm_jax.models.umt5 import encode_fn

    f = encode_fn(model)
    n, L = ids.shape
    out = np.zeros((n, L, model.cfg.d_model), store_dtype)
    for b0 in tqdm(range(0, n, batch_size), desc="encode prompts", unit="batch", disable=not progress):
        rows = np.arange(b0, min(b0 + batch_size, n))
        pad = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
        out[rows] = np.asarray(f(ids[pad], mask[pad]))[: len(rows)].astype(store_dtype)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", required=True, help="umT5 encoder checkpoint (directory or .pth/.safetensors)")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json or a directory holding it")
    ap.add_argument("--prompts", required=True, help="prompt file (crm_jax.data.prompts format)")
    ap.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE, help="CFG's negative prompt (default: Wan's)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--max_len", type=int, default=512, help="tokens per prompt (Wan: 512)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="compute and parameter dtype of the encoder",
    )
    ap.add_argument(
        "--store_dtype", default="float32", choices=["float32", "float16"], help="dtype of the written embeddings"
    )
    ap.add_argument(
        "--num_actions",
        type=int,
        default=None,
        help="action vocabulary size, when prompt lines carry actions (default: the toy world's)",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ap.add_argument("--no_progress", action="store_true")
    args = ap.parse_args(argv)

    # ---- every check before any work
    for name, path in (("encoder", args.encoder), ("tokenizer", args.tokenizer), ("prompts", args.prompts)):
        if not os.path.exists(path):
            print(f"error: --{name} {path!r} does not exist", file=sys.stderr)
            return 1
    if args.max_len < 2 or args.batch_size < 1:
        print("error: --max_len must be >= 2 and --batch_size >= 1", file=sys.stderr)
        return 1
    from crm_jax.inputs import OutputPathError, check_output

    try:
        check_output("--out", args.out, is_dir=True)
    except OutputPathError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    targets = [os.path.join(args.out, f) for f in (EMBEDDINGS, NEGATIVE)]
    if not args.overwrite and any(os.path.exists(t) for t in targets):
        print(
            f"error: {args.out!r} already holds {EMBEDDINGS}/{NEGATIVE}; pass --overwrite to replace them",
            file=sys.stderr,
        )
        return 2
    try:
        from crm_jax.data import toy_world as tw
        from crm_jax.models.tokenizer import UMT5Tokenizer

        prompts, actions = read_prompts(args.prompts, args.num_actions or tw.NUM_ACTIONS)
        tok = UMT5Tokenizer(args.tokenizer)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    t0 = time.time()
    texts = prompts + [args.negative_prompt]
    ids, mask = tok.encode(texts, args.max_len)
    n_trunc = sum(len(t) > args.max_len - 1 for t in tok.tokenize(texts))
    if n_trunc:
        print(
            f"warning: {n_trunc} of {len(texts)} prompts (negative included) are longer than "
            f"{args.max_len - 1} tokens and were truncated",
            file=sys.stderr,
        )
    try:
        from crm_jax.models.umt5_convert import load_umt5

        model = load_umt5(args.encoder, dtype=args.dtype, param_dtype=args.dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if int(ids.max()) >= model.cfg.vocab_size:
        print(
            f"error: the tokenizer produced id {int(ids.max())} but the encoder's vocabulary has "
            f"{model.cfg.vocab_size} rows: mismatched tokenizer and encoder",
            file=sys.stderr,
        )
        return 1

    emb = encode_all(model, ids, mask, args.batch_size, np.dtype(args.store_dtype), progress=not args.no_progress)
    lengths = mask.sum(1).astype(np.int32)
    os.makedirs(args.out, exist_ok=True)
    arrays = dict(
        context=emb[:-1],
        prompts=np.asarray(prompts),
        lengths=lengths[:-1],
        negative_context=emb[-1],
        negative_prompt=np.asarray(args.negative_prompt),
    )
    if actions is not None:
        arrays["actions"] = actions
    # zero padding compresses to almost nothing; prompts are usually far shorter than 512 tokens
    _save_npz(targets[0], arrays)
    _save_npz(targets[1], dict(prompt_embed=emb[-1], prompt=np.asarray(args.negative_prompt)))
    print(
        f"encoded {len(prompts)} prompts + the negative prompt -> {targets[0]} "
        f"[{len(prompts)}, {args.max_len}, {model.cfg.d_model}] {args.store_dtype} in {time.time() - t0:.1f}s; "
        f"use --config.cond.kind=embeddings --config.cond.embeddings={targets[0]}"
    )
    return 0


def _save_npz(path: str, arrays: dict) -> None:
    """Write atomically: an interrupted run leaves no half-written file behind."""
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
