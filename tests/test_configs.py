"""Every shipped config loads and names a known mode, model and valid train settings."""

import glob
import importlib
import os

import pytest

from crm_jax.training import run_setup
from crm_jax.training.modes import MODES

ROOT = os.path.dirname(os.path.dirname(__file__))
CONFIGS = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not os.path.basename(p).startswith(("_", "base"))
)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_valid(name):
    c = importlib.import_module(f"configs.{name}").get_config()
    if name.endswith("generate"):
        assert c.num_samples > 0 and c.cond.kind
        return
    run_setup.model_config(c)
    if c.mode in MODES:
        tcfg = run_setup.train_config(c)
        assert c.data.batch_size % (c.mesh.data * c.mesh.fsdp) == 0
        assert tcfg.mode == c.mode
    else:
        assert c.mode in ("demo", "forward_check")


def test_tiny_e2e_stages():
    """The test-size real-path config keeps WAN_PATHS' layout under its root."""
    from configs import wan_tiny_e2e

    g = wan_tiny_e2e.get_config("generate,/r")
    assert g.teacher == "/r/checkpoints/wan_1_3b" and g.cond.embeddings == "/r/data/wan_prompts/embeddings.npz"
    s = wan_tiny_e2e.get_config("sf_dmd,/r")
    assert s.init.student == "/r/runs/wan_tf_scm/export" and s.data.path == "/r/data/wan_synthetic"
    assert run_setup.model_config(s).in_channels == g.latent_shape[-1]
    with pytest.raises(ValueError, match="stage"):
        wan_tiny_e2e.get_config("teacher_df")
