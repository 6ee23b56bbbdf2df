"""Toy world teacher pretraining: teacher_tf (crm_jax/training/steps.py). The shipped crm_jax/assets/toy_teacher
is this config trained on one GPU (docs/benchmarks.md, "Toy world"):

  python -m crm_jax.main --config=configs/toy_teacher_tf.py --workdir=runs/toy_teacher_tf
"""

from configs.base import toy_teacher_config


def get_config():
    return toy_teacher_config("teacher_tf")
