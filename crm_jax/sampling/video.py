"""Video writers (GIF, MP4, raw NPZ) that take frames chunk by chunk, and an ASCII preview.

Frames are `[T, H, W, 3]` float in [0, 1] (or uint8). Back ends:
  .gif  imageio if installed, else Pillow      (pip install imageio  |  pip install pillow)
  .mp4  imageio with its ffmpeg plugin        (pip install imageio imageio-ffmpeg)
  .npz  numpy (always available): key "frames", uint8 `[T, H, W, 3]`
The file is complete after `close()`; `flush()` makes what was appended so far readable
(imageio streams as it goes; the Pillow and NPZ writers rewrite the file).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

FORMATS = (".gif", ".mp4", ".npz")


def _have(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def to_uint8(frames) -> np.ndarray:
    """`[T, H, W, 3]` float [0, 1] (or uint8) -> uint8."""
    f = np.asarray(frames)
    if f.ndim != 4 or f.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {f.shape}")
    if f.dtype == np.uint8:
        return f
    return (np.clip(f, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def check_writable(path: str, name: str = "--out") -> str:
    """The back end that will write `path` ('imageio', 'pillow' or 'numpy'); ValueError if none, or if
    `path` (set by flag `name`) cannot be written (checked before any compute)."""
    from crm_jax.inputs import check_output

    check_output(name, path, is_dir=False)
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"unsupported output {path!r}: use one of {', '.join(FORMATS)}")
    if ext == ".npz":
        return "numpy"
    if ext == ".gif":
        if _have("imageio"):
            return "imageio"
        if _have("PIL"):
            return "pillow"
        raise ValueError(
            f"writing {path!r} needs imageio or Pillow: `pip install imageio` (or `pip install pillow`); "
            "or write raw frames with --out X.npz"
        )
    if not (_have("imageio") and _have("imageio_ffmpeg")):
        raise ValueError(
            f"writing {path!r} needs imageio with ffmpeg: `pip install imageio imageio-ffmpeg`; "
            "or write a .gif / raw frames with --out X.npz"
        )
    return "imageio"


class VideoWriter:
    """Append frames chunk by chunk; `close()` (or the context manager) finishes the file."""

    def __init__(self, path: str, fps: float = 8.0):
        if not float(fps) > 0:
            raise ValueError(f"--fps {fps}: frames per second must be > 0")
        self.path, self.fps = path, float(fps)
        self.backend = check_writable(path)
        self.ext = os.path.splitext(path)[1].lower()
        self.frames: list[np.ndarray] = []  # kept for the Pillow / NPZ back ends
        self.count = 0
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        self._writer = None
        if self.backend == "imageio":
            import imageio.v2 as iio

            if self.ext == ".gif":
                # imageio's Pillow GIF plugin takes the frame duration in milliseconds.
                self._writer = iio.get_writer(path, mode="I", duration=1000.0 / self.fps, loop=0)
            else:
                # Start ffmpeg without a pre-exec hook, so the fork is a plain spawn (JAX is
                # multithreaded and warns about fork hooks); Ctrl-C then reaches ffmpeg too.
                os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")
                self._writer = iio.get_writer(path, fps=self.fps, codec="libx264", macro_block_size=1, quality=8)

    def append(self, frames) -> None:
        f = to_uint8(frames)
        self.count += len(f)
        if self._writer is not None:
            for im in f:
                self._writer.append_data(im)
        else:
            self.frames.extend(f)

    def flush(self) -> None:
        if self.backend == "pillow" and self.frames:
            from PIL import Image

            ims = [Image.fromarray(f) for f in self.frames]
            ims[0].save(self.path, save_all=True, append_images=ims[1:], duration=int(1000 / self.fps), loop=0)
        elif self.backend == "numpy":
            tmp = self.path + ".tmp.npz"
            np.savez(
                tmp, frames=np.stack(self.frames) if self.frames else np.zeros((0, 0, 0, 3), np.uint8), fps=self.fps
            )
            os.replace(tmp, self.path)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        else:
            self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_frames(path: str) -> np.ndarray:
    """Frames `[T, H, W, 3]` uint8 of a file written by `VideoWriter` (.npz; .gif/.mp4 via imageio)."""
    if path.lower().endswith(".npz"):
        with np.load(path) as z:
            return z["frames"]
    import imageio.v2 as iio

    return np.stack([np.asarray(f)[..., :3] for f in iio.mimread(path)])


_PALETTE = ((1, 0, 0, "R"), (0, 1, 0, "G"), (0, 0, 1, "B"), (1, 1, 0, "Y"), (1, 0, 1, "M"), (0, 1, 1, "C"))
_SHADES = " .:-=+*#"


def ascii_frame(frame, max_width: int = 32, tol: float = 0.3) -> str:
    """A small text picture of one `[H, W, 3]` frame in [0, 1] (toy world).

    Pixels close to a pure sprite colour print as its letter (R G B Y M C), others as a
    brightness shade. The frame is subsampled to at most `max_width` columns.
    """
    f = np.asarray(frame)
    f = f.astype(np.float32) / 255.0 if f.dtype == np.uint8 else f.astype(np.float32)
    if f.ndim != 3 or f.shape[-1] != 3:
        raise ValueError(f"frame must be [H, W, 3], got {f.shape}")
    step = max(1, -(-f.shape[1] // max_width))
    f = f[::step, ::step]
    rows = []
    for row in f:
        line = []
        for px in row:
            ch = None
            for r, g, b, name in _PALETTE:
                if np.all(np.abs(px - (r, g, b)) <= tol):
                    ch = name
                    break
            line.append(ch or _SHADES[min(int(px.mean() * len(_SHADES)), len(_SHADES) - 1)])
        rows.append("".join(line))
    return "\n".join(rows)
