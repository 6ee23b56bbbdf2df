"""Turn the functional Wan model into the plain callables the losses and samplers take.

Losses call networks as `fn(x, t, cond) -> RF velocity`; here `cond` is a dict
`{"context": [B, Ltxt, text_dim], "actions": [B, T] int (optional)}` and `t` is
`[B]` or `[B, T]`. For teacher forcing the losses pass the packed `[clean | noisy]`
video `[B, 2T, ...]`; per-frame actions are then repeated for both halves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from crm_jax.models.wan import AttentionPattern

sg = jax.lax.stop_gradient


def frame_times(t, x):
    """Per-frame times `[B, T]` of `x [B, T, ...]` from `t [B]` (broadcast) or `t [B, T]` (as is)."""
    t = jnp.asarray(t)
    return jnp.broadcast_to(t[:, None], x.shape[:2]) if t.ndim == 1 else t


def actions_for(actions, x):
    """Per-frame actions `[B, T]` for a model input `x [B, T', ...]`: as is when T' = T, repeated
    for both halves when `x` is the packed `[clean | noisy]` teacher-forcing video (T' = 2T);
    None stays None."""
    if actions is None:
        return None
    if x.shape[1] == 2 * actions.shape[1]:  # teacher forcing: [clean | noisy] share actions
        return jnp.concatenate([actions, actions], axis=1)
    return actions


def velocity_fn(apply, params, pattern: AttentionPattern, *, ad: str = "vjp", stop_grad: bool = False):
    """`fn(x [B, T, H, W, C], t [B] | [B, T], cond) -> v [B, T, H, W, C]` of `apply(params, ...)`.

    stop_grad: use `stop_gradient(params)` (the jvp copy of sCM / MeanFlow).
    ad: attention autodiff mode ("jvp" for functions used inside `jax.jvp`).
    """

    def fn(x, t, cond):
        p = sg(params) if stop_grad else params
        return apply(
            p,
            x,
            frame_times(t, x),
            cond["context"],
            pattern=pattern,
            actions=actions_for(cond.get("actions"), x),
            ad=ad,
        )

    return fn


def uncond_like(cond, neg_context):
    """The unconditional (negative-prompt) conditioning with the same actions."""
    out = dict(cond)
    out["context"] = jnp.broadcast_to(neg_context, cond["context"].shape).astype(cond["context"].dtype)
    return out


def average_velocity_fn(apply, params, pattern: AttentionPattern, *, ad: str = "vjp", stop_grad: bool = False):
    """MeanFlow's `u_fn(z, r, t, cond) -> u` for a model built with `mean_flow=True`.

    With a teacher-forcing pattern, `cond["tf_context"]` (the clean video `[B, T, ...]`)
    is packed in front of `z` at r = t = 0 and only the noisy half is returned; the
    context is a constant of the function, so its tangent is zero by construction.
    """

    def fn(z, r, t, cond):
        p = sg(params) if stop_grad else params
        t, r = frame_times(t, z), frame_times(r, z)
        actions = cond.get("actions")
        if pattern.kind == "teacher_forcing":
            ctx = cond["tf_context"].astype(z.dtype)
            f = z.shape[1]
            zero = jnp.zeros_like(t)
            out = apply(
                p,
                jnp.concatenate([ctx, z], 1),
                jnp.concatenate([zero, t], 1),
                cond["context"],
                pattern=pattern,
                r=jnp.concatenate([zero, r], 1),
                actions=None if actions is None else jnp.concatenate([actions, actions], 1),
                ad=ad,
            )
            return out[:, f:]
        return apply(p, z, t, cond["context"], pattern=pattern, r=r, actions=actions, ad=ad)

    return fn


def tf_velocity_fn(apply, params, pattern: AttentionPattern, *, ad: str = "vjp", stop_grad: bool = False):
    """Teacher-forcing velocity on the noisy half only, clean context from `cond["tf_context"]`."""
    base = velocity_fn(apply, params, pattern, ad=ad, stop_grad=stop_grad)

    def fn(x, t, cond):
        ctx = cond["tf_context"].astype(x.dtype)
        t = frame_times(t, x)
        out = base(jnp.concatenate([ctx, x], 1), jnp.concatenate([jnp.zeros_like(t), t], 1), cond)
        return out[:, x.shape[1] :]

    return fn
