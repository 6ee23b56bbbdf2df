"""A stronger toy world causal teacher (chunk-wise, 2 frames per block), trained from scratch by teacher
forcing (teacher_tf): the recipe of the toy study's causal teachers (docs/benchmarks.md, "Toy study":
2.1 px trajectory error and 0.74 action following after 1.5 M clips on one GPU):

  python -m crm_jax.main --config=configs/toy_teacher_strong.py --workdir=runs/toy_teacher_strong
  CONFIG=configs/toy_teacher_strong.py bash experiments/train_toy_teacher_gpu.sh   # on a lent GPU

From-scratch recipe: a Wan of dim 192 (3 heads of 64) x 4 layers, bf16 compute, Adam b1 = 0.9,
uniform times without the bell weight, lr 1e-3 after 500 warm-up steps, batch 256, 6,000 iterations
(1.5 M simulator clips), the power EMA exported.
"""

from configs.base import toy_teacher_config

TEACHER_MODEL = dict(dim=192, ffn_dim=384, num_heads=3, num_layers=4)


def get_config():
    c = toy_teacher_config("teacher_tf")
    c.model.overrides.update(dict(TEACHER_MODEL, attn_impl="xla", dtype="bfloat16"))
    c.train.update(block_frames=2, adam_b1=0.9, fm_weighting="none", fm_shift=1.0, lr=1e-3, warmup_steps=500)
    c.export_ema = True
    c.num_iterations = 6000
    c.data.batch_size = 256
    c.checkpoint.every = 1000
    return c
