"""Generate videos with a causal few-step student, streaming chunk by chunk.

    python -m crm_jax.sample --random_init --model tiny --frames 16 --steps 2 \\
        --block_frames 1 --out video.gif [--actions FILE] [--prompts FILE] [--interactive]
    python -m crm_jax.sample --ckpt DIR ...      # crm_jax NNX, diffusers or original Wan dir
    python -m crm_jax.sample --ckpt runs/wan_sf_dmd/export --vae VAE_DIR \\
        --embeddings data/wan_prompts/embeddings.npz --frames 21 --block_frames 3 --out video.mp4

Toy world (`--model tiny` with --random_init, or any checkpoint with 12 input channels):
latents are pixels folded 2x2 into channels (`crm_jax.data.toy_latents`), frames are
`--height` x `--width` RGB, and the model takes the 5 toy actions (stay up down left right).

--actions FILE   action names or ids, whitespace/comma separated, one frame each, in order
                 (any number per line; '#' starts a comment); must cover --frames.
--interactive    before each chunk, read one line from stdin: one action for the whole chunk
                 ("up"), or one per frame ("1 1 2"); an empty line repeats the last one; EOF
                 or "q" ends the video. Frames go to --out as they come and, for the toy
                 world, an ASCII preview of each chunk's last frame goes to stdout.
--prompts FILE   one prompt per line -> one video each (batched), format of
                 crm_jax.data.prompts: "scene=0 color=red" (toy world, embedded like the toy
                 training data) or a path to a .npy text embedding [text_len, text_dim]
                 (e.g. precomputed umT5 for Wan), optionally followed by "| up up left ..."
                 (one action per frame, on every line or none).
--embeddings F   an .npz of `python -m crm_jax.tools.encode_prompts` (context [n, L, D]): one
                 video per row (--rows picks some, e.g. "0,2").
--vae PATH       Wan VAE (a diffusers AutoencoderKLWan directory or the original Wan2.1_VAE.pth):
                 every chunk of (normalized) latents is decoded to pixels as it is generated
                 (`StreamingDecoder`, causal feature cache), so frames reach --out chunk by chunk.
                 T latent frames decode to 1 + 4(T-1) video frames of 8x the latent size.
Outputs (--out, several comma separated): .gif (imageio or Pillow), .mp4 (imageio + imageio-ffmpeg), .npz (raw uint8
frames, always available; for non-toy models without a VAE: raw latents).
Missing input files (--ckpt, --vae, --embeddings, --prompts, --actions) stop the run before
anything is computed or written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

import numpy as np

TOY_CHANNELS = 12


# ----------------------------------------------------------------------------- files


def _lines(path: str, what: str):
    if not os.path.isfile(path):
        raise ValueError(f"{what} file {path!r} does not exist")
    with open(path) as f:
        for no, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if line:
                yield no, line


def read_actions_file(path: str, num_actions: int, names: Sequence[str]) -> np.ndarray:
    """Per-frame action ids `[T]` from a text file; ValueError naming file and line."""
    from crm_jax.sampling.actions import parse_action_tokens

    out = []
    for no, line in _lines(path, "actions"):
        try:
            out += parse_action_tokens(line.replace(",", " ").split(), names, num_actions)
        except ValueError as e:
            raise ValueError(f"{path}:{no}: {e}") from None
    if not out:
        raise ValueError(f"actions file {path!r} holds no actions")
    return np.asarray(out, np.int32)


def toy_context(scene_colors, text_len: int, text_dim: int) -> np.ndarray:
    """Toy prompts [(scene, colour)] -> contexts `[B, text_len, text_dim]`.

    The same embedding the toy training data uses (`ToySource.embed_prompt`: a fixed
    random table of the prompt tokens [scene, num_scenes + colour], zero padded).
    """
    import jax.numpy as jnp

    from crm_jax.data import toy_world as tw
    from crm_jax.data.toy_source import ToySource

    world = tw.ToyWorldConfig()
    tokens = jnp.stack([tw.make_prompt(s, c, world) for s, c in scene_colors]).astype(jnp.int32)
    src = ToySource(world, len(scene_colors), text_len, text_dim)
    return np.asarray(src.embed_prompt(tokens), np.float32)


def read_prompts_file(path: str, text_len: int, text_dim: int, toy: bool, num_actions: int):
    """(contexts `[B, text_len, text_dim]`, actions `[B, T]` or None) from a prompt file.

    Format of `crm_jax.data.prompts` (one sample per line, `PROMPT` or `PROMPT | ACTIONS`):
    toy prompts `scene=<id> color=<id|name>`; otherwise PROMPT must be a path (relative to
    the file) to a `.npy` text embedding `[text_len, text_dim]` since no text encoder is
    configured here. ValueError naming file and line for bad lines.
    """
    from crm_jax.data import prompts as pf
    from crm_jax.data import toy_world as tw

    if not os.path.isfile(path):
        raise ValueError(f"prompts file {path!r} does not exist")
    lines = pf.read_prompt_file(path, num_actions=num_actions or tw.NUM_ACTIONS)
    ctx, pairs = [], []
    for pl in lines:
        where = f"{path}:{pl.line}"
        if pl.prompt.endswith(".npy"):
            emb_path = pl.prompt if os.path.isabs(pl.prompt) else os.path.join(os.path.dirname(path), pl.prompt)
            if not os.path.isfile(emb_path):
                raise ValueError(f"{where}: embedding file {emb_path!r} does not exist")
            e = np.load(emb_path).astype(np.float32)
            if e.shape != (text_len, text_dim):
                raise ValueError(
                    f"{where}: embedding {emb_path!r} has shape {e.shape}, the model wants [{text_len}, {text_dim}]"
                )
            ctx.append(e)
        elif toy:
            try:
                pairs.append(pf.parse_toy_prompt(pl.prompt, tw.ToyWorldConfig()))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            ctx.append(None)
        else:
            raise ValueError(
                f"{where}: this model needs text embeddings: give a .npy path "
                f"[{text_len}, {text_dim}] per line (no text encoder is configured)"
            )
    if pairs:
        emb = iter(toy_context(pairs, text_len, text_dim))
        ctx = [next(emb) if c is None else c for c in ctx]
    acts = [pl.actions for pl in lines]
    if all(a is None for a in acts):
        return np.stack(ctx), None
    if any(a is None for a in acts) or len({len(a) for a in acts}) != 1:
        raise ValueError(
            f"{path}: give actions ('PROMPT | a0 a1 ...') on every line or on none, "
            "with the same number of actions each"
        )
    return np.stack(ctx), np.asarray(acts, np.int32)


def read_embeddings_file(path: str, text_len: int, text_dim: int, rows: str | None = None):
    """(contexts `[B, text_len, text_dim]`, actions `[B, T]` or None) from an `encode_prompts`
    embeddings .npz (`context [n, L, D]`, optional `actions [n, T]`); `rows` "0,2" picks rows."""
    try:
        z = np.load(path, allow_pickle=False)
        ctx = np.asarray(z["context"] if "context" in z.files else z["prompt_embeds"], np.float32)
        acts = np.asarray(z["actions"], np.int32) if "actions" in z.files else None
    except KeyError:
        raise ValueError(f"{path!r}: needs an array 'context' [n, L, D]") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read prompt embeddings {path!r}: {e}") from e
    if ctx.ndim != 3 or ctx.shape[1:] != (text_len, text_dim):
        raise ValueError(f"{path!r}: context is {list(ctx.shape)}, the model wants [n, {text_len}, {text_dim}]")
    if rows:
        idx = [int(r) for r in rows.replace(",", " ").split()]
        if min(idx) < 0 or max(idx) >= len(ctx):
            raise ValueError(f"--rows {rows!r}: {path!r} has rows 0..{len(ctx) - 1}")
        ctx = ctx[idx]
        acts = None if acts is None else acts[idx]
    return ctx, acts


# ----------------------------------------------------------------------------- model


def check_sample_inputs(args) -> None:
    """Every input path of the command line exists (MissingInputError otherwise), before any work."""
    from crm_jax.inputs import CKPT, FILE, VAE, Input, check_inputs

    ins = [Input("--ckpt", args.ckpt, CKPT, required=False), Input("--vae", args.vae, VAE, required=False)]
    for flag in ("embeddings", "prompts", "actions"):
        ins.append(Input(f"--{flag}", getattr(args, flag), FILE, required=False))
    check_inputs(ins, "python -m crm_jax.sample")


def load_decoder(path: str, cfg):
    """A `StreamingDecoder` of the Wan VAE at `path`, taking the DiT's normalized latents."""
    from crm_jax.models.vae import StreamingDecoder
    from crm_jax.models.vae_convert import load_wan_vae

    vae = load_wan_vae(path)
    if vae.cfg.z_dim != cfg.in_channels:
        raise ValueError(f"--vae {path!r} has z_dim={vae.cfg.z_dim}, the model makes {cfg.in_channels}-channel latents")
    return StreamingDecoder(vae, normalized=True)


