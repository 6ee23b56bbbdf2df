"""Wan2.1's causal 3D VAE (diffusers' `AutoencoderKLWan`) in Flax NNX.

Layouts (channels last, unlike PyTorch's `[B, C, T, H, W]`):
  video    `[B, T, H, W, 3]`        pixels in [-1, 1], T = 1 + 4k, H and W multiples of 8
  latents  `[B, T', H/8, W/8, z]`   T' = 1 + (T - 1) // 4, z = 16 for Wan2.1

Every 3D convolution is causal in time: it sees the current frame and the two
before it (zeros before the first). So a video can be processed in chunks when
each causal conv carries the last two frames of its input (its *feature cache*,
`CACHE_T = 2`) from one chunk to the next, which is what diffusers does frame
by frame. Here one code path serves both: a chunk function takes
`(x_chunk, cache, first)` and returns `(y_chunk, new_cache)`; whole-video
encode/decode are one chunk with an all-zero cache. The first frame is special
in the temporal resamplers (it is neither doubled when upsampling nor merged
when downsampling), hence the static `first` flag.

`StreamingDecoder` wraps the decoder as a pure jitted step over fixed-shape
cache pytrees, for decoding latents chunk by chunk (e.g. 1 or 3 latent frames
at a time, as a causal DiT produces them); concatenated chunks equal `decode`.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from crm_jax.models.config import DtypeConfig

CACHE_T = 2  # frames of input each 3x3x3 causal conv keeps from the previous chunk

WAN_LATENTS_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
WAN_LATENTS_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig(DtypeConfig):
    """Sizes and numerics of a Wan2.1 VAE (field names follow diffusers' config).

    Attributes:
      base_dim: channels of the first level; level i has base_dim * dim_mult[i].
      z_dim: latent channels (the encoder predicts 2 * z_dim: mean and logvar).
      dim_mult: channel multipliers per level; len(dim_mult) - 1 spatial 2x resamplings.
      num_res_blocks: residual blocks per encoder level (the decoder has one more).
      attn_scales: must be empty (Wan2.1 only has attention in the mid blocks).
      temperal_downsample: per encoder resampling, whether it also halves time
        (the decoder mirrors it). Wan2.1: (False, True, True) -> 4x in time.
      dropout: ignored (inference only).
      latents_mean, latents_std: per-channel statistics; the DiT sees
        `(z - mean) / std` (see `normalize`).
      dtype: compute dtype (norms, attention softmax stay float32).
      param_dtype: parameter dtype.
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN_LATENTS_STD
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} "
                f"entries, got {self.temperal_downsample}"
            )
        if self.attn_scales:
            raise ValueError(
                f"attn_scales={self.attn_scales} is not supported (diffusers' Wan decoder ignores it); Wan2.1 uses []"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"latents_mean/std need z_dim={self.z_dim} entries, got "
                f"{len(self.latents_mean)} and {len(self.latents_std)}"
            )

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(map(bool, self.temperal_downsample))


WAN_VAE = WanVAEConfig()
TINY_VAE = WanVAEConfig(
    base_dim=6,
    z_dim=4,
    dim_mult=(1, 2, 2, 2),
    num_res_blocks=1,
    latents_mean=(0.1, -0.2, 0.3, -0.4),
    latents_std=(1.5, 0.5, 2.0, 1.0),
)


# ----------------------------------------------------------------- layers
class _Cache:
    """Threads feature caches through one chunk call, in call order (like diffusers' feat_idx).

    `old` is the list of incoming caches (None: all zeros, a fresh stream); the
    layers append their outgoing caches to `new`.
    """

    def __init__(self, old):
        self.old, self.new = old, []

    def take(self):
        return None if self.old is None else self.old[len(self.new)]

    def put(self, c):
        self.new.append(c)


def _init(rngs, shape, fan_in, dtype):
    """N(0, 1/fan_in) weights. With a concrete key they are drawn by numpy (seeded from the
    key): eager `jax.random.normal` compiles once per shape, minutes for the whole VAE on CPU."""
    key = rngs.params()
    if isinstance(key, jax.core.Tracer):  # under jit / eval_shape
        return jax.random.normal(key, shape, dtype) / math.sqrt(fan_in)
    seed = np.asarray(jax.random.key_data(key)).astype(np.uint32).tolist()
    w = np.random.default_rng(seed).standard_normal(shape, np.float32) / math.sqrt(fan_in)
    return jnp.asarray(w, dtype)


