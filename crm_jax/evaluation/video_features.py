"""A small video classifier trained on the toy world's clips, and the Fréchet distance in its
feature space (an FVD-like score that never sees model samples in training).

The classifier (3D convolutions, NNX) reads clips `[B, T, H, W, 3]` in [0, 1] and predicts
what the simulator knows: the scene, every sprite's colour, and every sprite's per-frame
motion (sign of its displacement on each axis: 9 classes). The clip embedding used for the
Fréchet distance is the time-mean of its per-frame features `[B, feat]`, so it reflects
appearance and motion.

  model = train_classifier(world, steps=2000, batch_size=128)     # FeatureModel
  model.save(dir); model = FeatureModel.load(dir)
  fd = model.frechet_distance(frames_a, frames_b)                 # float
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from crm_jax.data import toy_world as tw

MOTION_CLASSES = 9  # (sign dx + 1) * 3 + (sign dy + 1)


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    world: tw.ToyWorldConfig
    width: int = 32  # channels of the first conv (then 2x)
    feat: int = 128  # clip feature size


class VideoClassifier(nnx.Module):
    def __init__(self, cfg: ClassifierConfig, *, rngs: nnx.Rngs):
        w, wd = cfg.width, cfg.world
        if wd.height % 4 or wd.width % 4:
            raise ValueError(f"frame size {(wd.height, wd.width)} must be divisible by 4")
        conv = functools.partial(nnx.Conv, kernel_size=(3, 3, 3), padding="SAME", rngs=rngs)
        self.c1 = conv(3, w)
        self.c2 = conv(w, 2 * w, strides=(1, 2, 2))
        self.c3 = conv(2 * w, 2 * w, strides=(1, 2, 2))
        self.proj = nnx.Linear(2 * w * (wd.height // 4) * (wd.width // 4), cfg.feat, rngs=rngs)
        n = wd.num_sprites
        self.scene = nnx.Linear(cfg.feat, wd.num_scenes, rngs=rngs)
        self.color = nnx.Linear(cfg.feat, n * len(tw.PALETTE), rngs=rngs)
        self.motion = nnx.Linear(2 * cfg.feat, n * MOTION_CLASSES, rngs=rngs)
        self.n = n

    def frame_features(self, clips):
        """`[B, T, H, W, 3]` in [0, 1] -> `[B, T, feat]`."""
        x = clips * 2.0 - 1.0
        x = jax.nn.gelu(self.c1(x))
        x = jax.nn.gelu(self.c2(x))
        x = jax.nn.gelu(self.c3(x))
        return jax.nn.gelu(self.proj(x.reshape(*x.shape[:2], -1)))

    def __call__(self, clips):
        """Logits: scene `[B, S]`, color `[B, N, 6]`, motion `[B, T-1, N, 9]`; and features `[B, feat]`."""
        f = self.frame_features(clips)
        clip = f.mean(1)
        pairs = jnp.concatenate([f[:, 1:], f[:, :-1]], -1)
        b, t1 = pairs.shape[:2]
        return dict(
            scene=self.scene(clip),
            color=self.color(clip).reshape(b, self.n, -1),
            motion=self.motion(pairs).reshape(b, t1, self.n, MOTION_CLASSES),
        ), clip


def labels(ep: tw.Episode) -> dict:
    """Targets of a batched episode: scene `[B]`, color `[B, N]`, motion `[B, T-1, N]`."""
    d = jnp.sign(ep.states[:, 1:] - ep.states[:, :-1]).astype(jnp.int32) + 1  # [B, T-1, N, 2]
    return dict(scene=ep.scene, color=ep.colors, motion=d[..., 0] * 3 + d[..., 1])


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def frechet_distance(a, b) -> float:
    """Fréchet distance between Gaussians fitted to features `a [N, F]` and `b [M, F]` (float64):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be [N, F] and [M, F], got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr = np.trace(s_a) + np.trace(s_b) - 2.0 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(np.sum((mu_a - mu_b) ** 2) + max(tr, 0.0))


