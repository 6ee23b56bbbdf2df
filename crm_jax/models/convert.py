"""Wan2.1 transformer checkpoints <-> our NNX parameters.

Two public layouts are understood, read from a local directory only:
  * diffusers (`WanTransformer3DModel`): `config.json` + `diffusion_pytorch_model*.safetensors`
    (single file or sharded with an index);
  * original Wan2.1: `config.json` + `*.safetensors` with keys like
    `blocks.0.self_attn.q.weight`, `head.head.weight`.

Anything missing, unexpected or of the wrong shape is a ValueError that names
the keys and shapes; weights are never silently left at random init.
"""

from __future__ import annotations

import glob
import json
import os
import re

import jax
import numpy as np
from einops import rearrange
from flax import nnx

from crm_jax.models.config import WanConfig
from crm_jax.models.param_assembly import assemble_params
from crm_jax.models.wan import WanModel

WEIGHTS = "diffusion_pytorch_model.safetensors"

# Original Wan2.1 name fragment -> diffusers name fragment, applied in order.
_ORIGINAL_TO_DIFFUSERS = [
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("self_attn", "attn1"),
    ("cross_attn", "attn2"),
    (".o.", ".to_out.0."),
    (".q.", ".to_q."),
    (".k.", ".to_k."),
    (".v.", ".to_v."),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("norm3", "norm2"),  # the original's cross-attention norm is diffusers' norm2
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
]


# Beyond Wan2.1: what this project's models add (text length, action embedding, MeanFlow's interval
# embedding) rides along in the diffusers/original layouts as a `crm_jax` entry of config.json and
# as weights named `crm_jax.<our parameter path>`; Wan2.1 readers ignore both.
EXTRA_CONFIG = "crm_jax"
EXTRA_PREFIX = "crm_jax."


def original_to_diffusers_key(key: str) -> str:
    if key.startswith(EXTRA_PREFIX):
        return key
    key = key.removeprefix("model.diffusion_model.")
    for a, b in _ORIGINAL_TO_DIFFUSERS:
        key = key.replace(a, b)
    return key


def diffusers_to_original_key(key: str) -> str:
    if key.startswith(EXTRA_PREFIX):
        return key
    if key == "scale_shift_table":
        return "head.modulation"
    if key.startswith("proj_out."):
        return "head.head." + key.removeprefix("proj_out.")
    for b, a in reversed(_ORIGINAL_TO_DIFFUSERS[:-3]):
        key = key.replace(a, b)
    return key.replace("scale_shift_table", "modulation")


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith("condition_embedder.") for k in keys):
        return "diffusers"
    if any(".self_attn." in k or k.startswith(("head.", "model.diffusion_model.")) for k in keys):
        return "original"
    raise ValueError(f"unrecognised Wan checkpoint layout (first keys: {keys[:5]})")


# ----------------------------------------------------------------- configs
def _extra_config(c: dict) -> dict:
    return {k: c[EXTRA_CONFIG][k] for k in ("text_len", "num_actions", "mean_flow") if k in c.get(EXTRA_CONFIG, {})}


def config_from_diffusers(c: dict, **overrides) -> WanConfig:
    return WanConfig(
        dim=c["num_attention_heads"] * c["attention_head_dim"],
        ffn_dim=c["ffn_dim"],
        num_heads=c["num_attention_heads"],
        num_layers=c["num_layers"],
        in_channels=c["in_channels"],
        out_channels=c.get("out_channels") or c["in_channels"],
        patch_size=tuple(c["patch_size"]),
        text_dim=c["text_dim"],
        freq_dim=c["freq_dim"],
        eps=c["eps"],
    ).replace(**{**_extra_config(c), **overrides})


def config_from_original(c: dict, **overrides) -> WanConfig:
    return WanConfig(
        dim=c["dim"],
        ffn_dim=c["ffn_dim"],
        num_heads=c["num_heads"],
        num_layers=c["num_layers"],
        in_channels=c["in_dim"],
        out_channels=c["out_dim"],
        patch_size=tuple(c["patch_size"]),
        text_dim=c["text_dim"],
        text_len=c.get("text_len", 512),
        freq_dim=c["freq_dim"],
        eps=c["eps"],
    ).replace(**{**_extra_config(c), **overrides})


