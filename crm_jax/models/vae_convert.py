"""Wan2.1 VAE checkpoints <-> our NNX `WanVAE` parameters.

Two public layouts are understood, from local files only:
  * diffusers (`AutoencoderKLWan`): a directory with `config.json` +
    `diffusion_pytorch_model.safetensors`; keys like `decoder.up_blocks.1.resnets.0.conv1.weight`;
  * original Wan2.1: `Wan2.1_VAE.pth` (a torch zip pickle, read without torch by
    `crm_jax.models.torch_checkpoint`) or a `.safetensors` file with the original
    key names (`encoder.conv1.weight`, `decoder.upsamples.4.residual.2.weight`,
    `conv1`/`conv2` for quant_conv/post_quant_conv). These carry no config: `cfg`
    defaults to `WAN_VAE`.

Weights: torch conv3d `[O, I, kt, kh, kw]` -> ours `[kt, kh, kw, I, O]`; conv2d
`[O, I, kh, kw]` -> `[kh, kw, I, O]`; RMS norm gamma `[C, 1, 1(, 1)]` -> `[C]`.
Anything missing, unexpected or of the wrong shape is a ValueError naming the
keys (in the checkpoint's own naming) and shapes.
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from crm_jax.models.param_assembly import raise_if_mismatch
from crm_jax.models.vae import WAN_VAE, WanVAE, WanVAEConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


# ----------------------------------------------------------------- configs
def config_from_diffusers(c: dict, **overrides) -> WanVAEConfig:
    """`AutoencoderKLWan` config.json -> WanVAEConfig (Wan2.1 variants only)."""
    unsupported = []
    if c.get("is_residual"):
        unsupported.append("is_residual=True (Wan2.2 VAE)")
    if c.get("patch_size") not in (None, 1):
        unsupported.append(f"patch_size={c['patch_size']}")
    if c.get("decoder_base_dim") not in (None, c.get("base_dim", 96)):
        unsupported.append(f"decoder_base_dim={c['decoder_base_dim']}")
    for k in ("in_channels", "out_channels"):
        if c.get(k, 3) != 3:
            unsupported.append(f"{k}={c[k]}")
    if unsupported:
        raise ValueError(f"unsupported AutoencoderKLWan config: {', '.join(unsupported)}")
    d = WanVAEConfig()
    cfg = WanVAEConfig(
        base_dim=c.get("base_dim", d.base_dim),
        z_dim=c.get("z_dim", d.z_dim),
        dim_mult=tuple(c.get("dim_mult", d.dim_mult)),
        num_res_blocks=c.get("num_res_blocks", d.num_res_blocks),
        attn_scales=tuple(c.get("attn_scales", ())),
        temperal_downsample=tuple(bool(b) for b in c.get("temperal_downsample", d.temperal_downsample)),
        dropout=c.get("dropout", 0.0),
        latents_mean=tuple(float(v) for v in c.get("latents_mean", d.latents_mean)),
        latents_std=tuple(float(v) for v in c.get("latents_std", d.latents_std)),
    )
    return cfg.replace(**overrides)


def diffusers_config(cfg: WanVAEConfig) -> dict:
    return dict(
        _class_name="AutoencoderKLWan",
        base_dim=cfg.base_dim,
        decoder_base_dim=None,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_scales=list(cfg.attn_scales),
        temperal_downsample=list(cfg.temperal_downsample),
        dropout=cfg.dropout,
        latents_mean=list(cfg.latents_mean),
        latents_std=list(cfg.latents_std),
        is_residual=False,
        in_channels=3,
        out_channels=3,
        patch_size=None,
        scale_factor_temporal=cfg.temporal_factor,
        scale_factor_spatial=cfg.spatial_factor,
    )


# ----------------------------------------------------------------- key mapping
def _diffusers_key(path: tuple) -> str:
    """Our parameter path -> diffusers key (`resample` is diffusers' Sequential slot 1)."""
    parts = []
    for p in path:
        if p == "kernel":
            p = "weight"
        elif p == "resample":
            p = "resample.1"
        elif p == "upsampler":
            p = "upsamplers.0"
        parts.append(str(p))
    return ".".join(parts)


def _torch_shape(path: tuple, shape: tuple) -> tuple:
    if path[-1] == "kernel" and len(shape) == 5:
        return (shape[4], shape[3], *shape[:3])
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], *shape[:2])
    if path[-1] == "gamma":  # attention norms are 2D (images=True), the others 3D
        return (shape[0], 1, 1) if "attentions" in path else (shape[0], 1, 1, 1)
    return tuple(shape)


