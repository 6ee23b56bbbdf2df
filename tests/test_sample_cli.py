"""`python -m crm_jax.sample`: interactive stdin actions, action/prompt files, writers, errors.

Most tests plug in `scripted_world_model`, a TEST DOUBLE (not a trained network): a fake
`apply` whose x̂0 is a frame with a red square displaced in the direction of each frame's
action. It checks that actions typed on stdin reach the model frame by frame and that the
controlled sprite in the written video follows them.
"""

import io
import os

import jax.numpy as jnp
import numpy as np
import pytest

from crm_jax import sample
from crm_jax.data.toy_latents import frames_to_latents
from crm_jax.data.toy_world import ACTION_DELTAS
from crm_jax.models.config import TINY
from crm_jax.sampling import video

PX = 16  # toy frames 16 x 16 -> latents 8 x 8 x 12
SHIFT = 5  # px the test double moves the square per action


def scripted_world_model(args):
    """TEST DOUBLE for `sample.main(model_fn=...)`: returns (apply, params, cfg).

    apply(...) returns the velocity v = (x - target) / t, so that x̂0 = x - t v = target,
    where target frame k shows a 4 x 4 red square centred at (8, 8) + SHIFT * delta(action_k)
    on a grey background. The KV cache is passed through unchanged.
    """
    cfg = TINY.replace(in_channels=12, out_channels=12, num_actions=5)
    deltas = jnp.asarray(ACTION_DELTAS)

    def apply(params, x, t, context, *, actions=None, cache=None, **kw):
        b, f, h, w, _ = x.shape
        a = jnp.zeros((b, f), jnp.int32) if actions is None else actions
        cx = PX // 2 + SHIFT * deltas[a, 0]  # [B, f]
        cy = PX // 2 + SHIFT * deltas[a, 1]
        yy = jnp.arange(PX)[:, None]
        xx = jnp.arange(PX)[None, :]
        inside = (
            (yy >= cy[..., None, None] - 2)
            & (yy < cy[..., None, None] + 2)
            & (xx >= cx[..., None, None] - 2)
            & (xx < cx[..., None, None] + 2)
        )
        red = jnp.asarray([1.0, 0.0, 0.0])
        frames = jnp.where(inside[..., None], red, 0.3)  # [B, f, PX, PX, 3]
        target = frames_to_latents(frames)
        tb = t[:, :, None, None, None]
        v = jnp.where(tb > 0, (x - target) / jnp.maximum(tb, 1e-6), 0.0)
        return v if cache is None else (v, cache)

    apply.text_kv = lambda params, context: context  # the sampler's once-per-video text keys: unused here

    # A stand-in "blocks" entry: the sampler's default per-layer cache splits the stacked layers.
    return apply, {"blocks": {"w": jnp.zeros((cfg.num_layers, 1))}}, cfg


def red_centroids(frames):
    """(x, y) centroid of the red pixels of each uint8 frame `[T, H, W, 3]`."""
    f = frames.astype(np.float32) / 255
    out = []
    for fr in f:
        m = (fr[..., 0] > 0.7) & (fr[..., 1] < 0.3) & (fr[..., 2] < 0.3)
        ys, xs = np.nonzero(m)
        out.append((xs.mean(), ys.mean()))
    return np.asarray(out)


def assert_follows(frames, actions):
    """The red square sits where each frame's action put it."""
    want = PX // 2 - 0.5 + SHIFT * ACTION_DELTAS[np.asarray(actions)]
    np.testing.assert_allclose(red_centroids(frames), want, atol=1e-6)


def cli(tmp_path, *extra, stdin="", model_fn=scripted_world_model):
    out = io.StringIO()
    argv = ["--random_init", "--model", "tiny", "--height", str(PX), "--width", str(PX), *extra]
    summary = sample.main(argv, stdin=io.StringIO(stdin), stdout=out, model_fn=model_fn)
    return summary, out.getvalue()