def diffusers_config(cfg: WanConfig) -> dict:
    return dict(
        _class_name="WanTransformer3DModel",
        patch_size=list(cfg.patch_size),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
        image_dim=None,
        added_kv_proj_dim=None,
        rope_max_seq_len=1024,
        **{EXTRA_CONFIG: dict(text_len=cfg.text_len, num_actions=cfg.num_actions, mean_flow=cfg.mean_flow)},
    )


def original_config(cfg: WanConfig) -> dict:
    return dict(
        model_type="t2v",
        patch_size=list(cfg.patch_size),
        text_len=cfg.text_len,
        in_dim=cfg.in_channels,
        dim=cfg.dim,
        ffn_dim=cfg.ffn_dim,
        freq_dim=cfg.freq_dim,
        text_dim=cfg.text_dim,
        out_dim=cfg.out_channels,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        eps=cfg.eps,
        **{EXTRA_CONFIG: dict(num_actions=cfg.num_actions, mean_flow=cfg.mean_flow)},
    )


# ----------------------------------------------------------------- key mapping
# diffusers module path (block-relative for blocks) -> our module path.
_MODULES = {
    "patch_embedding": ("patch_embedding",),
    "condition_embedder.time_embedder.linear_1": ("condition_embedder", "time_embedder", "linear_1"),
    "condition_embedder.time_embedder.linear_2": ("condition_embedder", "time_embedder", "linear_2"),
    "condition_embedder.time_proj": ("condition_embedder", "time_proj"),
    "condition_embedder.text_embedder.linear_1": ("condition_embedder", "text_embedder", "linear_1"),
    "condition_embedder.text_embedder.linear_2": ("condition_embedder", "text_embedder", "linear_2"),
    "proj_out": ("proj_out",),
}
_BLOCK_MODULES = {
    f"{a}.{p}": (a, q)
    for a in ("attn1", "attn2")
    for p, q in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out.0", "to_out"))
}
_BLOCK_MODULES.update({"ffn.net.0.proj": ("ffn", "linear_1"), "ffn.net.2": ("ffn", "linear_2")})
_BLOCK_PLAIN = {  # parameters copied as they are (block-relative)
    "attn1.norm_q.weight": ("attn1", "norm_q", "weight"),
    "attn1.norm_k.weight": ("attn1", "norm_k", "weight"),
    "attn2.norm_q.weight": ("attn2", "norm_q", "weight"),
    "attn2.norm_k.weight": ("attn2", "norm_k", "weight"),
    "norm2.weight": ("norm2", "weight"),
    "norm2.bias": ("norm2", "bias"),
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _our_path(key: str):
    """diffusers key -> (our path, layer index or None, kind) or None if unknown."""
    m = _BLOCK_RE.match(key)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if rest == "scale_shift_table":
            return ("blocks", "scale_shift_table"), layer, "table"
        if rest in _BLOCK_PLAIN:
            return ("blocks",) + _BLOCK_PLAIN[rest], layer, "plain"
        mod, _, leaf = rest.rpartition(".")
        if mod in _BLOCK_MODULES and leaf in ("weight", "bias"):
            return (
                ("blocks",) + _BLOCK_MODULES[mod] + (("kernel" if leaf == "weight" else "bias"),),
                layer,
                "linear" if leaf == "weight" else "plain",
            )
        return None
    if key == "scale_shift_table":
        return ("scale_shift_table",), None, "table"
    mod, _, leaf = key.rpartition(".")
    if mod in _MODULES and leaf in ("weight", "bias"):
        kind = "plain" if leaf == "bias" else ("conv" if mod == "patch_embedding" else "linear")
        return _MODULES[mod] + (("kernel" if leaf == "weight" else "bias"),), None, kind
    return None


def _to_ours(kind: str, w: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return w.T
    if kind == "conv":  # the patch embedding's Conv3d kernel as the linear map of `patchify`'s patches
        return rearrange(w, "o c pt ph pw -> (pt ph pw c) o")
    if kind == "table":
        return w.reshape(w.shape[-2], w.shape[-1])
    return w


def diffusers_to_params(sd: dict, cfg: WanConfig) -> dict:
    """diffusers state dict (numpy) -> our nested parameter dict, checked against `cfg`."""
    _, abstract = nnx.split(nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0))))
    expected = {path: v.shape for path, v in nnx.to_flat_state(abstract)}
    dtypes = {path: v.dtype for path, v in nnx.to_flat_state(abstract)}
    stacks: dict[tuple, dict[int, np.ndarray]] = {}
    flat: dict[tuple, np.ndarray] = {}
    unexpected = []
    for key, w in sd.items():
        if key.startswith(EXTRA_PREFIX):
            flat[tuple(key.removeprefix(EXTRA_PREFIX).split("."))] = np.asarray(w)
            continue
        hit = _our_path(key)
        if hit is None:
            unexpected.append(key)
            continue
        path, layer, kind = hit
        w = _to_ours(kind, np.asarray(w))
        if layer is None:
            flat[path] = w
        else:
            if layer >= cfg.num_layers:
                unexpected.append(key)
                continue
            stacks.setdefault(path, {})[layer] = w
    return assemble_params(
        flat,
        stacks,
        expected,
        dtypes,
        num_layers=cfg.num_layers,
        unexpected=unexpected,
        layer_prefix="blocks",
        what="Wan checkpoint does not match the model config",
    )