def build_model(args):
    """(apply, params, cfg) from --ckpt or --random_init."""
    from crm_jax.models.config import get_model_config
    from crm_jax.models.wan import functional, init_model

    over = {}
    if args.attn_impl:
        over["attn_impl"] = args.attn_impl
    if args.dtype:
        over.update(dtype=args.dtype, param_dtype=args.dtype)
    if args.ckpt:
        from crm_jax.models.convert import load_any

        if not os.path.isdir(args.ckpt):
            raise ValueError(f"checkpoint directory {args.ckpt!r} does not exist")
        model = load_any(args.ckpt, **over)
    else:
        if args.model == "tiny":
            over.setdefault("in_channels", TOY_CHANNELS)
            over.setdefault("out_channels", TOY_CHANNELS)
            over.setdefault("num_actions", 5)
        if args.num_actions is not None:
            over["num_actions"] = args.num_actions
        model = init_model(get_model_config(args.model, **over), args.seed)
    apply, params = functional(model)
    return apply, params, model.cfg


# ----------------------------------------------------------------------------- interactive


class StdinActions:
    """Callback for `StreamingSampler.stream`: one stdin line per chunk (see the module doc)."""

    def __init__(self, stdin: TextIO, stdout: TextIO, num_actions: int, names: Sequence[str]):
        self.stdin, self.stdout, self.num_actions, self.names = stdin, stdout, num_actions, names
        self.last: list[int] | None = None
        self.done = False
        self.log: list[list[int]] = []

    def __call__(self, index: int, start: int, frames: int):
        from crm_jax.sampling.actions import parse_action_tokens

        while True:
            self.stdout.write(f"chunk {index} (frames {start}..{start + frames - 1}) action> ")
            self.stdout.flush()
            line = self.stdin.readline()
            if not line or line.strip().lower() in ("q", "quit", "exit"):
                self.stdout.write("\n(end of input: stopping)\n")
                raise EOFError
            toks = line.split("#", 1)[0].replace(",", " ").split()
            try:
                if not toks:
                    if self.last is None:
                        raise ValueError("no previous action to repeat")
                    ids = [self.last[-1]] * frames
                else:
                    ids = parse_action_tokens(toks, self.names, self.num_actions)
                    if len(ids) == 1:
                        ids = ids * frames
                    elif len(ids) != frames:
                        raise ValueError(f"give 1 action or {frames} (one per frame), got {len(ids)}")
            except ValueError as e:
                self.stdout.write(f"  {e}\n")
                continue
            self.last = ids
            self.log.append(ids)
            return np.asarray(ids, np.int32)


