"""Test-size variant of the real Wan2.1 path (tests/test_real_path.py): the same configs as
configs/wan_generate.py, wan_tf_scm.py and wan_sf_dmd.py, with the tiny fixture models
(tests/fixtures: DiT dim 64 / in_channels 4 / text_dim 32 / text_len 8, VAE z_dim 4, umT5
d_model 32) and a few 4 x 4-latent frames. Pick the stage, and optionally a root directory
that holds the standard layout of configs/base.py `WAN_PATHS`:

    python -m crm_jax.data.generate --config=configs/wan_tiny_e2e.py:generate,ROOT --out=ROOT/data/wan_synthetic
    python -m crm_jax.main --config=configs/wan_tiny_e2e.py:tf_scm,ROOT --workdir=ROOT/runs/wan_tf_scm
    python -m crm_jax.main --config=configs/wan_tiny_e2e.py:sf_dmd,ROOT --workdir=ROOT/runs/wan_sf_dmd

There is no teacher-forcing stage at this size: the converted DiT is also the causal teacher.
TF-sCM runs 2 iterations, SF-DMD 1 (its first iteration is a student step with the DMD loss).
"""

from configs.base import wan_config, wan_generate_config, wan_paths

LATENT_SHAPE = (3, 4, 4, 4)  # [T, h, w, z]: 3 latent frames -> 9 video frames of 32 x 32 pixels
TEXT_LEN = 8  # = the converter's --text_len and encode_prompts' --max_len


def get_config(arg: str = "tf_scm"):
    stage, _, root = arg.partition(",")
    p = wan_paths(root)
    p["causal_teacher"] = p["dit"]
    numerics = dict(dtype="float32", remat="none", text_len=TEXT_LEN)
    if stage == "generate":
        c = wan_generate_config("tiny", p)
        c.model.overrides.update(numerics)
        c.update(num_samples=8, samples_per_shard=8, batch_size=8, latent_shape=LATENT_SHAPE, latent_dtype="float32")
        c.sampler.update(num_steps=4, guidance=3.0)
        return c
    if stage not in ("tf_scm", "sf_dmd"):
        raise ValueError(f"stage must be generate, tf_scm or sf_dmd, got {stage!r}")
    c = wan_config(stage, "tiny", p)
    c.model.overrides.update(numerics)
    c.train.update(block_frames=1, tangent_warmup=0, sf_max_steps=1, lr=1e-4, critic_lr=1e-4)
    c.data.update(batch_size=2, latent_shape=LATENT_SHAPE)
    c.mesh.update(data=1, fsdp=1, context=1)
    c.num_iterations = 2 if stage == "tf_scm" else 1  # SF-DMD: one student (DMD) step
    c.log_every = 1
    c.checkpoint.update(every=2, keep=1, async_save=False)
    c.init.student = p["dit"] if stage == "tf_scm" else p["tf_scm"] + "/export"
    return c
