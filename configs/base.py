"""Shared defaults of the training configs (`get_config()` files import this)."""

import os

import ml_collections

from crm_jax.assets import TOY_TEACHER
from crm_jax.training.modes import get_mode


def base_config(mode: str, model: str = "tiny", **model_overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = mode
    c.seed = 0
    c.num_iterations = 1000
    c.log_every = 10
    c.max_nan_streak = 20
    c.sample_every = 0  # > 0: write a sample video to workdir/samples every N iterations
    c.eval_every = 0  # > 0 (with an evaluator passed to loop.train): evaluate every N iterations
    c.precompile = 0  # step functions compiled at once before the loop (SF-DMD / rCM cycle
    # through 2 x sf_max_steps of them): 0 = all at once, N = N at a time
    # (less host memory for large models), -1 = lazily, one after another

    c.model = ml_collections.ConfigDict()
    c.model.name = model
    c.model.overrides = ml_collections.ConfigDict(model_overrides)
    # The teacher's (and DMD critic's) architecture; empty name = the student's. E.g. a 14B
    # teacher for a 1.3B student: name="wan_14b" (dtype/remat/attention follow the student).
    c.teacher_model = ml_collections.ConfigDict(dict(name="", overrides=ml_collections.ConfigDict()))

    c.train = ml_collections.ConfigDict(
        dict(
            block_frames=2,
            first_block_frames=None,
            lr=2e-6,
            critic_lr=4e-7,
            warmup_steps=0,
            grad_clip=0.0,
            weight_decay=0.01,
            adam_b1=0.0,
            ema_sigma_rel=0.1,
            guidance=5.0,
            tangent_warmup=0,
            tangent_normalise=True,
            p_mean=-0.8,
            p_std=1.6,
            dcm_steps=48,
            dcm_shift=5.0,
            dmd_weight=1.0,
            dmd_teacher_pattern="full",
            sf_sigma_max=80.0,
            sf_context="clean",
            sf_replay=True,
            meanflow_r_eq_t=0.75,
            cond_dropout=0.0,
            student_update_freq=5,
            sf_max_steps=4,
            fm_weighting="bell",
            fm_shift=5.0,
        )
    )
    c.train.first_block_frames = ml_collections.FieldReference(None, field_type=int)

    # The demo's toy world: 8 frames of 16 x 16 pixels (8 x 8 x 12 latents, 16 tokens per frame).
    c.data = ml_collections.ConfigDict(
        dict(
            kind="toy",
            num_frames=8,
            height=16,
            width=16,
            num_sprites=2,
            sprite_size=3,
            action_speed=1,
            max_speed=1,
            batch_size=8,
            seed=0,
            path="",
        )
    )
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, context=1))
    c.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=3, async_save=True))
    # Keep the EMA and/or the frozen teacher(s) in pinned host memory between steps: "", "ema",
    # "teacher" or "ema,teacher" (costs host<->device copies of them per step). Each step is then
    # split (crm_jax/training/offload.py: teacher pass, main step, EMA update) so that the main step,
    # the student's backward, holds neither. H200, wan_1_3b, 480p: TF-sCM peak 57.7 -> 50.0 GiB,
    # SF-DMD 125.1 -> 117.2 GiB, step times unchanged (docs/benchmarks.md).
    c.memory = ml_collections.ConfigDict(dict(offload=""))
    c.init = ml_collections.ConfigDict(dict(student="", teacher="", dmd_teacher="", allow_random_teacher=False))
    return c


def toy_model(**kw):
    """The toy-world model: a small Wan (dim 128 = 2 heads of 64, 3 layers) on space-to-depth latents,
    5 actions. head_dim 64 so that the Pallas kernels run it on a GPU."""
    over = dict(
        dim=128,
        ffn_dim=256,
        num_heads=2,
        num_layers=3,
        in_channels=12,
        out_channels=12,
        text_len=4,
        text_dim=32,
        freq_dim=64,
        num_actions=5,
    )
    over.update(kw)
    return over


# Where the real (Wan2.1) path reads and writes, relative to the working directory (README,
# "From Wan2.1 weights to a streaming MP4"). Every entry point checks its inputs up front.
WAN_PIPELINE = "checkpoints/Wan2.1-T2V-1.3B-Diffusers"  # the downloaded diffusers pipeline
WAN_PATHS = dict(
    transformer=f"{WAN_PIPELINE}/transformer",  # DiT weights as published (convert_wan --src)
    vae=f"{WAN_PIPELINE}/vae",  # read as is by load_wan_vae (sample --vae)
    text_encoder=f"{WAN_PIPELINE}/text_encoder",  # read as is by load_umt5 (encode_prompts --encoder)
    tokenizer=f"{WAN_PIPELINE}/tokenizer",  # tokenizer.json (encode_prompts --tokenizer)
    dit="checkpoints/wan_1_3b",  # converted DiT (convert_wan --dst): data teacher, DMD teacher
    causal_teacher="checkpoints/wan_1_3b_causal_teacher",  # causal teacher (wan_teacher_tf's export)
    prompts="data/prompts.txt",  # one prompt per line
    embeddings="data/wan_prompts/embeddings.npz",  # encode_prompts --out data/wan_prompts
    dataset="data/wan_synthetic",  # generate --out
    tf_scm="runs/wan_tf_scm",  # workdirs; students are exported to WORKDIR/export
    sf_dmd="runs/wan_sf_dmd",
)