class CausalConv3d(nnx.Module):
    """3D conv, causal in time (pads `kt - 1` past frames), 'same' in space.

    kernel `[kt, kh, kw, Cin, Cout]`, bias `[Cout]`. Called on `x [B, t, H, W, Cin]`
    with the cache `[B, kt - 1, H, W, Cin]` (last input frames of the previous
    chunk; None = zeros); returns `(y [B, t, H, W, Cout], new cache)`.
    """

    def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), *, rngs, dtype, param_dtype):
        self.dtype = dtype
        self.kernel = nnx.Param(_init(rngs, (*kernel, cin, cout), cin * math.prod(kernel), param_dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype))

    @property
    def past(self) -> int:
        return self.kernel.shape[0] - 1

    def __call__(self, x, cache=None):
        x = x.astype(self.dtype)
        kt, kh, kw = self.kernel.shape[:3]
        if kt > 1:
            if cache is None:
                cache = jnp.zeros((x.shape[0], kt - 1, *x.shape[2:]), x.dtype)
            x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
            cache = x[:, -(kt - 1) :]
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...].astype(self.dtype),
            (1, 1, 1),
            [(0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)],
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )
        return y + self.bias[...].astype(self.dtype), (cache if kt > 1 else None)


class Conv2d(nnx.Module):
    """Per-frame 2D conv: kernel `[kh, kw, Cin, Cout]`; `x [..., H, W, Cin]`.

    padding: "same" (zero, symmetric) or "down" (one zero row/column at the
    bottom/right, stride 2: Wan's spatial downsampling).
    """

    def __init__(self, cin: int, cout: int, k: int = 3, *, rngs, dtype, param_dtype):
        self.dtype = dtype
        self.kernel = nnx.Param(_init(rngs, (k, k, cin, cout), cin * k * k, param_dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype))

    def __call__(self, x, padding: str = "same"):
        lead = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:]).astype(self.dtype)
        k = self.kernel.shape[0]
        if padding == "same":
            pad, stride = [(k // 2, k // 2)] * 2, (1, 1)
        else:
            pad, stride = [(0, 1)] * 2, (2, 2)
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...].astype(self.dtype), stride, pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape(*lead, *y.shape[1:])


class RMSNorm(nnx.Module):
    """Wan's channel RMS norm: `x / max(||x||, 1e-12) * sqrt(C) * gamma` over the last axis (float32)."""

    def __init__(self, dim: int, *, param_dtype):
        self.gamma = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        y = x32 / jnp.maximum(norm, 1e-12) * math.sqrt(x.shape[-1]) * self.gamma[...].astype(jnp.float32)
        return y.astype(x.dtype)


class ResidualBlock(nnx.Module):
    """norm1 -> silu -> conv1 -> norm2 -> silu -> conv2, plus a (1x1x1 conv) shortcut. Uses 2 caches."""

    def __init__(self, cin: int, cout: int, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = RMSNorm(cin, param_dtype=param_dtype)
        self.conv1 = CausalConv3d(cin, cout, **kw)
        self.norm2 = RMSNorm(cout, param_dtype=param_dtype)
        self.conv2 = CausalConv3d(cout, cout, **kw)
        self.conv_shortcut = CausalConv3d(cin, cout, (1, 1, 1), **kw) if cin != cout else None

    def __call__(self, x, cache: _Cache):
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)[0]
        for norm, conv in ((self.norm1, self.conv1), (self.norm2, self.conv2)):
            x, c = conv(jax.nn.silu(norm(x)), cache.take())
            cache.put(c)
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the pixels of each frame (no mixing in time)."""

    def __init__(self, dim: int, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = RMSNorm(dim, param_dtype=param_dtype)
        self.to_qkv = Conv2d(dim, 3 * dim, 1, **kw)
        self.proj = Conv2d(dim, dim, 1, **kw)

    def __call__(self, x, cache: _Cache = None):
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        s = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        o = jnp.einsum("nqk,nkc->nqc", p, v).reshape(b, t, h, w, c)
        return x + self.proj(o)


class Resample(nnx.Module):
    """Wan's 2x resampler. mode: upsample2d/3d (nearest 2x + conv to `out_dim`), downsample2d/3d.

    The 3d modes also double / halve time with `time_conv` (one cache), except
    for the first frame of a stream (`first`), which passes through once.
      upsample3d: time_conv `[3,1,1]` C -> 2C, the two halves become frames 2i, 2i+1.
      downsample3d: after the spatial conv, time_conv `[3,1,1]` stride 2 without
        padding; its cache is the last input frame.
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mode = mode
        up = mode.startswith("up")
        self.resample = Conv2d(dim, (out_dim or dim // 2) if up else dim, 3, **kw)
        time_out = {"upsample3d": 2 * dim, "downsample3d": dim}.get(mode)
        self.time_conv = CausalConv3d(dim, time_out, (3, 1, 1), **kw) if time_out else None

    def _upsample_time(self, x, cache: _Cache, first: bool):
        b, t, h, w, c = x.shape
        head, x = (x[:, :1], x[:, 1:]) if first else (None, x)
        if x.shape[1]:
            y, new = self.time_conv(x, cache.take())
            x = rearrange(y, "b t h w (r c) -> b (t r) h w c", r=2)
        else:  # only the first frame: the (zero) cache is unchanged
            new = cache.take()
            new = jnp.zeros((b, CACHE_T, h, w, c), x.dtype) if new is None else new
        cache.put(new)
        return x if head is None else jnp.concatenate([head, x], axis=1)

    def _downsample_time(self, x, cache: _Cache, first: bool):
        if x.shape[1] % 2 != (1 if first else 0):
            raise ValueError(
                f"downsample3d needs an {'odd' if first else 'even'} number of frames "
                f"in {'the first' if first else 'a later'} chunk, got {x.shape[1]}"
            )
        tc = self.time_conv
        xx = x if first else jnp.concatenate([cache.take().astype(x.dtype), x], axis=1)
        y = jax.lax.conv_general_dilated(
            xx.astype(tc.dtype),
            tc.kernel[...].astype(tc.dtype),
            (2, 1, 1),
            "VALID",
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        ) + tc.bias[...].astype(tc.dtype)
        cache.put(x[:, -1:])
        return jnp.concatenate([x[:, :1].astype(y.dtype), y], axis=1) if first else y

    def __call__(self, x, cache: _Cache, first: bool):
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache, first)
        if self.mode.startswith("up"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)
            x = self.resample(x)
        else:
            x = self.resample(x, padding="down")
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache, first)
        return x


class MidBlock(nnx.Module):
    """resnet -> attention -> resnet."""

    def __init__(self, dim: int, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResidualBlock(dim, dim, **kw), ResidualBlock(dim, dim, **kw)])
        self.attentions = nnx.List([AttentionBlock(dim, **kw)])

    def __call__(self, x, cache: _Cache):
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


