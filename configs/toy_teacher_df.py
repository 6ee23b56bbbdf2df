"""Toy world teacher pretraining: teacher_df (crm_jax/training/steps.py). The shipped crm_jax/assets/toy_teacher is
configs/toy_teacher_tf.py trained on one GPU (docs/benchmarks.md):
  python -m crm_jax.main --config=configs/toy_teacher_df.py --workdir=runs/toy_teacher_df
"""

from configs.base import toy_teacher_config


def get_config():
    return toy_teacher_config("teacher_df")
