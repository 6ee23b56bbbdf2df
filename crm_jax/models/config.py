"""Wan2.1 transformer configurations: `tiny` (tests), `wan_1_3b`, `wan_14b`."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


class DtypeConfig:
    """Mixin of the model config dataclasses: `dtype` / `param_dtype` names as jnp dtypes, `replace`."""

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


IMPLS = ("auto", "mgpu", "cudnn", "xla", "triton", "mosaic")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig(DtypeConfig):
    """How a Wan DiT runs: numerics and kernels. Not part of a checkpoint: it may differ between
    a checkpoint and the config that loads it, and between a run and its resume.

    Attributes:
      dtype: compute dtype of matmuls (norms and modulation stay float32).
      attn_impl: attention backend for `pallas_kernels.ops.attention` ("auto": the Pallas
        Mosaic kernels on TPU, Triton kernels (and cuDNN for unmasked reverse-mode calls)
        on GPU, XLA on CPU; "xla"; "triton"; "mosaic").
      cache_attn_impl: backend of the KV-cache attention (a chunk over its cache prefix,
        `ops.attention_kv_prefix`): "auto" (= attn_impl; on a Hopper GPU "auto" runs our
        Mosaic-GPU kernel, on other GPUs cuDNN), "mgpu", "cudnn", "xla", "triton".
      cross_attn_impl: backend of the cross-attention (every query over all text keys):
        "auto" (= attn_impl, through `ops.attention`) or one of `ops.attention_kv_prefix`'s
        backends with the whole text as the valid length, e.g. "mgpu" (our Hopper kernel: no
        cuDNN workspace memsets per call; its gradient is cuDNN's). Single device only.
      attn_tiles: (block_q, block_k) of every attention kernel (forward, JVP, backward) of
        the backend that runs, or None for the backend's default at each call's lengths
        (Mosaic TPU: 512 x 512, less for shorter sequences; Triton: the tuned H200 tiles).
      attn_interpret: run the Pallas kernels in interpret mode (CPU tests).
      remat: "none", "block" (recompute each block) or "dots" (save matmul outputs).
    """

    dtype: str = "float32"
    attn_impl: str = "auto"
    cache_attn_impl: str = "auto"
    cross_attn_impl: str = "auto"
    attn_tiles: tuple[int, int] | None = None
    attn_interpret: bool = False
    remat: str = "none"

    def __post_init__(self):
        if self.cache_attn_impl not in IMPLS:
            raise ValueError(f"cache_attn_impl must be auto/mgpu/cudnn/xla/triton/mosaic, got {self.cache_attn_impl!r}")
        if self.cross_attn_impl not in IMPLS:
            raise ValueError(f"cross_attn_impl must be auto/mgpu/cudnn/xla/triton/mosaic, got {self.cross_attn_impl!r}")
        if self.attn_tiles is not None:
            tiles = tuple(int(b) for b in self.attn_tiles)
            if len(tiles) != 2 or any(b < 8 or b & (b - 1) for b in tiles):
                raise ValueError(f"attn_tiles must be (block_q, block_k), powers of two >= 8, got {self.attn_tiles!r}")
            object.__setattr__(self, "attn_tiles", tiles)
        if self.remat not in ("none", "block", "dots"):
            raise ValueError(f"remat must be none/block/dots, got {self.remat!r}")

    @property
    def cache_impl(self) -> str:
        """The backend the KV-cache attention asks for (`cache_attn_impl`; "auto": `attn_impl`)."""
        return self.attn_impl if self.cache_attn_impl == "auto" else self.cache_attn_impl


RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(RuntimeConfig))


@dataclasses.dataclass(frozen=True)
class WanConfig(DtypeConfig):
    """A Wan2.1 T2V DiT: its architecture (what a checkpoint holds) and how it runs (`runtime`).

    Attributes:
      dim: hidden size (= num_heads * head_dim).
      ffn_dim: FFN inner size.
      num_heads, num_layers: attention heads, transformer blocks.
      in_channels, out_channels: latent channels (16 for Wan's VAE).
      patch_size: (t, h, w) patch of the patch embedding.
      text_dim: width of the text-encoder embeddings (umT5: 4096).
      text_len: number of text tokens (umT5: 512); checked at the entry point.
      freq_dim: sinusoidal time-embedding width.
      eps: epsilon of the layer/RMS norms.
      rope_theta, rope_max_frames: 3D RoPE base and table length.
      timestep_scale: the network is called with RF time t in [0, 1]; Wan's own
        timestep is `timestep_scale * t` (1000).
      num_actions: > 0 adds a per-frame action embedding (world models) added to
        the time embedding of the frame it acts on.
      mean_flow: adds an embedding of the interval t - r (MeanFlow's average
        velocity u(z, r, t)); the model then takes `r` besides `t`.
      param_dtype: parameter dtype.
      runtime: `RuntimeConfig` (compute dtype, attention backends, remat); `replace` and
        `from_dict` take its fields next to the architecture's.
    """

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_max_frames: int = 1024
    timestep_scale: float = 1000.0
    num_actions: int = 0
    mean_flow: bool = False
    param_dtype: str = "float32"
    runtime: RuntimeConfig = RuntimeConfig()

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        object.__setattr__(self, "patch_size", tuple(self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def compute_dtype(self):
        return self.runtime.compute_dtype

    def replace(self, **kw) -> WanConfig:
        """A copy with fields replaced; `RuntimeConfig`'s fields go to `runtime`."""
        run = {k: kw.pop(k) for k in RUNTIME_FIELDS if k in kw}
        if run:
            kw["runtime"] = kw.get("runtime", self.runtime).replace(**run)
        return dataclasses.replace(self, **kw)

    def architecture(self) -> dict:
        """The fields a checkpoint holds (`wan_config.json`), JSON-ready."""
        d = dataclasses.asdict(self)
        del d["runtime"]
        d["patch_size"] = list(d["patch_size"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WanConfig:
        """From `architecture()`'s dict, with optional runtime fields: flat (as older
        `wan_config.json` files hold them) or nested under "runtime"."""
        d = dict(d)
        run = dict(d.pop("runtime", None) or {})
        run.update({k: d.pop(k) for k in RUNTIME_FIELDS if k in d})
        return cls(**d, runtime=RuntimeConfig(**run))


def same_architecture(a: WanConfig, b: WanConfig) -> bool:
    """Whether `a` and `b` describe the same checkpoint (they may run differently)."""
    return a.architecture() == b.architecture()


WAN_1_3B = WanConfig()
WAN_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
TINY = WanConfig(
    dim=64, ffn_dim=128, num_heads=4, num_layers=2, in_channels=4, out_channels=4, text_dim=32, text_len=8, freq_dim=32
)

CONFIGS = {"tiny": TINY, "wan_1_3b": WAN_1_3B, "wan_14b": WAN_14B}


def model_config_from(model_block) -> WanConfig:
    """The WanConfig of an ml_collections `model` block: `name` plus optional `overrides`."""
    over = dict(model_block.get("overrides", {}) or {})
    for name in ("patch_size", "attn_tiles"):
        if over.get(name) is not None:
            over[name] = tuple(over[name])
    return get_model_config(model_block.name, **over)


def get_model_config(name: str, **overrides) -> WanConfig:
    """Look up a named config and apply overrides."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[name].replace(**overrides)
