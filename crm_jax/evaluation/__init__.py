"""Model-independent evaluation of toy-world video models.

* `world_model`: roll a causal model out from given first frames and per-frame actions and
  score the rollouts against the simulator (trajectory error, action following, drift by
  frame), optionally with a Fréchet distance in a video classifier's feature space.
* `video_features`: that classifier (trained on the simulator's clips, never on model
  samples) and the Fréchet distance.
"""