def test_interactive_stdin_actions_drive_the_sprite(tmp_path):
    path = str(tmp_path / "live.npz")
    lines = "up\njump\nleft\n\n2\n"  # 'jump' is refused and asked again; '' repeats 'left'
    summary, out = cli(
        tmp_path, "--interactive", "--frames", "10", "--block_frames", "1", "--steps", "2", "--out", path, stdin=lines
    )
    assert summary["frames"] == 4  # stdin ended after 4 chunks
    assert summary["actions"] == [[1], [3], [3], [2]]
    assert "unknown action 'jump'" in out
    assert out.count("action>") == 6 and "R" in out  # prompts + ASCII preview with the sprite
    frames = video.read_frames(path)
    assert frames.shape == (4, PX, PX, 3)
    assert_follows(frames, [1, 3, 3, 2])


def test_interactive_per_frame_actions_in_chunks(tmp_path):
    path = str(tmp_path / "chunks.npz")
    summary, out = cli(
        tmp_path,
        "--interactive",
        "--frames",
        "4",
        "--block_frames",
        "2",
        "--context",
        "noisy",
        "--steps",
        "1",
        "--out",
        path,
        stdin="up right\n1 2 3\n4\n",
    )
    assert summary["frames"] == 4 and summary["actions"] == [[1, 4], [4, 4]]
    assert "give 1 action or 2" in out
    assert_follows(video.read_frames(path), [1, 4, 4, 4])


def test_action_file_and_writers(tmp_path):
    acts = tmp_path / "actions.txt"
    acts.write_text("up, down  # comment\n\nleft right\n")
    path = str(tmp_path / "file.npz")
    summary, _ = cli(tmp_path, "--actions", str(acts), "--frames", "4", "--steps", "4,2", "--out", path)
    assert summary["frames"] == 4
    assert_follows(video.read_frames(path), [1, 2, 3, 4])
    gif = str(tmp_path / "file.gif")
    try:
        video.check_writable(gif)
    except ValueError as e:  # neither imageio nor Pillow installed here
        assert "pip install imageio" in str(e) and "pillow" in str(e)
        with pytest.raises(ValueError, match="pip install imageio"):
            cli(tmp_path, "--actions", str(acts), "--frames", "4", "--out", gif)
    else:
        cli(tmp_path, "--actions", str(acts), "--frames", "4", "--out", gif)
        assert os.path.getsize(gif) > 0


@pytest.mark.parametrize("fps", [4, 16])
def test_gif_frames_last_one_over_fps(tmp_path, fps):
    from PIL import Image

    path = str(tmp_path / "clip.gif")
    with video.VideoWriter(path, fps=fps) as w:
        w.append(np.random.default_rng(0).random((3, 8, 8, 3)))
    im = Image.open(path)
    durations = []
    for i in range(3):
        im.seek(i)
        durations.append(im.info["duration"])
    assert all(abs(d - 1000 / fps) <= 10 for d in durations), durations  # GIF stores 1/100 s


def test_writer_errors_name_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(video, "_have", lambda mod: False)
    with pytest.raises(ValueError, match="pip install imageio imageio-ffmpeg"):
        video.check_writable(str(tmp_path / "a.mp4"))
    with pytest.raises(ValueError, match=r"pip install imageio.*pip install pillow"):
        video.check_writable(str(tmp_path / "a.gif"))
    with pytest.raises(ValueError, match="unsupported output"):
        video.check_writable(str(tmp_path / "a.avi"))