# ----------------------------------------------------------------------------- main


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{text} must be > 0")
        return v

    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (--help shows the usage)
        self.exit(2, f"error: {message}\n")


def parse_args(argv=None):
    p = _Parser(
        prog="python -m crm_jax.sample",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="model directory (crm_jax NNX, diffusers or original Wan)")
    src.add_argument("--random_init", action="store_true", help="random weights (smoke tests, benchmarks)")
    p.add_argument("--model", default="tiny", help="config for --random_init: tiny (toy world), wan_1_3b, wan_14b")
    p.add_argument("--num_actions", type=int, default=None, help="override the action vocabulary (--random_init)")
    p.add_argument(
        "--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="compute/param dtype override"
    )
    p.add_argument("--attn_impl", default=None, help="attention backend override (default: the config's)")
    p.add_argument(
        "--frames", type=_positive(int), default=16, help="latent frames (toy: video frames); max in --interactive"
    )
    p.add_argument("--steps", default="2", help="steps per chunk: '2', or per chunk '4,2' (last repeats)")
    p.add_argument("--block_frames", type=_positive(int), default=1, help="frames per chunk (1: frame-wise)")
    p.add_argument("--first_block_frames", type=int, default=None)
    p.add_argument("--local_attn_blocks", type=int, default=0, help="rolling window in blocks (0: keep all)")
    p.add_argument("--sink_blocks", type=int, default=0)
    p.add_argument("--max_cache_frames", type=int, default=None, help="largest KV cache allowed, frames")
    p.add_argument("--context", choices=("clean", "noisy"), default="clean")
    p.add_argument("--height", type=int, default=32, help="toy frame height in pixels")
    p.add_argument("--width", type=int, default=32, help="toy frame width in pixels")
    p.add_argument("--latent_hw", default="60,104", help="latent H,W for non-toy models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=_positive(float), default=8.0)
    p.add_argument("--prompts", help="prompt file: one prompt per line")
    p.add_argument("--embeddings", help="prompt embeddings .npz (encode_prompts): one video per row")
    p.add_argument("--rows", default=None, help="with --embeddings: rows to use, e.g. '0,2' (default all)")
    p.add_argument("--vae", help="Wan VAE (diffusers directory or Wan2.1_VAE.pth): decode chunks to pixels")
    p.add_argument("--actions", help="action file (names or ids, one per frame)")
    p.add_argument("--interactive", action="store_true", help="read one action line per chunk from stdin")
    p.add_argument(
        "--out",
        required=True,
        help="output .gif, .mp4 or .npz; several comma separated "
        "(e.g. v.mp4,v.gif); with several prompts X_0.mp4, X_1.mp4, ...",
    )
    return p.parse_args(argv)


def _out_paths(out: str, batch: int) -> list[str]:
    if batch == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}_{i}{ext}" for i in range(batch)]