def _to_ours(w: np.ndarray) -> np.ndarray:
    if w.ndim == 5:
        return w.transpose(2, 3, 4, 1, 0)
    if w.ndim == 4:  # conv2d, 1x1 ones (attention) included
        return w.transpose(2, 3, 1, 0)
    return w


_RESIDUAL_TO_ORIGINAL = (
    ("norm1.", "residual.0."),
    ("conv1.", "residual.2."),
    ("norm2.", "residual.3."),
    ("conv2.", "residual.6."),
    ("conv_shortcut.", "shortcut."),
)


def _residual_to_original(sub: str) -> str:
    for a, b in _RESIDUAL_TO_ORIGINAL:
        if sub.startswith(a):
            return b + sub[len(a) :]
    raise KeyError(sub)


def original_key(key: str, cfg: WanVAEConfig) -> str:
    """diffusers key -> original Wan2.1 key (the decoder's flat `upsamples` index depends on cfg)."""
    if key.startswith("quant_conv."):
        return "conv1." + key.removeprefix("quant_conv.")
    if key.startswith("post_quant_conv."):
        return "conv2." + key.removeprefix("post_quant_conv.")
    part, rest = key.split(".", 1)
    for a, b in (("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2.")):
        if rest.startswith(a):
            return f"{part}.{b}{rest[len(a) :]}"
    fields = rest.split(".")
    if fields[0] == "mid_block":
        slot = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[tuple(fields[1:3])]
        sub = ".".join(fields[3:])
        return f"{part}.middle.{slot}." + (_residual_to_original(sub) if fields[1] == "resnets" else sub)
    if fields[0] == "down_blocks":
        sub = ".".join(fields[2:])
        if not sub.startswith(("resample.", "time_conv.")):
            sub = _residual_to_original(sub)
        return f"{part}.downsamples.{fields[1]}.{sub}"
    if fields[0] == "up_blocks":
        base = int(fields[1]) * (cfg.num_res_blocks + 2)
        if fields[2] == "resnets":
            return f"{part}.upsamples.{base + int(fields[3])}." + _residual_to_original(".".join(fields[4:]))
        return f"{part}.upsamples.{base + cfg.num_res_blocks + 1}." + ".".join(fields[4:])  # upsamplers.0
    raise KeyError(key)


def expected_keys(cfg: WanVAEConfig, layout: str = "diffusers") -> dict:
    """Checkpoint key -> (our path, torch shape, our shape, dtype) for a model of `cfg`."""
    abstract = nnx.state(nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    out = {}
    for path, v in nnx.to_flat_state(abstract):
        key = _diffusers_key(path)
        if layout == "original":
            key = original_key(key, cfg)
        out[key] = (path, _torch_shape(path, v.shape), tuple(v.shape), v.dtype)
    return out


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith(("encoder.conv_in.", "decoder.conv_in.", "quant_conv.")) or ".mid_block." in k for k in keys):
        return "diffusers"
    if any(k.startswith(("encoder.conv1.", "decoder.conv1.")) or ".middle." in k for k in keys):
        return "original"
    raise ValueError(f"unrecognised Wan VAE checkpoint layout (first keys: {keys[:5]})")


