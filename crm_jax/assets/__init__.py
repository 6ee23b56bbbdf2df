"""Model files shipped with the package.

`TOY_TEACHER`: the small causal toy-world teacher the demo starts from (a crm_jax NNX
checkpoint directory, 2.8 MB), trained by `configs/toy_teacher_tf.py`.
"""

import os

TOY_TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_teacher")