class FeatureModel:
    """A trained classifier: clip embeddings and Fréchet distances."""

    def __init__(self, cfg: ClassifierConfig, params):
        self.cfg = cfg
        model = nnx.eval_shape(lambda: VideoClassifier(cfg, rngs=nnx.Rngs(0)))
        self._graphdef, _ = nnx.split(model)
        self.params = params
        self._embed = jax.jit(lambda p, x: nnx.merge(self._graphdef, p)(x)[1])

    @property
    def clip_frames(self) -> int:
        return self.cfg.world.num_frames

    def embed(self, clips, batch_size: int = 512) -> np.ndarray:
        """`[B, T, H, W, 3]` in [0, 1] (T = clip_frames) -> features `[B, feat]` float32."""
        clips = jnp.asarray(clips, jnp.float32)
        want = (self.clip_frames,) + self.cfg.world.frame_shape
        if clips.ndim != 5 or tuple(clips.shape[1:]) != want:
            raise ValueError(f"clips must be [B, {', '.join(map(str, want))}], got {tuple(clips.shape)}")
        return np.concatenate(
            [
                np.asarray(self._embed(self.params, clips[s : s + batch_size]))
                for s in range(0, clips.shape[0], batch_size)
            ]
        )

    def frechet_distance(self, clips_a, clips_b) -> float:
        return frechet_distance(self.embed(clips_a), self.embed(clips_b))

    def accuracy(self, key, episodes: int = 512) -> dict:
        """Held-out accuracy of each head on fresh simulator clips."""
        ep, frames = tw.sample_batch(key, episodes, self.cfg.world)
        logits, _ = nnx.merge(self._graphdef, self.params)(frames)
        y = labels(ep)
        return {k: float(jnp.mean(jnp.argmax(logits[k], -1) == y[k])) for k in logits}

    # ----------------------------------------------------------------- files
    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(self.params)[0]}
        np.savez(os.path.join(path, "params.npz"), **flat)
        meta = dict(width=self.cfg.width, feat=self.cfg.feat, world=dataclasses.asdict(self.cfg.world))
        with open(os.path.join(path, "classifier.json"), "w") as f:
            json.dump(meta, f, indent=1)

    @classmethod
    def load(cls, path: str) -> FeatureModel:
        meta_path, params_path = os.path.join(path, "classifier.json"), os.path.join(path, "params.npz")
        for p in (meta_path, params_path):
            if not os.path.exists(p):
                raise FileNotFoundError(
                    f"video classifier file {p!r} does not exist "
                    f"(train one with crm_jax.evaluation.video_features.train_classifier)"
                )
        with open(meta_path) as f:
            meta = json.load(f)
        cfg = ClassifierConfig(tw.ToyWorldConfig(**meta["world"]), meta["width"], meta["feat"])
        abstract = nnx.state(nnx.eval_shape(lambda: VideoClassifier(cfg, rngs=nnx.Rngs(0))))
        with np.load(params_path) as z:
            stored = dict(z)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
        names = [jax.tree_util.keystr(p) for p, _ in leaves]
        if set(names) != set(stored):
            raise ValueError(
                f"{params_path}: parameters {sorted(set(stored) ^ set(names))} do not match "
                f"the classifier of {meta_path}"
            )
        vals = []
        for (_, ref), name in zip(leaves, names):
            if stored[name].shape != ref.shape:
                raise ValueError(f"{params_path}: {name} has shape {stored[name].shape}, expected {ref.shape}")
            vals.append(jnp.asarray(stored[name], ref.dtype))
        return cls(cfg, jax.tree_util.tree_unflatten(treedef, vals))


def train_classifier(
    world: tw.ToyWorldConfig,
    *,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 32,
    feat: int = 128,
    progress: bool = False,
) -> FeatureModel:
    """Train the classifier on fresh simulator clips (batch of step s from fold_in(key(seed), s))."""
    cfg = ClassifierConfig(world, width, feat)
    model = VideoClassifier(cfg, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, key):
        ep, frames = tw.sample_batch(key, batch_size, world)
        y = labels(ep)

        def loss_fn(p):
            logits, _ = nnx.merge(graphdef, p)(frames)
            return sum(_xent(logits[k], y[k]) for k in logits)

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    from tqdm import tqdm

    base = jax.random.key(seed)
    for s in tqdm(range(steps), desc="video classifier", disable=not progress):
        params, opt, loss = step(params, opt, jax.random.fold_in(base, s))
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f"video classifier training diverged (loss {float(loss)})")
    return FeatureModel(cfg, params)
