"""World-model scoring, long-rollout windows, the video classifier and the Fréchet distance."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crm_jax.data import toy_world as tw
from crm_jax.data.toy_latents import latents_to_frames
from crm_jax.evaluation import video_features as vf
from crm_jax.evaluation import world_model as wm
from crm_jax.models.config import get_model_config
from crm_jax.models.wan import AttentionPattern, functional, init_model

WORLD = tw.ToyWorldConfig(num_frames=6, height=16, width=16, num_sprites=2, sprite_size=3, action_speed=1, max_speed=1)


@pytest.fixture(scope="module")
def episodes():
    return wm.heldout_source(WORLD, 4, 32, 6)


def test_ground_truth_scores_perfectly(episodes):
    src, batch = episodes
    frames = latents_to_frames(batch["latents"], src.factor)
    s = wm.score(frames, batch, WORLD, prefix_frames=2)
    np.testing.assert_array_equal(s["trajectory_error"], 0.0)
    np.testing.assert_array_equal(s["action_following"], 1.0)
    assert s["drift"].shape == (6, 4) and np.all(s["drift"] == 0.0)


def test_wrong_frames_score_badly_and_match_the_per_episode_metrics(episodes):
    src, batch = episodes
    truth = latents_to_frames(batch["latents"], src.factor)
    frozen = jnp.repeat(truth[:, :1], WORLD.num_frames, axis=1)  # nothing moves
    s = wm.score(frozen, batch, WORLD, prefix_frames=2)
    for b in range(3):
        ref = tw.trajectory_error(frozen[b, 2:], batch["states"][b, 2:], batch["colors"][b], WORLD)
        np.testing.assert_allclose(s["trajectory_error"][b], ref, rtol=1e-6)
        ref = tw.action_following_accuracy(frozen[b, 1:], batch["actions"][b, 1:], batch["colors"][b], WORLD)
        np.testing.assert_allclose(s["action_following"][b], ref, rtol=1e-6)
    assert s["trajectory_error"].mean() > 0.5
    blank = jnp.full_like(truth, 0.3)  # no sprite anywhere
    diag = float(np.hypot(WORLD.height, WORLD.width))
    np.testing.assert_allclose(wm.score(blank, batch, WORLD, 2)["trajectory_error"], diag, rtol=1e-6)


def test_background_error_counts_only_background_pixels(episodes):
    src, batch = episodes
    truth = np.asarray(latents_to_frames(batch["latents"], src.factor))
    s = wm.score(truth, batch, WORLD, 2, truth_frames=truth)
    np.testing.assert_array_equal(s["background_error"], 0.0)
    covered = np.stack([np.asarray(tw.sprite_masks(st, WORLD)).any(1) for st in np.asarray(batch["states"])])
    noisy = truth.copy()
    noisy[:, 2:] += 0.1 * ~covered[:, 2:, :, :, None]  # background off by 0.1 in generated frames
    sprites_wrong = np.where(covered[..., None], 1.0 - truth, truth)  # only sprite pixels changed
    np.testing.assert_allclose(wm.score(noisy, batch, WORLD, 2, truth_frames=truth)["background_error"], 0.1, rtol=1e-5)
    np.testing.assert_array_equal(wm.score(sprites_wrong, batch, WORLD, 2, truth_frames=truth)["background_error"], 0.0)


def test_score_rejects_bad_input(episodes):
    src, batch = episodes
    frames = latents_to_frames(batch["latents"], src.factor)
    with pytest.raises(ValueError, match="do not match"):
        wm.score(frames[:, :4], batch, WORLD, 2)
    with pytest.raises(ValueError, match="prefix_frames"):
        wm.score(frames, batch, WORLD, 6)
    with pytest.raises(ValueError, match="episodes"):
        wm.heldout_source(WORLD, 4, 32, 0)


def test_long_rollout_pattern_keeps_offsets_within_the_trained_length():
    p = wm.long_rollout_pattern(AttentionPattern("block_causal", 2), trained_frames=8)
    assert (p.local_attn_blocks, p.sink_blocks) == (3, 0)
    assert wm.long_rollout_pattern(AttentionPattern("block_causal", 1), 8).local_attn_blocks == 7
    with pytest.raises(ValueError, match="block_causal"):
        wm.long_rollout_pattern(AttentionPattern("full"), 8)
    with pytest.raises(ValueError, match="equal blocks"):
        wm.long_rollout_pattern(AttentionPattern("block_causal", 2, first_block_frames=1), 8)


def _tiny(**kw):
    return get_model_config("tiny", in_channels=12, out_channels=12, num_actions=5, text_len=4, text_dim=32, **kw)


@pytest.mark.parametrize(
    "pattern,prefix,method",
    [(AttentionPattern("block_causal", 2), 2, "consistency"), (AttentionPattern("full"), 0, "euler")],
)
def test_evaluate_runs_and_keeps_the_given_frames(episodes, pattern, prefix, method):
    src, batch = episodes
    model = init_model(_tiny(), 0)
    apply, params = functional(model)
    r = wm.evaluate(
        apply,
        params,
        model.cfg,
        src,
        batch,
        jax.random.key(0),
        pattern=pattern,
        prefix_frames=prefix,
        method=method,
        steps=2,
        keep_frames=2,
    )
    assert r["episodes"] == 6 and r["frames"].shape == (2, WORLD.num_frames, 16, 16, 3)
    assert 0.0 <= r["action_following"] <= 1.0
    if prefix:
        truth = np.asarray(latents_to_frames(batch["latents"][:2, :prefix], src.factor))
        np.testing.assert_allclose(r["frames"][:, :prefix], truth, atol=1e-6)
        assert len(r["drift_by_frame"]) == WORLD.num_frames - prefix
    else:
        assert r["trajectory_error"] is None and r["drift_by_frame"] is None


def test_meanflow_students_are_sampled_with_r_zero(episodes):
    """A MeanFlow model's consistency sampling must use u(x, 0, t) (x̂0 = x - t u), not u(x, t, t)."""
    from crm_jax.sampling.causal import block_times, causal_sample

    src, batch = episodes
    cfg = _tiny(mean_flow=True)
    model = init_model(cfg, 0)
    apply, params = functional(model)
    x = batch["latents"][:2, :2]
    pat = AttentionPattern("block_causal", 2)
    kw = dict(
        pattern=pat, num_frames=2, latent_hw=(8, 8), method="consistency", steps=1, actions=batch["actions"][:2, :2]
    )
    noise = jax.random.normal(jax.random.key(3), x.shape)
    got = causal_sample(apply, params, cfg, jax.random.key(1), batch["context"][:2], noise=noise, **kw)
    t0 = float(block_times("consistency", 1)[0])
    t = jnp.full((2, 2), t0)
    u0 = apply(
        params, noise, t, batch["context"][:2], pattern=pat, actions=batch["actions"][:2, :2], r=jnp.zeros_like(t)
    )
    ut = apply(params, noise, t, batch["context"][:2], pattern=pat, actions=batch["actions"][:2, :2])
    np.testing.assert_allclose(got, noise - t0 * u0, atol=1e-5)
    assert float(jnp.abs(u0 - ut).max()) > 1e-4


