"""Wan2.1-1.3B student: sf_dmd (paths are placeholders: point them at your converted checkpoints
and generated dataset, e.g. --config.init.teacher=DIR --config.data.path=DIR). For a 14B teacher
use --config.init.teacher=<converted wan_14b causal teacher> (and a matching model for the critic)."""

from configs.base import WAN_PATHS, wan_config


def get_config():
    c = wan_config("sf_dmd")
    c.init.student = WAN_PATHS["tf_scm"] + "/export"
    return c