class Encoder(nnx.Module):
    """`[B, T, H, W, 3]` -> `[B, T', H/8, W/8, 2 z]` (before quant_conv)."""

    def __init__(self, cfg: WanVAEConfig, *, rngs):
        kw = dict(rngs=rngs, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(3, dims[0], **kw)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout, **kw))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                blocks.append(Resample(cout, mode, **kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], **kw)
        self.norm_out = RMSNorm(dims[-1], param_dtype=cfg.params_dtype)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, **kw)

    def __call__(self, x, cache: _Cache, first: bool):
        x, c = self.conv_in(x, cache.take())
        cache.put(c)
        for block in self.down_blocks:
            x = block(x, cache, first) if isinstance(block, Resample) else block(x, cache)
        x = self.mid_block(x, cache)
        x, c = self.conv_out(jax.nn.silu(self.norm_out(x)), cache.take())
        cache.put(c)
        return x


class UpBlock(nnx.Module):
    """num_res_blocks + 1 residual blocks, then an optional upsampler."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, mode: str | None, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        res = []
        for _ in range(num_res_blocks + 1):
            res.append(ResidualBlock(cin, cout, **kw))
            cin = cout
        self.resnets = nnx.List(res)
        self.upsampler = Resample(cout, mode, **kw) if mode else None

    def __call__(self, x, cache: _Cache, first: bool):
        for r in self.resnets:
            x = r(x, cache)
        return x if self.upsampler is None else self.upsampler(x, cache, first)


class Decoder(nnx.Module):
    """`[B, T', h, w, z]` (after post_quant_conv) -> `[B, T, 8h, 8w, 3]` (not clipped)."""

    def __init__(self, cfg: WanVAEConfig, *, rngs):
        kw = dict(rngs=rngs, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], **kw)
        self.mid_block = MidBlock(dims[0], **kw)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # the previous upsampler halved the channels
            mode = None
            if i != len(mult) - 1:
                mode = "upsample3d" if temporal_up[i] else "upsample2d"
            blocks.append(UpBlock(cin, cout, cfg.num_res_blocks, mode, **kw))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], param_dtype=cfg.params_dtype)
        self.conv_out = CausalConv3d(dims[-1], 3, **kw)

    def __call__(self, x, cache: _Cache, first: bool):
        x, c = self.conv_in(x, cache.take())
        cache.put(c)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache, first)
        x, c = self.conv_out(jax.nn.silu(self.norm_out(x)), cache.take())
        cache.put(c)
        return x


# ----------------------------------------------------------------- model
def _check_video(x, cfg: WanVAEConfig):
    if x.ndim != 5 or x.shape[-1] != 3:
        raise ValueError(f"video must be [B, T, H, W, 3] (channels last), got shape {tuple(x.shape)}")
    b, t, h, w, _ = x.shape
    f = cfg.spatial_factor
    if (t - 1) % cfg.temporal_factor:
        raise ValueError(f"video needs T = 1 + {cfg.temporal_factor}k frames, got T={t}")
    if h % f or w % f:
        raise ValueError(f"video height and width must be multiples of {f}, got {h}x{w}")


def _check_latents(z, cfg: WanVAEConfig):
    if z.ndim != 5 or z.shape[-1] != cfg.z_dim:
        raise ValueError(f"latents must be [B, T', h, w, {cfg.z_dim}] (channels last), got shape {tuple(z.shape)}")


class WanVAE(nnx.Module):
    """Wan2.1 VAE: `encode` video `[B, T, H, W, 3]` -> latents `[B, T', H/8, W/8, z]`, `decode` back.

    Submodules mirror diffusers' `AutoencoderKLWan` (encoder, quant_conv,
    post_quant_conv, decoder) so checkpoint keys map one to one.
    """

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs=rngs)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1), **kw)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1), **kw)
        self.decoder = Decoder(cfg, rngs=rngs)

    # --- encoder
    def encode_chunk(self, x, cache=None, *, first: bool = True):
        """One encoder chunk: x `[B, t, H, W, 3]` -> (moments `[B, t', H/8, W/8, 2z]` float32, cache).

        A stream starts with `first=True` (t = 1 + 4k frames, cache None) and
        continues with chunks of 4k frames; diffusers uses 1, then 4 at a time.
        """
        c = _Cache(cache)
        h = self.encoder(x, c, first)
        return self.quant_conv(h)[0].astype(jnp.float32), c.new

    def encode_moments(self, x):
        """x `[B, T, H, W, 3]` in [-1, 1] -> (mean, logvar), each `[B, T', H/8, W/8, z]`, float32.

        logvar is clipped to [-30, 20] as in diffusers' DiagonalGaussianDistribution.
        """
        _check_video(x, self.cfg)
        moments, _ = self.encode_chunk(x)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, x):
        """x `[B, T, H, W, 3]` in [-1, 1] -> posterior mean latents `[B, 1 + (T-1)//4, H/8, W/8, z]`."""
        return self.encode_moments(x)[0]

    # --- decoder
    def decode_chunk(self, z, cache=None, *, first: bool = True):
        """One decoder chunk: z `[B, t, h, w, z]` -> (video `[B, t_out, 8h, 8w, 3]` in [-1, 1], cache).

        t_out = 1 + 4(t - 1) for the first chunk of a stream, else 4t. `cache`
        is the list returned by the previous chunk (None: a new stream).
        """
        _check_latents(z, self.cfg)
        c = _Cache(cache)
        x = self.decoder(self.post_quant_conv(z)[0], c, first)
        return jnp.clip(x.astype(jnp.float32), -1.0, 1.0), c.new

    def decode(self, z, chunk_frames: int | None = None):
        """z `[B, T', h, w, z]` (raw, not normalized) -> video `[B, 1 + 4(T'-1), 8h, 8w, 3]` in [-1, 1].

        chunk_frames: None decodes all frames in one pass; k decodes k latent
        frames at a time through the feature cache (less memory, same result).
        """
        _check_latents(z, self.cfg)
        if chunk_frames is None:
            return self.decode_chunk(z)[0]
        outs, cache = [], None
        for s in range(0, z.shape[1], chunk_frames):
            y, cache = self.decode_chunk(z[:, s : s + chunk_frames], cache, first=s == 0)
            outs.append(y)
        return jnp.concatenate(outs, axis=1)

    # --- latent statistics
    def normalize(self, z):
        """Raw latents -> the DiT's normalized latents `(z - mean) / std` (channels last)."""
        return normalize_latents(z, self.cfg)

    def denormalize(self, z):
        """Normalized latents -> raw latents `z * std + mean`."""
        return denormalize_latents(z, self.cfg)


