"""Every shipped config loads and names a known mode, model and valid train settings."""

import glob
import importlib
import os

import pytest

from crm_jax.training import loop
from crm_jax.training.steps import MODES

ROOT = os.path.dirname(os.path.dirname(__file__))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith(("_", "base")))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_valid(name):
    c = importlib.import_module(f"configs.{name}").get_config()
    if name == "toy_generate":
        assert c.num_samples > 0
        return
    loop.model_config(c)
    if c.mode in MODES:
        tcfg = loop.train_config(c)
        assert c.data.batch_size % (c.mesh.data * c.mesh.fsdp) == 0
        assert tcfg.mode == c.mode
    else:
        assert c.mode in ("demo", "forward_check")
