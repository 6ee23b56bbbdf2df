"""Synthetic-data generation: sample the teacher, write an ArrayRecord dataset.

    python -m crm_jax.data.generate --config=configs/toy_generate.py --out=/path/to/dataset \
        [--config.num_samples=256] [--max_shards=N]

For every sample id ``i`` in ``[0, num_samples)`` the conditioning comes from

* ``cond.kind == "toy_world"``: an episode of the toy world drawn from ``fold_in(key(cond.seed), i)``
  (prompt tokens -> toy text embedding, its actions; ground-truth ``states``/``colors`` kept);
* ``cond.kind == "toy_prompts"``: line ``i % n`` of a toy prompt file (``prompts.py`` format;
  actions from the line, else from the world episode ``i``);
* ``cond.kind == "embeddings"`` (Wan): row ``i % n`` of an ``.npz`` with ``context [n, L, D]``
  (umT5: ``[n, 512, 4096]``), optional ``prompts [n]`` (text), ``actions [n, T]``,
  ``negative_context [L, D]`` (needed for CFG);

and its noise from ``fold_in(key(seed), i)``. The teacher (``euler_sample``: shifted Euler grid,
CFG against the negative context) maps noise to ``latents [T, H, W, C]``; with ``ode.save`` the
grid also contains the few-step times ``few_step_times(ode.num_steps, ode.sigma_max)[:-1]`` and
the states there are stored as ``ode_traj [K, T, H, W, C]`` (ODE-init baseline).

A sample depends only on its id and the config, never on batching or host layout. With several
processes (``crm_jax.distributed.maybe_init_distributed``: the same command on every host) process
``p`` of ``P`` writes the shards ``crm_jax.distributed.process_rows(num_shards, p, P)``
(``dataset.host_shards``), each host's batches split over its local devices (data-parallel
``jit``); process 0 marks the dataset complete once all have finished. Writing is resumable
(``dataset.ShardWriter``).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from crm_jax import diffusion as D
from crm_jax.data import dataset as ds
from crm_jax.data import prompts as pr
from crm_jax.data import toy_world as tw
from crm_jax.distributed import barrier, is_main_process, log, maybe_init_distributed
from crm_jax.models import adapter
from crm_jax.models.config import WanConfig, model_config_from, same_architecture
from crm_jax.models.wan import AttentionPattern, apply_for, functional

# ----------------------------------------------------------------------------- helpers


def model_config(c) -> WanConfig:
    return model_config_from(c.model)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def params_fingerprint(params) -> str:
    """Cheap identity of a parameter tree: shapes/dtypes and the first 4 KiB of every leaf."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        h.update(f"{jax.tree_util.keystr(path)}{tuple(leaf.shape)}{leaf.dtype}".encode())
        h.update(np.asarray(leaf.reshape(-1)[:1024]).tobytes())  # slice first: no full host copy
    return h.hexdigest()[:16]


def load_teacher(c, mcfg: WanConfig):
    """``(apply, params, identity dict)`` of the teacher checkpoint ``c.teacher`` (or a random init
    when ``c.allow_random_teacher``); its config must equal ``mcfg`` up to numerics."""
    if not c.teacher:
        if not c.get("allow_random_teacher", False):
            raise ValueError(
                "config.teacher is empty: give a teacher checkpoint directory "
                "(or set allow_random_teacher=True for tests)"
            )
        apply, params = random_teacher(mcfg, int(c.seed))
        return apply, params, {"checkpoint": f"random-init(seed={c.seed})"}
    from crm_jax.models import convert

    model = convert.load_any(c.teacher)
    if not same_architecture(model.cfg, mcfg):
        raise ValueError(
            f"teacher checkpoint {c.teacher!r} has model config {model.cfg}, but the generation config asks for {mcfg}"
        )
    # The config's runtime fields (dtype, attention backend, remat) apply to the loaded parameters.
    return apply_for(mcfg), functional(model)[1], {"checkpoint": os.path.abspath(c.teacher)}


