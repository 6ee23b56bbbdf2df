"""Play the toy world model in a browser: `python -m crm_jax.play` (docs/play.md)."""