def params_to_diffusers(model: WanModel) -> dict:
    """Our model's parameters -> diffusers state dict (numpy arrays)."""
    cfg = model.cfg
    flat = {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    inverse = {}
    keys = ["patch_embedding.weight", "patch_embedding.bias", "scale_shift_table"]
    keys += [f"{m}.{leaf}" for m in _MODULES if m != "patch_embedding" for leaf in ("weight", "bias")]
    for i in range(cfg.num_layers):
        keys += [f"blocks.{i}.scale_shift_table"] + [f"blocks.{i}.{k}" for k in _BLOCK_PLAIN]
        keys += [f"blocks.{i}.{m}.{leaf}" for m in _BLOCK_MODULES for leaf in ("weight", "bias")]
    pt, ph, pw = cfg.patch_size
    covered = set()
    for key in keys:
        path, layer, kind = _our_path(key)
        covered.add(path)
        w = flat[path] if layer is None else flat[path][layer]
        if kind == "linear":
            w = w.T
        elif kind == "conv":
            w = rearrange(w, "(pt ph pw c) o -> o c pt ph pw", pt=pt, ph=ph, pw=pw)
        elif kind == "table":
            w = w[None]
        inverse[key] = np.ascontiguousarray(w)
    for path, w in flat.items():  # parameters Wan2.1 does not have (actions, MeanFlow's interval)
        if path not in covered:
            inverse[EXTRA_PREFIX + ".".join(map(str, path))] = np.ascontiguousarray(w)
    return inverse


# ----------------------------------------------------------------- files
def indexed_shards(path: str, index_glob: str) -> list[str]:
    """The shard files named by a sharded checkpoint's index (`index_glob` in `path`), or []
    when there is no index. Raises FileNotFoundError naming shards the index lists but lacks."""
    index = glob.glob(os.path.join(path, index_glob))
    if not index:
        return []
    with open(index[0]) as f:
        needed = sorted(set(json.load(f)["weight_map"].values()))
    absent = [n for n in needed if not os.path.exists(os.path.join(path, n))]
    if absent:
        raise FileNotFoundError(f"shards listed in {index[0]} are missing: {absent}")
    return [os.path.join(path, n) for n in needed]


def read_safetensors_dir(path: str) -> dict:
    """All tensors of the `*.safetensors` files in `path` (numpy; bf16 kept via ml_dtypes)."""
    from safetensors import safe_open

    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path!r}")
    files = indexed_shards(path, "*.safetensors.index.json") or files
    out = {}
    for fn in files:
        try:
            with safe_open(fn, framework="flax") as f:
                for k in f.keys():
                    out[k] = np.asarray(f.get_tensor(k))
        except Exception as e:  # corrupt / truncated file
            raise ValueError(f"cannot read safetensors file {fn!r}: {e}") from e
    return out


def read_config(path: str) -> dict:
    fn = os.path.join(path, "config.json")
    if not os.path.exists(fn):
        raise FileNotFoundError(f"{fn!r} not found: a Wan checkpoint directory needs its config.json")
    with open(fn) as f:
        return json.load(f)


def load_wan(path: str, cfg: WanConfig | None = None, **overrides) -> WanModel:
    """Load a diffusers- or original-layout Wan2.1 transformer from a local directory.

    `cfg` defaults to the one read from `config.json`; `overrides` (e.g. dtype,
    attn_impl, text_len, num_actions) are applied on top.
    """
    sd = read_safetensors_dir(path)
    layout = detect_layout(sd)
    if cfg is None:
        raw = read_config(path)
        cfg = (config_from_diffusers if layout == "diffusers" else config_from_original)(raw)
    cfg = cfg.replace(**overrides)
    if layout == "original":
        sd = {original_to_diffusers_key(k): v for k, v in sd.items()}
    params = diffusers_to_params(sd, cfg)
    model = nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, with_non_params(state, params))
    nnx.update(model, state)
    return model


