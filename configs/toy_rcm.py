"""Toy world distillation: rcm from the shipped causal teacher (crm_jax/training/steps.py):
python -m crm_jax.main --config=configs/toy_rcm.py --workdir=runs/toy_rcm
"""

from configs.base import toy_student_config


def get_config():
    return toy_student_config("rcm")