def state_dict_to_params(sd: dict, cfg: WanVAEConfig, layout: str) -> dict:
    """Checkpoint state dict (numpy, torch layouts) -> our nested parameter dict, checked against cfg."""
    expected = expected_keys(cfg, layout)
    unexpected = sorted(k for k in sd if k not in expected)
    missing = sorted(k for k in expected if k not in sd)
    bad_shape = [
        f"{k}: checkpoint {tuple(np.shape(sd[k]))} vs model {expected[k][1]}"
        for k in sorted(expected)
        if k in sd and tuple(np.shape(sd[k])) != expected[k][1]
    ]
    raise_if_mismatch(
        f"Wan VAE checkpoint ({layout} layout) does not match the model config", missing, unexpected, bad_shape
    )
    nested: dict = {}
    for key, (path, _, shape, dtype) in expected.items():
        w = np.asarray(sd[key])
        w = w.reshape(shape) if path[-1] == "gamma" else _to_ours(w)
        assert w.shape == shape, (key, w.shape, shape)
        d = nested
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = w.astype(dtype)
    return nested


def params_to_state_dict(model: WanVAE, layout: str = "diffusers") -> dict:
    """Our model's parameters -> a state dict (numpy, parameter dtype) in the diffusers or original layout."""
    flat = {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out = {}
    for key, (path, tshape, _, _) in expected_keys(model.cfg, layout).items():
        w = flat[path]
        if w.ndim == 5:
            w = w.transpose(4, 3, 0, 1, 2)
        elif w.ndim == 4:
            w = w.transpose(3, 2, 0, 1)
        out[key] = np.ascontiguousarray(w.reshape(tshape))
    return out


# ----------------------------------------------------------------- files
def _read_safetensors_file(fn: str) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(fn, framework="flax") as f:
            return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    except Exception as e:  # corrupt / truncated file
        raise ValueError(f"cannot read safetensors file {fn!r}: {e}") from e


def read_checkpoint(path: str) -> tuple[dict, dict | None]:
    """(state dict, diffusers config or None) of a VAE checkpoint directory or file."""
    if os.path.isdir(path):
        cfg_file, weights = os.path.join(path, "config.json"), os.path.join(path, WEIGHTS)
        if not os.path.exists(weights):
            raise FileNotFoundError(f"{weights!r} not found: a diffusers VAE directory needs {WEIGHTS}")
        raw = None
        if os.path.exists(cfg_file):
            with open(cfg_file) as f:
                raw = json.load(f)
        return _read_safetensors_file(weights), raw
    if not os.path.exists(path):
        raise FileNotFoundError(f"VAE checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        return _read_safetensors_file(path), None
    if path.endswith(TORCH_SUFFIXES):
        from crm_jax.models.torch_checkpoint import load_torch_state_dict  # torch-free zip reader

        sd = load_torch_state_dict(path)
        if "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        return {k: np.asarray(v) for k, v in sd.items()}, None
    raise ValueError(
        f"don't know how to read {path!r}: expected a diffusers directory, a .safetensors "
        f"file or a torch checkpoint ({', '.join(TORCH_SUFFIXES)})"
    )


def load_wan_vae(path: str, cfg: WanVAEConfig | None = None, **overrides) -> WanVAE:
    """Load a Wan2.1 VAE from a diffusers directory, an original `.pth` or an original-key `.safetensors`.

    cfg: the model config; default: the directory's `config.json` (diffusers),
      else `WAN_VAE` (original checkpoints carry no config). `overrides` (e.g.
      dtype="bfloat16") are applied on top.
    """
    sd, raw = read_checkpoint(path)
    layout = detect_layout(sd)
    if cfg is None:
        if raw is None and os.path.isdir(path):
            raise FileNotFoundError(f"{os.path.join(path, 'config.json')!r} not found and no cfg given")
        cfg = config_from_diffusers(raw) if raw is not None else WAN_VAE
    cfg = cfg.replace(**overrides)
    params = state_dict_to_params(sd, cfg, layout)
    model = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def save_wan_vae(model: WanVAE, path: str, layout: str = "diffusers") -> None:
    """Write `model`: layout "diffusers" -> directory `path` (config.json + safetensors);
    "original" -> a single safetensors file `path` with the original Wan2.1 key names."""
    from safetensors.numpy import save_file

    if layout not in ("diffusers", "original"):
        raise ValueError(f"layout must be 'diffusers' or 'original', got {layout!r}")
    sd = params_to_state_dict(model, layout)
    if layout == "original":
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(sd, path)
        return
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(diffusers_config(model.cfg), f, indent=1)
    save_file(sd, os.path.join(path, WEIGHTS))