def random_teacher(mcfg: WanConfig, seed: int):
    """``(apply, params)`` of a random teacher (tests and smoke runs only).

    Parameters are drawn with numpy (no compilation, unlike ``init_model``): weight matrices
    ``N(0, 1 / fan_in)``, modulation tables ``N(0, 1 / dim)``, norm weights one, biases zero.
    Deterministic in ``seed``.
    """
    from flax import nnx

    from crm_jax.models.wan import WanModel

    abstract = nnx.state(nnx.eval_shape(lambda: WanModel(mcfg, rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = jax.tree_util.keystr(path).lower()
        eff = x.shape[1:] if "blocks" in name else x.shape  # scanned blocks: stacked layer axis
        if "scale_shift_table" in name:
            return (rng.standard_normal(x.shape) / np.sqrt(mcfg.dim)).astype(x.dtype)
        if "norm" in name:
            return (np.ones if "weight" in name or "scale" in name else np.zeros)(x.shape, x.dtype)
        if len(eff) >= 2:
            return (rng.standard_normal(x.shape) / np.sqrt(np.prod(eff[:-1]))).astype(x.dtype)
        return np.zeros(x.shape, x.dtype)

    return apply_for(mcfg), jax.tree_util.tree_map_with_path(leaf, abstract)


# ----------------------------------------------------------------------------- conditioning


class Conditioner(abc.ABC):
    """Per-sample conditioning. ``get(ids) -> (arrays {name: [n, ...]}, texts [n])``."""

    features: dict[str, ds.Feature]
    num_actions: int = 0

    @abc.abstractmethod
    def get(self, ids: np.ndarray):
        """Conditioning arrays and prompt texts of sample ids."""

    def negative_context(self) -> np.ndarray | None:
        return None

    @abc.abstractmethod
    def identity(self) -> dict:
        """What the conditioning came from (recorded in the dataset metadata)."""


class ToyConditioner(Conditioner):
    """Toy-world prompts/actions (from the world by seed, or from a toy prompt file)."""

    def __init__(self, c, mcfg: WanConfig, latent_frames: int):
        from crm_jax.data.toy_source import ToySource

        cc = c.cond
        self.world = tw.ToyWorldConfig(num_frames=latent_frames, height=cc.height, width=cc.width)
        self.src = ToySource(self.world, 1, mcfg.text_len, mcfg.text_dim)
        self.seed = int(cc.seed)
        self.lines = pr.read_toy_prompt_file(cc.prompt_file, self.world) if cc.kind == "toy_prompts" else None
        self.kind, self.prompt_file = cc.kind, cc.prompt_file
        if 0 < mcfg.num_actions < tw.NUM_ACTIONS:
            raise ValueError(
                f"the toy world has {tw.NUM_ACTIONS} actions but the model only num_actions={mcfg.num_actions}"
            )
        self.num_actions = tw.NUM_ACTIONS if mcfg.num_actions > 0 else 0
        T, L, Dm = latent_frames, mcfg.text_len, mcfg.text_dim
        self.features = {"context": ds.Feature((L, Dm), "float32"), "prompt_tokens": ds.Feature((2,), "int32")}
        if self.num_actions:
            self.features["actions"] = ds.Feature((T,), "int32")
        if self.lines is None:
            n = self.world.num_sprites
            self.features.update(states=ds.Feature((T, n, 2), "float32"), colors=ds.Feature((n,), "int32"))

    def get(self, ids):
        eps = _toy_episodes(self.world, self.seed, jnp.asarray(ids))
        tokens, actions = np.array(eps.prompt), np.array(eps.actions, np.int32)  # writable copies
        if self.lines is not None:
            for r, i in enumerate(ids):
                pl, scene, color = self.lines[int(i) % len(self.lines)]
                tokens[r] = np.asarray(tw.make_prompt(scene, color, self.world))
                if pl.actions is not None:
                    actions[r] = pl.actions
        out = {
            "context": np.asarray(self.src.embed_prompt(jnp.asarray(tokens)), np.float32),
            "prompt_tokens": tokens.astype(np.int32),
        }
        if self.num_actions:
            out["actions"] = actions
        if self.lines is None:
            out.update(states=np.asarray(eps.states, np.float32), colors=np.asarray(eps.colors, np.int32))
        texts = [pr.toy_prompt_text(t[0], t[1] - self.world.num_scenes) for t in tokens]
        return out, texts

    def negative_context(self):
        return np.asarray(self.src.negative_context(), np.float32)

    def identity(self):
        out = {"kind": self.kind, "seed": self.seed, "world": dataclasses.asdict(self.world)}
        if self.lines is not None:
            out.update(prompt_file=os.path.abspath(self.prompt_file), sha256=_file_sha256(self.prompt_file))
        return out


class EmbeddingConditioner(Conditioner):
    """Precomputed text embeddings (Wan: umT5) from an ``.npz`` (see the module docstring)."""

    def __init__(self, c, mcfg: WanConfig, latent_frames: int):
        self.path = c.cond.embeddings
        if not self.path or not os.path.exists(self.path):
            raise FileNotFoundError(f"prompt-embedding file {self.path!r} does not exist")
        try:
            z = np.load(self.path, allow_pickle=False)
            keys = set(z.files)
            ctx_key = "context" if "context" in keys else "prompt_embeds"
            self.context = np.asarray(z[ctx_key])
            self.prompts = [str(s) for s in z["prompts"]] if "prompts" in keys else None
            self.actions = np.asarray(z["actions"]) if "actions" in keys else None
            self.neg = np.asarray(z["negative_context"]) if "negative_context" in keys else None
        except KeyError:
            raise ValueError(
                f"{self.path!r}: needs an array 'context' (or 'prompt_embeds') [n, L, D]; has {sorted(keys)}"
            ) from None
        except Exception as e:
            raise ValueError(f"cannot read prompt-embedding file {self.path!r}: {e}") from e
        n = self.context.shape[0] if self.context.ndim == 3 else -1
        if self.context.shape[1:] != (mcfg.text_len, mcfg.text_dim) or n < 1:
            raise ValueError(
                f"{self.path!r}: context is {list(self.context.shape)}, the model needs "
                f"[n, text_len, text_dim] = [n, {mcfg.text_len}, {mcfg.text_dim}]"
            )
        if self.prompts is not None and len(self.prompts) != n:
            raise ValueError(f"{self.path!r}: {len(self.prompts)} prompts for {n} embeddings")
        if self.neg is not None and self.neg.shape != self.context.shape[1:]:
            raise ValueError(
                f"{self.path!r}: negative_context is {list(self.neg.shape)}, expected {list(self.context.shape[1:])}"
            )
        self.num_actions = 0
        if mcfg.num_actions > 0:
            if self.actions is None or self.actions.shape != (n, latent_frames):
                raise ValueError(
                    f"{self.path!r}: the model takes actions: needs 'actions' "
                    f"[{n}, {latent_frames}], got "
                    f"{None if self.actions is None else list(self.actions.shape)}"
                )
            if self.actions.min() < 0 or self.actions.max() >= mcfg.num_actions:
                raise ValueError(f"{self.path!r}: action ids must be in [0, {mcfg.num_actions})")
            self.num_actions = int(mcfg.num_actions)
        dt = ds.dtype_name(self.context.dtype)
        self.features = {"context": ds.Feature(tuple(self.context.shape[1:]), dt)}
        if self.num_actions:
            self.features["actions"] = ds.Feature((latent_frames,), "int32")

    def get(self, ids):
        rows = np.asarray(ids) % self.context.shape[0]
        out = {"context": self.context[rows]}
        if self.num_actions:
            out["actions"] = self.actions[rows].astype(np.int32)
        texts = [self.prompts[r] if self.prompts else "" for r in rows]
        return out, texts

    def negative_context(self):
        return self.neg

    def identity(self):
        return {"kind": "embeddings", "file": os.path.abspath(self.path), "sha256": _file_sha256(self.path)}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _toy_episodes(world: tw.ToyWorldConfig, seed: int, ids):
    """Toy episodes of sample ids ``[n]`` (each from ``fold_in(key(seed), id)``), batched."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: tw.sample_episode(jax.random.fold_in(base, i), world))(ids)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _noise(seed: int, shape: tuple, ids):
    """Teacher noise ``[n, *shape]`` of sample ids ``[n]`` (each from ``fold_in(key(seed), id)``)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape))(ids)


def make_conditioner(c, mcfg: WanConfig, latent_frames: int) -> Conditioner:
    kind = c.cond.kind
    if kind in ("toy_world", "toy_prompts"):
        return ToyConditioner(c, mcfg, latent_frames)
    if kind == "embeddings":
        return EmbeddingConditioner(c, mcfg, latent_frames)
    raise ValueError(f"unknown cond.kind {kind!r} (known: toy_world, toy_prompts, embeddings)")


# ----------------------------------------------------------------------------- teacher sampling


def sampling_grid(c) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(grid [N'+1], ode_times [K] | None, ode_index [K] | None)``: the Euler grid (shifted,
    merged with the few-step times when ``c.ode.save``) and where the ODE points sit on it."""
    s = c.sampler
    grid = D.shifted_time_grid(s.num_steps, s.shift, s.t_max)
    if not c.ode.save:
        return grid, None, None
    ode_t = D.few_step_times(c.ode.num_steps, c.ode.sigma_max)[:-1]
    if ode_t[0] > grid[0] + 1e-12:
        raise ValueError(f"ode times {ode_t} start above the sampler's t_max {s.t_max}")
    keep = [t for t in grid if np.min(np.abs(ode_t - t)) > 1e-9]
    merged = np.sort(np.concatenate([keep, ode_t]))[::-1]
    idx = np.array([int(np.argmin(np.abs(merged - t))) for t in ode_t])
    return merged, ode_t, idx


def make_sample_fn(apply, pattern: AttentionPattern, c, mesh: Mesh, has_actions: bool, mcfg=None):
    """Jitted, data-parallel ``f(params, noise [B, T, H, W, C], context [B, L, D], actions [B, T],
    neg [L, D]) -> (x0 [B, ...], ode_traj [B, K, ...] | None)``, cached per settings.

    With a ``block_causal`` pattern the teacher is causal (trained by teacher forcing): it is
    sampled block by block with the clean earlier blocks in its KV cache
    (`crm_jax.sampling.causal.causal_sample`), which is what it was trained for."""
    grid, ode_t, idx = sampling_grid(c)
    if pattern.kind == "block_causal":
        if idx is not None:
            raise ValueError("ODE trajectories (ode.save) need a full-sequence teacher pattern, not block_causal")
        return _causal_sample_fn(
            apply, pattern, mcfg, tuple(grid.tolist()), float(c.sampler.guidance), bool(has_actions)
        )
    return _sample_fn(
        apply,
        pattern,
        tuple(grid.tolist()),
        None if idx is None else tuple(idx.tolist()),
        float(c.sampler.guidance),
        mesh,
        bool(has_actions),
    )


@functools.lru_cache(maxsize=16)
def _sample_fn(apply, pattern, grid, idx, guidance, mesh, has_actions):
    batch, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    grid = np.asarray(grid)

    def f(params, noise, context, actions, neg):
        fn = adapter.velocity_fn(apply, params, pattern)
        cond = {"context": context}
        if has_actions:
            cond["actions"] = actions
        uncond = None if guidance == 1.0 else adapter.uncond_like(cond, neg)
        if idx is None:
            return D.euler_sample(fn, noise, cond, times=grid, uncond=uncond, guidance=guidance), None
        x0, (traj, _) = D.euler_sample(
            fn, noise, cond, times=grid, uncond=uncond, guidance=guidance, return_trajectory=True
        )
        return x0, traj[:, np.asarray(idx)]

    return jax.jit(
        f,
        in_shardings=(rep, batch, batch, batch if has_actions else rep, rep),
        out_shardings=(batch, batch if idx is not None else None),
    )


def _causal_sample_fn(apply, pattern, mcfg, grid, guidance, has_actions):
    from crm_jax.sampling.causal import causal_sample

    def f(params, noise, context, actions, neg):
        x0 = causal_sample(
            apply,
            params,
            mcfg,
            None,
            context,
            pattern=pattern,
            num_frames=noise.shape[1],
            latent_hw=noise.shape[2:4],
            method="euler",
            times=grid,
            guidance=guidance,
            neg_context=neg,
            actions=actions if has_actions else None,
            noise=noise,
        )
        return x0, None

    return f


# ----------------------------------------------------------------------------- the program


class Generator:
    """Teacher + conditioning + dataset plan of a generation config ``c``.

    ``samples(ids)`` computes the records of sample ids ``[n]`` (``n <= batch_size``; padded to
    ``batch_size`` so one compiled shape serves all): ``({"id" [n], "latents" [n, T, H, W, C],
    "context" [n, L, D], ... "ode_traj" [n, K, T, H, W, C]}, texts [n])``.
    """

    def __init__(self, c, devices=None):
        self.c = c
        mcfg = self.mcfg = model_config(c)
        T, H, W, C = self.latent_shape = tuple(int(v) for v in c.latent_shape)
        if C != mcfg.in_channels:
            raise ValueError(
                f"latent_shape {tuple(c.latent_shape)} has {C} channels, the model expects "
                f"in_channels={mcfg.in_channels}"
            )
        self.cond = make_conditioner(c, mcfg, T)
        self.neg = self.cond.negative_context()
        if float(c.sampler.guidance) != 1.0 and self.neg is None:
            raise ValueError(
                f"guidance={c.sampler.guidance} needs a negative context; "
                f"the conditioning source ({c.cond.kind}) has none"
            )
        self.apply, self.params, teacher_id = load_teacher(c, mcfg)
        self.pattern = AttentionPattern(c.pattern.kind, c.pattern.block_frames, c.pattern.get("first_block_frames"))
        grid, ode_t, _ = sampling_grid(c)
        feats = {
            "id": ds.Feature((), "int64"),
            "latents": ds.Feature((T, H, W, C), c.latent_dtype),
            **self.cond.features,
        }
        extra = {"num_actions": self.cond.num_actions}
        if ode_t is not None:
            feats["ode_traj"] = ds.Feature((len(ode_t), T, H, W, C), c.latent_dtype)
            extra["ode_times"] = [float(t) for t in ode_t]
        source = {
            "kind": "teacher",
            "teacher": {**teacher_id, "fingerprint": params_fingerprint(self.params)},
            "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(mcfg).items()},
            "pattern": dataclasses.asdict(self.pattern),
            "sampler": {
                "num_steps": int(c.sampler.num_steps),
                "shift": float(c.sampler.shift),
                "t_max": float(c.sampler.t_max),
                "guidance": float(c.sampler.guidance),
                "grid": [float(t) for t in grid],
            },
            "noise_seed": int(c.seed),
            "conditioning": self.cond.identity(),
        }
        self.meta = ds.make_metadata(
            num_samples=int(c.num_samples),
            samples_per_shard=int(c.samples_per_shard),
            features=feats,
            text_fields=["prompt"],
            source=source,
            extra=extra,
        )
        self.devices = list(jax.local_devices() if devices is None else devices)
        self.batch_size = int(c.batch_size)
        if self.batch_size % len(self.devices):
            raise ValueError(f"batch_size {self.batch_size} is not divisible by the {len(self.devices)} local devices")
        self._ready = False

    def _setup(self):
        if not self._ready:
            mesh = Mesh(np.asarray(self.devices), ("data",))
            self._sample = make_sample_fn(self.apply, self.pattern, self.c, mesh, self.cond.num_actions > 0, self.mcfg)
            self._params = jax.device_put(self.params, NamedSharding(mesh, P()))
            shape = self.meta["features"]["context"]["shape"]
            self._neg = jnp.zeros(shape, jnp.float32) if self.neg is None else jnp.asarray(self.neg)
            self._ready = True

    def samples(self, ids) -> tuple[dict[str, np.ndarray], list[str]]:
        self._setup()
        B, n = self.batch_size, len(ids)
        if not 1 <= n <= B:
            raise ValueError(f"samples() takes 1..{B} ids, got {n}")
        ids = np.asarray(ids, np.int64)
        padded = np.concatenate([ids, np.full(B - n, ids[-1])])
        arrays, texts = self.cond.get(padded)
        acts = arrays.get("actions", np.zeros((B, self.latent_shape[0]), np.int32))
        noise = _noise(int(self.c.seed), self.latent_shape, jnp.asarray(padded))
        x0, traj = self._sample(self._params, noise, jnp.asarray(arrays["context"]), jnp.asarray(acts), self._neg)
        out_dt = ds.dtype_from_name(self.c.latent_dtype)
        out = {"id": ids, "latents": np.asarray(x0).astype(out_dt)[:n]}
        out.update({k: np.asarray(v)[:n] for k, v in arrays.items()})
        if traj is not None:
            out["ode_traj"] = np.asarray(traj).astype(out_dt)[:n]
        return out, texts[:n]

    def shard_records(self, shard: dict, counter: list | None = None, crash_after: int | None = None):
        """The examples of one shard (``shard`` from the metadata), in id order."""
        ids_all = np.arange(shard["first_id"], shard["first_id"] + shard["num_records"])
        for b0 in range(0, len(ids_all), self.batch_size):
            arrays, texts = self.samples(ids_all[b0 : b0 + self.batch_size])
            for r in range(len(texts)):
                if crash_after is not None and counter[0] >= crash_after:
                    raise RuntimeError(f"simulated crash after {counter[0]} records")
                if counter is not None:
                    counter[0] += 1
                yield {**{k: v[r] for k, v in arrays.items()}, "prompt": texts[r]}


def generate(
    c,
    out: str,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    max_shards: int | None = None,
    progress: bool = True,
    devices=None,
    crash_after_records: int | None = None,
) -> dict:
    """Generate (or resume) the dataset of config ``c`` in ``out``.

    Args:
      process_index / process_count: this host / number of hosts (default: JAX's).
      max_shards: stop after writing this many shards (this call; the rest on a later call).
      devices: local devices for data parallelism (default ``jax.local_devices()``).
      crash_after_records: test hook, raise ``RuntimeError`` after that many records were
        written by this call (simulates a crash mid-shard).
    Returns:
      ``{"written": shards written now, "pending": shards of this host still missing,
      "complete": dataset finished}``.
    """
    from tqdm import tqdm

    from crm_jax.inputs import check_inputs, generation_inputs

    check_inputs(generation_inputs(c), "generation config")  # before any compute or writing
    gen = Generator(c, devices)
    writer = ds.ShardWriter(out, gen.meta, process_index, process_count)
    if gen.neg is not None and not os.path.exists(os.path.join(out, ds.NEGATIVE)):
        writer.write_negative_context(gen.neg)
    todo = writer.pending()
    if max_shards is not None:
        todo = todo[:max_shards]
    counter = [0]
    total = sum(writer.shards[j]["num_records"] for j in todo)
    with tqdm(
        total=total,
        desc=f"generate (host {writer.pi}/{writer.pc})",
        disable=not progress or not is_main_process(),
        dynamic_ncols=True,
        unit="sample",
    ) as bar:
        for j in todo:
            recs = gen.shard_records(writer.shards[j], counter, crash_after_records)
            writer.write_shard(j, _counted(recs, bar))
    if process_count is None and jax.process_count() > 1:  # process 0 finalizes once all have written
        barrier("crm_jax.data.generate: shards written")
        if is_main_process():
            writer.finalize()
        barrier("crm_jax.data.generate: finalized")
        complete = bool(ds.read_metadata(out).get("complete"))
    else:
        complete = writer.finalize()
    return {"written": len(todo), "pending": len(writer.pending()), "complete": complete}


def _counted(it, bar):
    for x in it:
        yield x
        bar.update(1)


def _define_flags(fv):
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "generation config file (e.g. configs/wan_generate.py)", flag_values=fv, lock_config=True
    )
    flags.DEFINE_string("out", None, "output dataset directory (resumed if it exists)", flag_values=fv)
    flags.DEFINE_integer("max_shards", None, "write at most this many shards in this run", flag_values=fv)


def run(c, out: str, max_shards: int | None = None) -> dict:
    res = generate(c, out, max_shards=max_shards)
    status = "complete" if res["complete"] else f"{res['pending']} shard(s) of this host left"
    log(f"wrote {res['written']} shard(s) to {out}: {status}")
    return res


def cli(argv) -> dict:
    """In-process entry: `cli(["generate", "--config=...", "--out=DIR", "--config.key=value", ...])`
    (private flags, so it can run repeatedly in one process)."""
    from absl import flags

    from crm_jax.errors import config_file_arg, load_config_file

    spec = config_file_arg(argv)
    if spec is not None:
        load_config_file(spec)  # one UsageError naming the file
    fv = flags.FlagValues()
    _define_flags(fv)
    fv(list(argv))
    if fv["config"].value is None or not fv["out"].value:
        raise ValueError("--config and --out are required")
    return run(fv["config"].value, fv["out"].value, fv["max_shards"].value)


def main(argv) -> None:
    from absl import flags

    del argv
    maybe_init_distributed()
    run(flags.FLAGS.config, flags.FLAGS.out, flags.FLAGS.max_shards)


def console() -> None:
    """The command line (`crm-generate`): every failure one `error:` line (crm_jax.errors)."""
    from absl import flags

    from crm_jax.errors import run_command

    _define_flags(flags.FLAGS)
    flags.mark_flags_as_required(["config", "out"])
    run_command(main)


if __name__ == "__main__":
    console()
