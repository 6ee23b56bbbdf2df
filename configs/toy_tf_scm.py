"""Toy world distillation: tf_scm from the shipped causal teacher (crm_jax/training/steps.py):
python -m crm_jax.main --config=configs/toy_tf_scm.py --workdir=runs/toy_tf_scm
"""

from configs.base import toy_student_config


def get_config():
    return toy_student_config("tf_scm")
