"""Wan2.1-1.3B student: teacher_tf (paths are placeholders: point them at your converted checkpoints
and generated dataset, e.g. --config.init.teacher=DIR --config.data.path=DIR). For a 14B teacher
use --config.init.teacher=<converted wan_14b causal teacher> (and a matching model for the critic)."""

from configs.base import WAN_PATHS, wan_config


def get_config():
    c = wan_config("teacher_tf")
    c.train.update(lr=1e-5, warmup_steps=250, cond_dropout=0.1)
    c.init.update(student=WAN_PATHS["dit"], teacher="", dmd_teacher="")
    return c
