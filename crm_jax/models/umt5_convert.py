"""umT5 encoder checkpoints -> our NNX `UMT5Encoder` (local files only).

Two layouts are understood:
  * transformers (`UMT5EncoderModel`, e.g. the `text_encoder/` of a diffusers Wan
    pipeline): a directory with `config.json` and `model.safetensors` (or shards with
    an index, or `pytorch_model*.bin`), keys like
    `encoder.block.3.layer.0.SelfAttention.q.weight`, `shared.weight` /
    `encoder.embed_tokens.weight`, `encoder.final_layer_norm.weight`. Decoder and
    LM-head weights of a full seq2seq checkpoint (`decoder.*`, `lm_head.*`) are skipped.
  * original Wan2.1 (`wan/modules/t5.py` `T5Encoder`): `models_t5_umt5-xxl-enc-bf16.pth`
    (read without torch) or a `.safetensors` with the same keys, or a directory holding
    one: `token_embedding.weight`, `blocks.N.norm1.weight`, `blocks.N.attn.{q,k,v,o}.weight`,
    `blocks.N.pos_embedding.embedding.weight`, `blocks.N.norm2.weight`,
    `blocks.N.ffn.gate.0.weight` (= wi_0), `blocks.N.ffn.fc1.weight` (= wi_1),
    `blocks.N.ffn.fc2.weight` (= wo), `norm.weight`. Its config is inferred from the shapes
    (max_distance 128, eps 1e-6).

Anything missing, unexpected or of the wrong shape is a ValueError that names the keys
and shapes; weights are never silently left at random init.
"""

from __future__ import annotations

import glob
import json
import os
import re

import jax
import numpy as np
from flax import nnx

from crm_jax.models.convert import indexed_shards, read_safetensors_dir, with_non_params
from crm_jax.models.param_assembly import assemble_params
from crm_jax.models.torch_checkpoint import load_torch_state_dict
from crm_jax.models.umt5 import UMT5Config, UMT5Encoder

TORCH_EXTS = (".pth", ".pt", ".bin")
SKIPPED_PREFIXES = ("decoder.", "lm_head.")  # the rest of a full umT5 seq2seq checkpoint

# original Wan2.1 name (block-relative) -> transformers name (block-relative)
_ORIGINAL_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
# transformers name (block-relative) -> (our path below `blocks`, kind)
_BLOCK = {
    "layer.0.layer_norm.weight": (("norm1", "weight"), "plain"),
    "layer.0.SelfAttention.q.weight": (("attn", "q", "kernel"), "linear"),
    "layer.0.SelfAttention.k.weight": (("attn", "k", "kernel"), "linear"),
    "layer.0.SelfAttention.v.weight": (("attn", "v", "kernel"), "linear"),
    "layer.0.SelfAttention.o.weight": (("attn", "o", "kernel"), "linear"),
    "layer.0.SelfAttention.relative_attention_bias.weight": (("attn", "rel_bias"), "plain"),
    "layer.1.layer_norm.weight": (("norm2", "weight"), "plain"),
    "layer.1.DenseReluDense.wi_0.weight": (("ffn", "wi_0", "kernel"), "linear"),
    "layer.1.DenseReluDense.wi_1.weight": (("ffn", "wi_1", "kernel"), "linear"),
    "layer.1.DenseReluDense.wo.weight": (("ffn", "wo", "kernel"), "linear"),
}
_TOP = {
    "shared.weight": ("token_embedding",),
    "encoder.embed_tokens.weight": ("token_embedding",),
    "encoder.final_layer_norm.weight": ("norm", "weight"),
}
_BLOCK_RE = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")
_ORIG_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith(("encoder.", "shared.")) for k in keys):
        return "transformers"
    if any(k.startswith(("blocks.", "token_embedding.")) for k in keys):
        return "original"
    raise ValueError(f"unrecognised umT5 checkpoint layout (first keys: {keys[:5]})")


def original_to_transformers_key(key: str) -> str:
    """Wan2.1 T5Encoder key -> transformers UMT5EncoderModel key (unknown keys pass through)."""
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    m = _ORIG_BLOCK_RE.match(key)
    if m and m.group(2) in _ORIGINAL_BLOCK:
        return f"encoder.block.{m.group(1)}.{_ORIGINAL_BLOCK[m.group(2)]}"
    return key


# ----------------------------------------------------------------- configs
def config_from_transformers(c: dict, **overrides) -> UMT5Config:
    proj = c.get("feed_forward_proj", "gated-gelu")
    if proj not in ("gated-gelu", "gated-gelu_new"):
        raise ValueError(f"config.json: feed_forward_proj={proj!r} is not supported (umT5 uses 'gated-gelu')")
    try:
        return UMT5Config(
            vocab_size=c["vocab_size"],
            d_model=c["d_model"],
            d_kv=c["d_kv"],
            d_ff=c["d_ff"],
            num_layers=c["num_layers"],
            num_heads=c["num_heads"],
            num_buckets=c.get("relative_attention_num_buckets", 32),
            max_distance=c.get("relative_attention_max_distance", 128),
            eps=c.get("layer_norm_epsilon", 1e-6),
        ).replace(**overrides)
    except KeyError as e:
        raise ValueError(f"config.json lacks {e.args[0]!r}: not a umT5/T5 encoder config") from None