def normalize_latents(z, cfg: WanVAEConfig):
    mean = jnp.asarray(cfg.latents_mean, jnp.float32)
    std = jnp.asarray(cfg.latents_std, jnp.float32)
    return ((z.astype(jnp.float32) - mean) / std).astype(z.dtype)


def denormalize_latents(z, cfg: WanVAEConfig):
    mean = jnp.asarray(cfg.latents_mean, jnp.float32)
    std = jnp.asarray(cfg.latents_std, jnp.float32)
    return (z.astype(jnp.float32) * std + mean).astype(z.dtype)


# ----------------------------------------------------------------- streaming decode
@flax.struct.dataclass
class DecodeState:
    """Decoder stream state: one cache array per causal conv (fixed shapes), in call order.

    caches: tuple of `[B, 2, h_l, w_l, C_l]` arrays (compute dtype).
    first: static; True until the first chunk has been decoded (the first
      latent frame decodes to 1 frame, later ones to 4).
    """

    caches: tuple
    first: bool = flax.struct.field(pytree_node=False, default=True)


class StreamingDecoder:
    """Pure, jitted chunk-by-chunk decoding of latents.

        dec = StreamingDecoder(vae)
        state = dec.init(batch, h, w)
        for z_chunk in chunks:                 # [B, t, h, w, z], t = 1 or 3 or ...
            video, state = dec.step(state, z_chunk)

    `step(state, z)` is `jax.jit`-compiled once per (first, chunk length); the
    state is a pytree of fixed-shape arrays, so it can also be carried through
    `lax.scan` via `dec.apply`. Concatenating the outputs equals `vae.decode`.
    """

    def __init__(self, vae: WanVAE, normalized: bool = False, donate_state: bool = False):
        """normalized: the chunks are the DiT's normalized latents (denormalized first).
        donate_state: let each step reuse the previous state's buffers (saves the
          cache memory on GPU; the state passed to `step` is then invalid afterwards).
        """
        self.cfg = vae.cfg
        self.normalized = normalized
        self.graphdef, self.params = nnx.split(vae)
        self._step = jax.jit(self.apply, donate_argnums=(1,) if donate_state else ())

    def init(self, batch: int, h: int, w: int) -> DecodeState:
        """All-zero caches for latents of `h x w` (a fresh stream)."""
        z = jax.ShapeDtypeStruct((batch, 2, h, w, self.cfg.z_dim), jnp.float32)
        caches = jax.eval_shape(lambda p, z: self._decode(p, z, None, True)[1], self.params, z)
        # host zeros: eager jnp.zeros would compile one program per cache shape
        return DecodeState(tuple(jax.device_put(np.zeros(c.shape, c.dtype)) for c in caches), True)

    def _decode(self, params, z, caches, first):
        vae = nnx.merge(self.graphdef, params)
        if self.normalized:
            z = denormalize_latents(z, self.cfg)
        return vae.decode_chunk(z, None if caches is None else list(caches), first=first)

    def apply(self, params, state: DecodeState, z):
        """Pure step: (params, state, z `[B, t, h, w, z]`) -> (video chunk, next state)."""
        if state.caches:
            want = state.caches[0].shape
            if (z.shape[0], *z.shape[2:4]) != (want[0], *want[2:4]):
                raise ValueError(
                    f"latent chunk {tuple(z.shape)} does not match the stream state "
                    f"(batch {want[0]}, {want[2]}x{want[3]} latents)"
                )
        y, caches = self._decode(params, z, state.caches, state.first)
        return y, DecodeState(tuple(caches), False)

    def step(self, state: DecodeState, z):
        """Decode one chunk; returns (video `[B, t_out, 8h, 8w, 3]`, next state)."""
        return self._step(self.params, state, z)

    def decode(self, z, chunk_frames: int = 1):
        """Whole latents `[B, T', h, w, z]` -> video, `chunk_frames` latent frames per jitted step."""
        state = self.init(z.shape[0], z.shape[2], z.shape[3])
        outs = []
        for s in range(0, z.shape[1], chunk_frames):
            y, state = self.step(state, z[:, s : s + chunk_frames])
            outs.append(y)
        return jnp.concatenate(outs, axis=1)


def decode_stream(vae: WanVAE, latents, chunk_frames: int = 1, normalized: bool = False):
    """Decode `latents [B, T', h, w, z]` `chunk_frames` latent frames at a time (jitted steps)."""
    return StreamingDecoder(vae, normalized=normalized).decode(latents, chunk_frames)
