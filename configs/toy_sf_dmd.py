"""Toy world distillation: sf_dmd from the shipped causal teacher (crm_jax/training/steps.py):
python -m crm_jax.main --config=configs/toy_sf_dmd.py --workdir=runs/toy_sf_dmd
"""

from configs.base import toy_student_config


def get_config():
    return toy_student_config("sf_dmd")
