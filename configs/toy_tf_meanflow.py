"""Toy world distillation: tf_meanflow from the shipped causal teacher (crm_jax/training/steps.py):
python -m crm_jax.main --config=configs/toy_tf_meanflow.py --workdir=runs/toy_tf_meanflow
"""

from configs.base import toy_student_config


def get_config():
    return toy_student_config("tf_meanflow", mean_flow=True)