def with_non_params(state, params: dict) -> dict:
    """Pure dict of `state` with the parameter leaves replaced by `params`."""
    pure = nnx.to_pure_dict(state)

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict):
                merge(dst[k], v)
            else:
                dst[k] = v
        return dst

    return merge(pure, params)


def save_wan(model: WanModel, path: str, layout: str = "diffusers") -> None:
    """Write `model` as a checkpoint directory in the `diffusers` or `original` layout."""
    from safetensors.numpy import save_file

    if layout not in ("diffusers", "original"):
        raise ValueError(f"layout must be 'diffusers' or 'original', got {layout!r}")
    os.makedirs(path, exist_ok=True)
    sd = params_to_diffusers(model)
    cfg_dict = diffusers_config(model.cfg)
    if layout == "original":
        sd = {diffusers_to_original_key(k): v for k, v in sd.items()}
        cfg_dict = original_config(model.cfg)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=1)
    save_file(sd, os.path.join(path, WEIGHTS))


# ----------------------------------------------------------------- our own (Orbax) format
NNX_CONFIG = "wan_config.json"


def save_nnx(model: WanModel, path: str) -> None:
    """Save the model's parameters with Orbax, plus its architecture (`WanConfig.architecture`) as JSON. The calling process
    writes it alone (in a multi-process run the others do not take part).

    The checkpoint is written beside `path` and moved into place when complete; an older one at
    `path` is replaced only then, so a kill at any moment leaves a complete checkpoint (the old or
    the new one; `load_nnx` also finds the old one under `<path>.previous` in the instant between
    the two renames)."""
    import shutil

    path = os.path.abspath(path)
    partial, previous = f"{path}.partial", f"{path}.previous"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    with open(os.path.join(partial, NNX_CONFIG), "w") as f:
        json.dump(model.cfg.architecture(), f, indent=1)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if jax.process_count() > 1:  # Orbax saves host-local values from one process only as numpy
        params = jax.tree.map(np.asarray, params)
    ckptr = _this_process_checkpointer()
    ckptr.save(os.path.join(partial, "params"), params, force=True)
    ckptr.wait_until_finished()
    if os.path.exists(path):
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(path, previous)
    os.replace(partial, path)
    shutil.rmtree(previous, ignore_errors=True)


def _this_process_checkpointer():
    """An Orbax checkpointer that the calling process uses alone (the default one in a single process)."""
    import orbax.checkpoint as ocp

    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    )


def load_nnx(path: str, **overrides) -> WanModel:
    """Load a model saved by `save_nnx`; `overrides` set its runtime (dtype, attention backends,
    remat; `WanConfig.replace`). Runtime fields in the file (older checkpoints) apply unless overridden."""
    path = os.path.abspath(path)
    if not os.path.exists(path) and os.path.exists(os.path.join(f"{path}.previous", NNX_CONFIG)):
        path = f"{path}.previous"  # killed between save_nnx's two renames
    cfg_file = os.path.join(path, NNX_CONFIG)
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{cfg_file!r} not found: not a crm_jax NNX checkpoint")
    with open(cfg_file) as f:
        raw = json.load(f)
    cfg = WanConfig.from_dict(raw).replace(**overrides)
    model = nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    # Restore onto this host's first device, whatever topology saved it (GPU -> CPU and back);
    # each process of a multi-process run reads it on its own, as numpy.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if jax.process_count() > 1:
        target = jax.tree.map(lambda x: np.empty(x.shape, x.dtype), abstract)
    else:
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    params = _this_process_checkpointer().restore(os.path.join(path, "params"), target)
    nnx.replace_by_pure_dict(state, with_non_params(state, params))
    nnx.update(model, state)
    return model


def load_any(path: str, **overrides) -> WanModel:
    """Load a Wan transformer from a diffusers, original or crm_jax NNX directory."""
    if any(os.path.exists(os.path.join(p, NNX_CONFIG)) for p in (path, f"{path.rstrip('/')}.previous")):
        return load_nnx(path, **overrides)
    return load_wan(path, **overrides)
