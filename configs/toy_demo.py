"""The embedded default (`make demo`): the whole Causal-rCM recipe on the toy world, on a CPU.

Loads the toy causal teacher shipped in crm_jax/assets/toy_teacher, generates a synthetic set with it,
distils a few-step causal student by TF-sCM, refines it by SF-DMD, and scores streamed
world-model rollouts against the simulator. See crm_jax/demo.py.
"""

import ml_collections

from configs.base import base_config, toy_model
from crm_jax.assets import TOY_TEACHER


def get_config():
    c = base_config("demo", "tiny", **toy_model())
    c.train.guidance = 2.0
    c.train.tangent_warmup = 100
    # SF-DMD scores each chunk in the causal teacher's own teacher-forcing layout, with the rollout's clean
    # earlier chunks as context (block-causal, over noised context, misleads it: docs/benchmarks.md, toy study).
    c.train.dmd_teacher_pattern = "teacher_forcing"
    c.train.student_update_freq = 3
    c.train.sf_max_steps = 1  # 1-step self-forcing rollouts: fewer compiled variants on a CPU
    c.data.batch_size = 8
    c.log_every = 10
    c.checkpoint.every = 100
    c.demo = ml_collections.ConfigDict(
        dict(
            teacher=TOY_TEACHER,
            generation_config="configs/toy_generate.py",  # relative to the repository root
            teacher_steps=16,  # Euler steps per chunk of the teacher (data and reference)
            synthetic_samples=96,
            scm_iterations=200,
            scm_lr=2e-4,
            dmd_iterations=90,
            dmd_lr=5e-5,
            eval_episodes=16,
        )
    )
    return c