def config_from_shapes(sd: dict, **overrides) -> UMT5Config:
    """Infer the config of a transformers-keyed state dict from its shapes."""

    def shape(k):
        if k not in sd:
            raise ValueError(f"cannot infer the umT5 config: {k!r} is missing from the checkpoint")
        return tuple(sd[k].shape)

    emb = "shared.weight" if "shared.weight" in sd else "encoder.embed_tokens.weight"
    vocab, d_model = shape(emb)
    blocks = {int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))}
    p = "encoder.block.0.layer."
    buckets, heads = shape(p + "0.SelfAttention.relative_attention_bias.weight")
    inner, _ = shape(p + "0.SelfAttention.q.weight")
    d_ff, _ = shape(p + "1.DenseReluDense.wi_0.weight")
    return UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=max(blocks) + 1,
        num_heads=heads,
        num_buckets=buckets,
    ).replace(**overrides)


# ----------------------------------------------------------------- key mapping
def transformers_to_params(sd: dict, cfg: UMT5Config) -> dict:
    """transformers state dict (numpy) -> our nested parameter dict, checked against `cfg`."""
    abstract = nnx.state(nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    expected = {path: v.shape for path, v in nnx.to_flat_state(abstract)}
    dtypes = {path: v.dtype for path, v in nnx.to_flat_state(abstract)}
    flat: dict[tuple, np.ndarray] = {}
    stacks: dict[tuple, dict[int, np.ndarray]] = {}
    unexpected = []
    if "shared.weight" in sd and "encoder.embed_tokens.weight" in sd:  # tied copies: keep one
        sd = {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
    for key, w in sd.items():
        if key.startswith(SKIPPED_PREFIXES):
            continue
        if key in _TOP:
            flat[_TOP[key]] = np.asarray(w)
            continue
        m = _BLOCK_RE.match(key)
        if not m or m.group(2) not in _BLOCK or int(m.group(1)) >= cfg.num_layers:
            unexpected.append(key)
            continue
        path, kind = _BLOCK[m.group(2)]
        w = np.asarray(w)
        stacks.setdefault(("blocks",) + path, {})[int(m.group(1))] = w.T if kind == "linear" else w
    return assemble_params(
        flat,
        stacks,
        expected,
        dtypes,
        num_layers=cfg.num_layers,
        unexpected=unexpected,
        layer_prefix="encoder.block",
        what="umT5 checkpoint does not match the encoder config",
    )


# ----------------------------------------------------------------- files
def _read_file(fn: str) -> dict:
    if fn.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(fn, framework="flax") as f:
                return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"cannot read safetensors file {fn!r}: {e}") from e
    if fn.endswith(TORCH_EXTS):
        return load_torch_state_dict(fn)
    raise ValueError(f"{fn!r}: expected a .safetensors or torch ({'/'.join(TORCH_EXTS)}) file")


def read_checkpoint(path: str) -> tuple[dict, dict | None]:
    """`(state dict, config.json dict or None)` of a umT5 checkpoint file or directory."""
    # safetensors' bf16 goes through JAX arrays: keep them on the host, not on an accelerator
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return _read_checkpoint(path)
    with jax.default_device(cpu):
        return _read_checkpoint(path)


def _read_checkpoint(path: str) -> tuple[dict, dict | None]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"umT5 checkpoint {path!r} does not exist")
    if os.path.isfile(path):
        return _read_file(path), None
    cfg_file = os.path.join(path, "config.json")
    raw = None
    if os.path.exists(cfg_file):
        with open(cfg_file) as f:
            raw = json.load(f)
    if glob.glob(os.path.join(path, "*.safetensors")):
        return read_safetensors_dir(path), raw
    torch_files = sorted(f for ext in TORCH_EXTS for f in glob.glob(os.path.join(path, "*" + ext)))
    torch_files = indexed_shards(path, "*.bin.index.json") or torch_files
    if not torch_files:
        raise FileNotFoundError(f"no *.safetensors or torch ({'/'.join(TORCH_EXTS)}) weights in {path!r}")
    sd = {}
    for fn in torch_files:
        sd.update(load_torch_state_dict(fn))
    return sd, raw


def load_umt5(path: str, cfg: UMT5Config | None = None, **overrides) -> UMT5Encoder:
    """Load a transformers- or original-layout umT5 encoder from a local file or directory.

    `cfg` defaults to the one read from `config.json` (transformers layout) or inferred
    from the weight shapes; `overrides` (e.g. dtype, param_dtype) are applied on top.
    """
    sd, raw = read_checkpoint(path)
    layout = detect_layout(sd)
    if layout == "original":
        sd = {original_to_transformers_key(k): v for k, v in sd.items()}
    if cfg is None:
        cfg = (
            config_from_transformers(raw) if (raw is not None and layout == "transformers") else config_from_shapes(sd)
        )
    cfg = cfg.replace(**overrides)
    params = transformers_to_params(sd, cfg)
    del sd
    model = nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, with_non_params(state, params))
    nnx.update(model, state)
    return model