def wan_paths(root: str = "") -> dict:
    """`WAN_PATHS`, below `root` when given (test-size runs keep the same layout in a temp dir)."""
    return {k: os.path.join(root, v) if root else v for k, v in WAN_PATHS.items()}


def wan_config(mode: str, student: str = "wan_1_3b", paths: dict | None = None) -> ml_collections.ConfigDict:
    """Wan2.1 defaults (docs/design.md §6): 480p x 21 latent frames, chunk 3, bf16 compute with fp32
    master weights, remat of whole blocks, data from a generated dataset, teachers from converted
    checkpoints (`python -m crm_jax.tools.convert_wan --src DIFFUSERS_DIR --dst DIR`).

    Inputs (local paths, checked before anything runs): data.path (dataset), init.teacher (causal
    teacher), init.dmd_teacher (DMD's teacher and critic init), init.student (set per mode)."""
    p = paths or wan_paths()
    c = base_config(mode, student, dtype="bfloat16", remat="block")
    c.train.update(
        block_frames=3,
        lr=2e-6,
        critic_lr=4e-7,
        guidance=5.0,
        tangent_warmup=1000,
        sf_sigma_max=80.0,
        dmd_teacher_pattern="full",
    )
    # latent_shape: (T, H, W, C) of the dataset's latents (480p x 81 frames), checked against its
    # metadata; what `python -m crm_jax.tools.aot` compiles for.
    c.data = ml_collections.ConfigDict(
        dict(kind="dataset", path=p["dataset"], batch_size=8, seed=0, latent_shape=(21, 60, 104, 16))
    )
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=8, context=1))
    c.num_iterations = 10000
    c.log_every = 10
    c.checkpoint.every = 250
    c.sample_every = 0
    c.init.update(teacher=p["causal_teacher"], dmd_teacher=p["dit"])
    return c


def wan_generate_config(model: str = "wan_1_3b", paths: dict | None = None) -> ml_collections.ConfigDict:
    """Synthetic Wan data (`python -m crm_jax.data.generate`): the converted bidirectional Wan2.1
    DiT (`teacher`) samples 480p x 81 frames (21 x 60 x 104 latents) per umT5 prompt embedding
    (`cond.embeddings`, from `python -m crm_jax.tools.encode_prompts`), 50 Euler steps, shift 5,
    CFG 5 against the file's negative prompt."""
    p = paths or wan_paths()
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(name=model, overrides=ml_collections.ConfigDict(dict(dtype="bfloat16"))))
    c.teacher = p["dit"]
    c.allow_random_teacher = False
    c.seed = 0
    c.num_samples = 1024
    c.samples_per_shard = 64
    c.batch_size = 8
    c.latent_shape = (21, 60, 104, 16)
    c.latent_dtype = "bfloat16"
    c.cond = ml_collections.ConfigDict(
        dict(kind="embeddings", seed=0, height=0, width=0, prompt_file="", embeddings=p["embeddings"])
    )
    c.pattern = ml_collections.ConfigDict(dict(kind="full", block_frames=1, first_block_frames=None))
    c.pattern.first_block_frames = ml_collections.FieldReference(None, field_type=int)
    c.sampler = ml_collections.ConfigDict(dict(num_steps=50, shift=5.0, t_max=1.0, guidance=5.0))
    c.ode = ml_collections.ConfigDict(dict(save=False, num_steps=4, sigma_max=1600.0))
    return c


TOY_TEACHER_DIR = TOY_TEACHER  # inside the installed package, whatever the working directory


def toy_teacher_config(mode: str) -> ml_collections.ConfigDict:
    """Toy teacher pretraining (teacher_tf / teacher_df / teacher_full) on the simulator's videos:
    the recipe of the shipped toy teacher (`crm_jax/assets/toy_teacher`) (5,000 iterations at batch 64 on one GPU).

    The fine-tuning defaults of docs/design.md (bell weight, UniformShift(5), Adam b1 = 0). From scratch the bell
    weight (0 at t = 0) leaves small-t velocities poorly learnt: samples keep some noise. The toy
    study (experiments/toy_study.py, `teacher_config`) trains its teachers with the from-scratch
    recipe instead: Adam b1 = 0.9, uniform times without the bell weight, the EMA exported -- clean
    backgrounds, but at the budgets tried no better rollouts (docs/benchmarks.md)."""
    c = base_config(mode, "tiny", **toy_model())
    c.train.update(lr=5e-4, warmup_steps=200, grad_clip=1.0, cond_dropout=0.1)
    c.data.batch_size = 64
    c.num_iterations = 5000
    c.log_every = 100
    c.checkpoint.every = 1000
    return c


def toy_student_config(mode: str, **model) -> ml_collections.ConfigDict:
    """Toy distillation from the shipped causal teacher; `sf_dmd` / `rcm` start from a TF-sCM student."""
    c = base_config(mode, "tiny", **toy_model(**model))
    c.train.update(
        lr=1e-4, critic_lr=1e-4, guidance=2.0, tangent_warmup=200, dmd_teacher_pattern="teacher_forcing"
    )  # the causal teacher scores in its own layout
    c.num_iterations = 1000
    c.sample_every = 250
    c.init.teacher = TOY_TEACHER_DIR
    if get_mode(mode).has_critic:
        c.train.update(lr=2e-5, critic_lr=2e-5, tangent_warmup=100)
        c.num_iterations = 500
        c.init.student = "runs/toy_tf_scm/export"
    return c
