"""Convert externally produced latent/embedding files into a crm_jax ArrayRecord dataset.

    python -m crm_jax.data.external --src=DIR --out=DATASET_DIR [--samples_per_shard=64]
        [--dtype=bfloat16] [--text_len=512] [--negative=FILE]

Input layout (the Wan2.1 synthetic-data layout, one file per sample, sorted by file name;
sample id = position in that order):

* ``DIR/*.npz`` with arrays ``latent [C, T, H, W]`` (channels first; Wan2.1 T2V 480p:
  ``[16, 21, 60, 104]``), ``prompt_embed [L, D]`` (umT5: ``[512, 4096]``), optional
  ``prompt`` (0-d string array) and ``actions [T]`` (int); or
* ``DIR/*.safetensors`` with tensors ``latent``, ``prompt_embed``, optional ``actions`` and the
  prompt text in the header metadata (``__metadata__ = {"prompt": "..."}``).

(``.pt`` files: convert them to one of these first, e.g. ``safetensors.torch.save_file``;
torch is not a dependency.)

Output: the dataset layout of ``crm_jax.data.dataset`` with channels-last ``latents [T, H, W, C]``,
``context [L, D]`` (zero-padded to ``--text_len`` when shorter, as Wan pads umT5 outputs),
optional ``actions``, and the text fields ``prompt`` and ``file``. ``--negative`` stores the
negative-prompt embedding for CFG. Conversion is sharded over hosts and resumable like generation.
Every input file is checked; a bad one raises ``ValueError`` naming it.
"""

from __future__ import annotations

import glob
import hashlib
import os

import numpy as np

from crm_jax.data import dataset as ds

EXTENSIONS = (".npz", ".safetensors")