@pytest.mark.parametrize(
    "kind,content,msg",
    [
        ("actions", "up\nfly\n", r"actions.txt:2: unknown action 'fly'"),
        ("actions", "up 7\n", r"actions.txt:1: action id 7 is outside the vocabulary \[0, 5\)"),
        ("actions", "up\n", r"1 actions for 4 frames"),
        ("prompts", "scene=0 color=red\nscene=1 color=purple\n", r"prompts.txt:2: color 'purple' is neither"),
        ("prompts", "scene=9 color=red\n", r"prompts.txt:1: scene 9 out of range"),
        ("prompts", "scene=0 color=red | up fly\n", r"prompts.txt:1: action 'fly'"),
        ("prompts", "scene=0 color=red | up up\n", r"2 actions per prompt for 4 frames"),
        ("prompts", "a cat on grass\n", r"prompts.txt:1: toy prompt must be .scene=<id> color=<id|name>."),
        ("prompts", "emb.npy\n", r"prompts.txt:1: embedding file .*emb.npy' does not exist"),
        ("prompts", None, r"--prompts = .*nope.txt': no such file"),
        ("actions", None, r"--actions = .*nope.txt': no such file"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, kind, content, msg):
    f = tmp_path / f"{kind}.txt"
    if content is None:
        f = tmp_path / "nope.txt"
    else:
        f.write_text(content)
    with pytest.raises(ValueError, match=msg):
        cli(tmp_path, f"--{kind}", str(f), "--frames", "4", "--out", str(tmp_path / "x.npz"))


def test_prompts_batch_one_video_each(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("scene=0 color=red | up left\n# second one\nscene=2 color=blue | down, right\n")
    summary, _ = cli(tmp_path, "--prompts", str(p), "--frames", "2", "--out", str(tmp_path / "v.npz"))
    assert [os.path.basename(x) for x in summary["outputs"]] == ["v_0.npz", "v_1.npz"]
    assert_follows(video.read_frames(summary["outputs"][0]), [1, 3])
    assert_follows(video.read_frames(summary["outputs"][1]), [2, 4])
    ctx, acts = sample.read_prompts_file(str(p), TINY.text_len, TINY.text_dim, True, 5)
    assert ctx.shape == (2, TINY.text_len, TINY.text_dim) and acts.tolist() == [[1, 3], [2, 4]]
    assert not np.allclose(ctx[0], ctx[1])


def test_random_init_tiny_model_end_to_end(tmp_path):
    """The real (random) tiny toy model through the CLI: one chunk of 2 frames."""
    path = str(tmp_path / "real.npz")
    summary, _ = cli(tmp_path, "--frames", "2", "--block_frames", "2", "--steps", "1", "--out", path, model_fn=None)
    frames = video.read_frames(path)
    assert frames.shape == (2, PX, PX, 3) and summary["chunks"] == 1


def test_mp4_writes_without_a_fork_warning(tmp_path):
    """ffmpeg is started without a pre-exec hook: JAX (multithreaded) has nothing to warn about."""
    import subprocess
    import sys

    code = (
        "import warnings, jax.numpy as jnp, numpy as np\n"
        "warnings.simplefilter('error', RuntimeWarning)\n"
        "jnp.ones(3).block_until_ready()\n"
        "from crm_jax.sampling.video import VideoWriter\n"
        f"with VideoWriter({str(tmp_path / 'a.mp4')!r}, fps=8) as w:\n"
        "    w.append(np.random.default_rng(0).random((4, 16, 16, 3)))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": root},
        timeout=300,
    )
    assert p.returncode == 0 and "fork" not in p.stderr, p.stderr
    assert os.path.getsize(tmp_path / "a.mp4") > 0


@pytest.mark.parametrize("out", ["/proc/x.gif", "FILE/x.gif", "DIR"])
def test_unwritable_outputs_refused_before_any_compute(tmp_path, out):
    (tmp_path / "FILE").write_text("")
    (tmp_path / "DIR").mkdir()
    path = out if out.startswith("/") else str(tmp_path / out)
    with pytest.raises(ValueError, match="--out"):
        video.check_writable(path)
    with pytest.raises(ValueError, match="--fps 0"):
        video.VideoWriter(str(tmp_path / "ok.gif"), fps=0)
