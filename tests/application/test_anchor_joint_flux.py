"""The joint (summed-residual) anchored weights on a tiny FLUX transformer: record, fit, save, run as the hybrid."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import taylorseer


@pytest.fixture(scope="module")
def tiny_flux():
    from toy_models import tiny_flux_reference

    return tiny_flux_reference()


def _features(ref, sampler, labels, steps, seed, listener=None):
    from taylorseer.calibration.anchor_joint import BlockFeatures

    rec = BlockFeatures(ref.transformer, dtype=torch.float32)
    seen = {}
    hook = ref.transformer.norm_out.register_forward_hook(
        lambda m, args, out: seen.setdefault(rec.index, []).append(args[0].detach().clone()))
    try:
        sampler(ref.transformer, labels, num_steps=steps, guidance_scale=2.0, seed=seed, listener=rec)
    finally:
        rec.remove()
        hook.remove()
    taken = rec.take()
    return {i: torch.stack([per[s] for s in range(steps)]) for i, per in taken.items()}, seen


def test_block_features_sum_to_the_hidden_states_the_output_layer_reads(tiny_flux):
    from taylorseer.eval.flux import FluxSampler

    torch.set_num_threads(1)
    steps = 4
    feats, seen = _features(tiny_flux, FluxSampler(tiny_flux), torch.arange(2), steps, seed=3)
    blocks = len(tiny_flux.transformer.transformer_blocks) + len(tiny_flux.transformer.single_transformer_blocks)
    assert sorted(feats) == [-2, -1, *range(blocks)]
    for s in range(steps):
        final = torch.cat(seen[s])  # both CFG calls, as BlockFeatures stacks them
        total = feats[-1][s] + sum(feats[i][s] for i in range(blocks))
        torch.testing.assert_close(total, final, atol=1e-5, rtol=1e-5)


def test_joint_weights_run_as_the_hybrid_and_beat_reuse(tiny_flux, tmp_path):
    from taylorseer.calibration.anchor_fit import anchored_config
    from taylorseer.calibration.anchor_joint import fit_joint, save_joint
    from taylorseer.eval.flux import FluxSampler
    from taylorseer.forecast import TaylorForecast

    torch.set_num_threads(1)
    sampler = FluxSampler(tiny_flux)
    model = tiny_flux.transformer
    steps, full = 8, (0, 3, 6)
    labels = torch.arange(4) % 10
    feats, _ = _features(tiny_flux, sampler, labels, steps, seed=11)
    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    paths = [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))] + \
        [f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))]
    features = {paths[i]: feats[i] for i in range(1, blocks)}
    total = sum(feats[i] for i in range(1, blocks))
    table, error = fit_joint(features, total, feats[0], full, history=2, anchor_history=1, carrier=paths[-1])
    cal = save_joint(str(tmp_path / "joint.safetensors"), table, error, model, name="joint",
                     anchor=paths[0], history=2, anchor_history=1, ridge=1e-6, carrier=paths[-1],
                     calibration_data={"seed": 11})
    config = anchored_config(cal.path)
    assert config.policy.full_steps == full and config.targets.granularity == "block"
    reference = sampler(model, labels, num_steps=steps, guidance_scale=2.0, seed=11)
    with taylorseer.apply(model, config) as handle:
        joint = sampler(model, labels, num_steps=steps, guidance_scale=2.0, seed=11, listener=handle)
        assert sum(handle.stats.module_forecast.values()) > 0
    reuse = dataclasses.replace(config, forecaster=TaylorForecast(max_order=0))
    with taylorseer.apply(model, reuse) as handle:
        fora = sampler(model, labels, num_steps=steps, guidance_scale=2.0, seed=11, listener=handle)
    assert torch.isfinite(joint).all()
    # on the trajectories it was fitted on, the joint forecast is closer to full compute than reusing the cache
    assert (joint - reference).pow(2).mean() < (fora - reference).pow(2).mean()