def list_samples(src: str) -> list[str]:
    """Sorted per-sample files of ``src`` (one extension only)."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source directory {src!r} does not exist")
    files = {ext: sorted(glob.glob(os.path.join(src, "*" + ext))) for ext in EXTENSIONS}
    found = {k: v for k, v in files.items() if v}
    if not found:
        raise ValueError(f"{src!r} holds no per-sample {' or '.join(EXTENSIONS)} files")
    if len(found) > 1:
        raise ValueError(f"{src!r} mixes {sorted(found)} files; keep one format per directory")
    return next(iter(found.values()))


def read_sample(path: str) -> tuple[dict[str, np.ndarray], str]:
    """``({"latent", "prompt_embed", ["actions"]}, prompt)`` of one file; ValueError names it."""
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: np.asarray(z[k]) for k in z.files if k != "prompt"}
                prompt = str(z["prompt"]) if "prompt" in z.files else ""
        else:
            from safetensors import safe_open

            arrays = {}
            try:
                with safe_open(path, framework="numpy") as f:
                    prompt = (f.metadata() or {}).get("prompt", "")
                    for k in f.keys():
                        arrays[k] = f.get_tensor(k)
            except TypeError:  # bfloat16 has no numpy dtype in safetensors' numpy backend
                with safe_open(path, framework="flax") as f:
                    prompt = (f.metadata() or {}).get("prompt", "")
                    arrays = {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"cannot read sample file {path!r}: {e}") from e
    for k in ("latent", "prompt_embed"):
        if k not in arrays:
            raise ValueError(
                f"sample file {path!r} has no {k!r} (has {sorted(arrays)}); expected "
                f"latent [C, T, H, W] and prompt_embed [L, D]"
            )
    if arrays["latent"].ndim != 4:
        raise ValueError(f"sample file {path!r}: latent must be [C, T, H, W], got {list(arrays['latent'].shape)}")
    if arrays["prompt_embed"].ndim != 2:
        raise ValueError(f"sample file {path!r}: prompt_embed must be [L, D], got {list(arrays['prompt_embed'].shape)}")
    return arrays, prompt


def to_record(
    i: int, path: str, arrays: dict, prompt: str, feats: dict, text_len: int, dtype, num_actions: int = 0
) -> dict:
    """One output example: channels-last latents, padded context, checked against ``feats``."""
    lat = np.moveaxis(arrays["latent"], 0, -1)  # [C, T, H, W] -> [T, H, W, C]
    ctx = arrays["prompt_embed"]
    if ctx.shape[0] > text_len:
        raise ValueError(f"sample file {path!r}: prompt_embed has {ctx.shape[0]} tokens > text_len {text_len}")
    ctx = np.pad(ctx, ((0, text_len - ctx.shape[0]), (0, 0)))
    rec = {
        "id": np.asarray(i, np.int64),
        "latents": lat.astype(dtype or lat.dtype),
        "context": ctx.astype(dtype or ctx.dtype),
    }
    if "actions" in feats:
        if "actions" not in arrays:
            raise ValueError(f"sample file {path!r} has no 'actions' but the first sample has")
        rec["actions"] = arrays["actions"].astype(np.int32)
        if rec["actions"].size and (rec["actions"].min() < 0 or rec["actions"].max() >= num_actions):
            raise ValueError(f"sample file {path!r}: action ids must be in [0, {num_actions})")
    for k, f in feats.items():
        if list(rec[k].shape) != list(f.shape) or ds.dtype_name(rec[k].dtype) != f.dtype:
            raise ValueError(
                f"sample file {path!r}: {k} is {ds.dtype_name(rec[k].dtype)}{list(rec[k].shape)} "
                f"after conversion, the first sample's is {f.dtype}{list(f.shape)}"
            )
    return {**rec, "prompt": prompt, "file": os.path.basename(path)}


def convert(
    src: str,
    out: str,
    *,
    samples_per_shard: int = 64,
    dtype: str | None = None,
    text_len: int | None = None,
    negative: str | None = None,
    num_actions: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    progress: bool = True,
) -> dict:
    """Convert the per-sample files of ``src`` into the dataset directory ``out`` (resumable).

    Args:
      dtype: storage dtype of latents/context (default: as in the files).
      text_len: pad ``prompt_embed`` to this many tokens (default: the first file's length).
      negative: file (same formats) whose ``prompt_embed`` is CFG's negative-prompt embedding.
      num_actions: action vocabulary size (required when the files hold ``actions``).
    Returns ``{"written", "complete"}``.
    """
    files = list_samples(src)
    first, _ = read_sample(files[0])
    dt = None if dtype is None else ds.dtype_from_name(dtype)
    lat_dt = ds.dtype_name(dt or first["latent"].dtype)
    ctx_dt = ds.dtype_name(dt or first["prompt_embed"].dtype)
    C, T, H, W = first["latent"].shape
    L = int(text_len or first["prompt_embed"].shape[0])
    feats = {
        "id": ds.Feature((), "int64"),
        "latents": ds.Feature((T, H, W, C), lat_dt),
        "context": ds.Feature((L, first["prompt_embed"].shape[1]), ctx_dt),
    }
    extra = {"num_actions": 0}
    if "actions" in first:
        if not num_actions:
            raise ValueError(f"{files[0]!r} has actions: pass num_actions (the action vocabulary size)")
        feats["actions"] = ds.Feature((T,), "int32")
        extra["num_actions"] = int(num_actions)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{os.path.basename(f)}:{os.path.getsize(f)}\n".encode())
    source = {
        "kind": "external",
        "src": os.path.abspath(src),
        "files": len(files),
        "files_sha256": h.hexdigest(),
        "layout": "per-sample latent [C, T, H, W] + prompt_embed [L, D]",
    }
    meta = ds.make_metadata(
        num_samples=len(files),
        samples_per_shard=samples_per_shard,
        features=feats,
        text_fields=["prompt", "file"],
        source=source,
        extra=extra,
    )
    neg = None
    if negative:
        neg_arrays, _ = read_sample_embed(negative)
        neg = (
            np.pad(neg_arrays, ((0, L - neg_arrays.shape[0]), (0, 0))).astype(ctx_dt)
            if neg_arrays.shape[0] <= L
            else None
        )
        if neg is None or neg.shape != feats["context"].shape:
            raise ValueError(
                f"negative embedding {negative!r} is {list(neg_arrays.shape)}, "
                f"expected at most [{L}, {feats['context'].shape[1]}]"
            )
    writer = ds.ShardWriter(out, meta, process_index, process_count)
    if neg is not None:
        writer.write_negative_context(neg)

    def make(i):
        arrays, prompt = read_sample(files[i])
        return to_record(i, files[i], arrays, prompt, feats, L, dt, extra["num_actions"])

    n = ds.write_records(writer, make, progress=progress, desc=f"convert (host {writer.pi}/{writer.pc})")
    return {"written": n, "complete": writer.finalize()}


def read_sample_embed(path: str) -> tuple[np.ndarray, str]:
    """``prompt_embed [L, D]`` (and prompt) of a negative-prompt file (``.npz``/``.safetensors``)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"negative embedding file {path!r} does not exist")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                return np.asarray(z["prompt_embed"]), str(z["prompt"]) if "prompt" in z.files else ""
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            return f.get_tensor("prompt_embed"), (f.metadata() or {}).get("prompt", "")
    except Exception as e:
        raise ValueError(f"cannot read 'prompt_embed' from {path!r}: {e}") from e


def main(argv):
    from absl import flags

    del argv
    F = flags.FLAGS
    res = convert(
        F.src,
        F.out,
        samples_per_shard=F.samples_per_shard,
        dtype=F.dtype,
        text_len=F.text_len,
        negative=F.negative,
        num_actions=F.num_actions,
    )
    print(f"wrote {res['written']} shard(s) to {F.out}: {'complete' if res['complete'] else 'incomplete'}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("src", None, "directory of per-sample .npz / .safetensors files")
    flags.DEFINE_string("out", None, "output dataset directory (resumed if it exists)")
    flags.DEFINE_integer("samples_per_shard", 64, "samples per ArrayRecord shard")
    flags.DEFINE_string("dtype", None, "storage dtype of latents/context (default: as stored)")
    flags.DEFINE_integer("text_len", None, "pad prompt_embed to this many tokens")
    flags.DEFINE_string("negative", None, "file with the negative prompt's prompt_embed")
    flags.DEFINE_integer("num_actions", None, "action vocabulary size (files with actions)")
    flags.mark_flags_as_required(["src", "out"])
    app.run(main)