# ----------------------------------------------------------------------------- Fréchet distance


def _gaussian_fd(mu1, s1, mu2, s2):
    """Closed form for commuting (diagonal) covariances."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))


def test_frechet_distance_matches_the_closed_form_and_is_zero_on_identical_sets():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3)) * np.array([1.0, 2.0, 0.5]) + np.array([0.0, 1.0, -1.0])
    b = rng.normal(size=(20000, 3)) * np.array([1.5, 1.0, 0.5]) + np.array([1.0, 1.0, 0.0])
    ref = _gaussian_fd(
        np.array([0.0, 1.0, -1.0]), np.array([1.0, 4.0, 0.25]), np.array([1.0, 1.0, 0.0]), np.array([2.25, 1.0, 0.25])
    )
    np.testing.assert_allclose(vf.frechet_distance(a, b), ref, rtol=0.03)
    np.testing.assert_allclose(vf.frechet_distance(a, b), vf.frechet_distance(b, a), rtol=1e-9)
    c = rng.normal(size=(50, 8))
    assert abs(vf.frechet_distance(c, c)) < 1e-8
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        vf.frechet_distance(c, c[:, :4])
    with pytest.raises(ValueError, match="2 samples"):
        vf.frechet_distance(c[:1], c)


def test_classifier_trains_saves_and_loads(tmp_path):
    world = dataclasses.replace(WORLD, num_frames=4)
    m = vf.train_classifier(world, steps=3, batch_size=4, width=4, feat=8)
    _, a = tw.sample_batch(jax.random.key(5), 6, world)
    _, b = tw.sample_batch(jax.random.key(6), 6, world)
    assert m.embed(a).shape == (6, 8)
    fd = m.frechet_distance(a, b)
    m.save(str(tmp_path / "clf"))
    m2 = vf.FeatureModel.load(str(tmp_path / "clf"))
    np.testing.assert_allclose(m2.frechet_distance(a, b), fd, rtol=1e-6)
    acc = m2.accuracy(jax.random.key(1), 8)
    assert set(acc) == {"scene", "color", "motion"} and all(0 <= v <= 1 for v in acc.values())
    with pytest.raises(ValueError, match="clips must be"):
        m.embed(a[:, :3])


def test_classifier_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="classifier"):
        vf.FeatureModel.load(str(tmp_path / "missing"))
    world = dataclasses.replace(WORLD, num_frames=4)
    m = vf.train_classifier(world, steps=1, batch_size=2, width=4, feat=8)
    m.save(str(tmp_path / "clf"))
    meta = json.load(open(tmp_path / "clf" / "classifier.json"))
    meta["feat"] = 16  # params no longer fit the config
    json.dump(meta, open(tmp_path / "clf" / "classifier.json", "w"))
    with pytest.raises(ValueError, match="shape"):
        vf.FeatureModel.load(str(tmp_path / "clf"))
    os.remove(tmp_path / "clf" / "params.npz")
    with pytest.raises(FileNotFoundError, match="params.npz"):
        vf.FeatureModel.load(str(tmp_path / "clf"))