def check_request(args) -> list[str]:
    """Stage 1, before any model is built: the --out paths (writable; returned as a list), every
    input path, and the flags that exclude each other."""
    from crm_jax.sampling.video import check_writable

    outs = [o.strip() for o in args.out.split(",") if o.strip()]
    if not outs:
        raise ValueError("--out is empty")
    for o in outs:
        check_writable(o)
    check_sample_inputs(args)
    if args.interactive and args.actions:
        raise ValueError("--interactive reads actions from stdin: drop --actions")
    if args.prompts and args.embeddings:
        raise ValueError("give --prompts or --embeddings, not both")
    return outs


def latent_size(args, cfg, outs: Sequence[str]) -> tuple[bool, tuple[int, int]]:
    """Stage 3: (toy, latent (H, W)) for the model `cfg`; a non-toy model's latents need --vae
    unless every output is raw .npz."""
    toy = cfg.in_channels == TOY_CHANNELS
    if toy:
        if args.height % 4 or args.width % 4:
            raise ValueError(
                f"toy frames must be multiples of 4 pixels (2x2 fold + 2x2 patch), got {args.height}x{args.width}"
            )
        if args.vae:
            raise ValueError("--vae: the toy model's latents are folded pixels, they need no VAE")
        return True, (args.height // 2, args.width // 2)
    if not args.vae and not all(o.lower().endswith(".npz") for o in outs):
        raise ValueError(
            f"model with {cfg.in_channels} latent channels: give --vae to decode them to "
            "pixels, or write raw latents with --out X.npz"
        )
    return False, tuple(int(v) for v in args.latent_hw.split(","))


def conditioning(args, cfg, toy: bool, stdin: TextIO, stdout: TextIO):
    """Stage 4: (context `[B, text_len, text_dim]`, actions, feeder).

    actions: int `[B, frames]` from --actions / --prompts / --embeddings, the `StdinActions`
    callback with --interactive (then also returned as `feeder`), or None.
    """
    from crm_jax.data.toy_world import ACTION_NAMES

    actions, feeder = None, None
    if args.embeddings:
        context, actions = read_embeddings_file(args.embeddings, cfg.text_len, cfg.text_dim, args.rows)
        if actions is not None and (not cfg.num_actions or args.actions or args.interactive):
            actions = None  # the model takes none, or they come from elsewhere
        if actions is not None and actions.shape[1] < args.frames:
            raise ValueError(f"{args.embeddings}: {actions.shape[1]} actions per prompt for {args.frames} frames")
    elif args.prompts:
        context, actions = read_prompts_file(args.prompts, cfg.text_len, cfg.text_dim, toy, cfg.num_actions)
        if actions is not None and (args.actions or args.interactive):
            raise ValueError(f"{args.prompts} holds actions: drop --actions / --interactive")
        if actions is not None and actions.shape[1] < args.frames:
            raise ValueError(f"{args.prompts}: {actions.shape[1]} actions per prompt for {args.frames} frames")
    elif toy:
        context = toy_context([(0, 0)], cfg.text_len, cfg.text_dim)  # scene 0, red sprite
    else:
        context = np.zeros((1, cfg.text_len, cfg.text_dim), np.float32)

    if args.actions:
        if not cfg.num_actions:
            raise ValueError("--actions given but the model takes no actions (num_actions=0)")
        actions = read_actions_file(args.actions, cfg.num_actions, ACTION_NAMES)
        if len(actions) < args.frames:
            raise ValueError(f"{args.actions}: {len(actions)} actions for {args.frames} frames")
    elif args.interactive:
        if not cfg.num_actions:
            raise ValueError("--interactive needs a model that takes actions (num_actions > 0)")
        feeder = actions = StdinActions(stdin, stdout, cfg.num_actions, ACTION_NAMES)
    if isinstance(actions, np.ndarray):
        actions = actions[..., : args.frames]
    return context, actions, feeder


class VideoSink:
    """Where the sampled chunks go: every --out file of every video of the batch.

    Toy latents become frames (`latents_to_frames`), other latents are decoded by the VAE's
    `StreamingDecoder` when there is one, or else collected and saved raw (`{latents: [T, H, W, C]}`
    .npz per video) at `close()`. With `flush`, files are flushed after every chunk.
    """

    def __init__(self, outs: Sequence[str], batch: int, fps: float, toy: bool, decoder, latent_hw, flush: bool):
        from crm_jax.sampling.video import VideoWriter

        self.per_out = [_out_paths(o, batch) for o in outs]  # [output][video]
        self.paths = [p for ps in self.per_out for p in ps]
        self.toy, self.decoder, self.flush = toy, decoder, flush
        self.raw = [] if not toy and decoder is None else None
        self.writers = (
            [] if self.raw is not None else [[VideoWriter(ps[i], fps) for ps in self.per_out] for i in range(batch)]
        )  # [video][output]
        self.dec_state = None if decoder is None else decoder.init(batch, *latent_hw)
        self.video_frames = 0

    def add(self, lat: np.ndarray) -> np.ndarray | None:
        """Take one chunk of latents `[B, f, H, W, C]`; returns its video frames `[B, f', H', W', 3]`
        in [0, 1] (None when kept raw)."""
        from crm_jax.data.toy_latents import latents_to_frames

        if self.raw is not None:
            self.raw.append(lat)
            return None
        if self.toy:
            vid = latents_to_frames(lat)
        else:  # [-1, 1]: 1 + 4(f-1) frames for the first chunk, then 4f
            pix, self.dec_state = self.decoder.step(self.dec_state, lat.astype(np.float32))
            vid = (np.asarray(pix) + 1.0) * 0.5
        for ws, v in zip(self.writers, vid):
            for w in ws:
                w.append(v)
                if self.flush:
                    w.flush()
        self.video_frames += vid.shape[1]
        return vid

    def close(self) -> None:
        if self.raw is not None:
            for ps in self.per_out:
                for i, p in enumerate(ps):
                    lat = np.concatenate([r[i] for r in self.raw]) if self.raw else np.zeros((0,), np.float32)
                    np.savez(p, latents=lat)
        for ws in self.writers:
            for w in ws:
                w.close()


def stream_to(sink: VideoSink, sampler, args, context, actions, feeder, stdout: TextIO) -> tuple[int, float | None]:
    """Stage 6: generate `args.frames` latent frames chunk by chunk into `sink` (an interactive
    run ends early at end of input). Returns (latent frames generated, seconds to the first chunk)."""
    import jax
    from tqdm import tqdm

    from crm_jax.data.toy_world import ACTION_NAMES
    from crm_jax.sampling.video import ascii_frame

    bar = tqdm(total=args.frames, unit="frame", desc="sampling", file=sys.stderr, disable=args.interactive)
    t0, first, frames_done = time.perf_counter(), None, 0
    try:
        gen = sampler.stream(jax.random.key(args.seed), context, args.frames, actions)
        while True:
            try:
                chunk = next(gen)
            except (StopIteration, EOFError):
                break
            lat = np.asarray(chunk.frames)  # blocks until the chunk is ready
            first = first if first is not None else time.perf_counter() - t0
            frames_done += lat.shape[1]
            vid = sink.add(lat)
            if feeder is not None and vid is not None:
                last = chunk.start + lat.shape[1] - 1
                if sink.toy:
                    names = [ACTION_NAMES[a] for a in chunk.actions[0]]
                    stdout.write(f"\nchunk {chunk.index}: frames {chunk.start}..{last}, actions {names}\n")
                    stdout.write(ascii_frame(vid[0, -1]) + "\n")
                else:
                    stdout.write(f"\nchunk {chunk.index}: {vid.shape[1]} video frames\n")
                stdout.flush()
            bar.update(lat.shape[1])
    finally:
        bar.close()
    return frames_done, first


def main(
    argv=None, *, stdin: TextIO | None = None, stdout: TextIO | None = None, model_fn: Callable | None = None
) -> dict:
    """Run the CLI; returns a summary dict. `model_fn(args) -> (apply, params, cfg)` replaces
    `build_model` (tests use it to plug in a test double)."""
    from crm_jax.models.wan import AttentionPattern
    from crm_jax.sampling import StreamingSampler
    from crm_jax.sampling.plan import chunk_bounds

    args = parse_args(argv)
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    outs = check_request(args)
    apply, params, cfg = (model_fn or build_model)(args)
    toy, latent_hw = latent_size(args, cfg, outs)
    decoder = load_decoder(args.vae, cfg) if args.vae else None
    context, actions, feeder = conditioning(args, cfg, toy, stdin, stdout)
    batch = context.shape[0]
    steps = tuple(int(s) for s in args.steps.replace(",", " ").split())
    pattern = AttentionPattern(
        "block_causal", args.block_frames, args.first_block_frames, args.local_attn_blocks, args.sink_blocks
    )
    sampler = StreamingSampler(
        apply, params, cfg, pattern, latent_hw, batch, steps, args.context, args.max_cache_frames
    )

    t0 = time.perf_counter()
    sink = VideoSink(outs, batch, args.fps, toy, decoder, latent_hw, flush=feeder is not None)
    try:
        frames_done, first = stream_to(sink, sampler, args, context, actions, feeder, stdout)
    finally:
        sink.close()
    total = time.perf_counter() - t0
    print(
        f"wrote {sink.video_frames or frames_done} frames to {', '.join(sink.paths)} "
        f"({total:.1f}s, first chunk {first or 0:.2f}s)",
        file=sys.stderr,
    )
    return dict(
        outputs=sink.paths,
        frames=frames_done,
        video_frames=sink.video_frames,
        chunks=sum(1 for _ in chunk_bounds(pattern, args.frames)),
        first_chunk_s=first,
        total_s=total,
        actions=None if feeder is None else feeder.log,
    )


def console() -> None:
    """The command line (`crm-sample`): every failure one `error:` line (crm_jax.errors)."""
    from crm_jax.errors import run_command

    run_command(lambda argv: main(argv[1:]) and None, parse_flags=False)


if __name__ == "__main__":
    console()
