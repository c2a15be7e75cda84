"""cache-dit on the FLUX-architecture reference through its pipeline path (issue #23): ``cache_dit.enable_cache(pipe,
...)`` on a ``FluxPipeline``, separate CFG for true CFG's two calls per step; the mask is followed, a mask of every
step is plain sampling, removal restores FluxPipeline, the bench records it; without cache-dit: no methods."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FluxPipeline

STEPS = 6


@pytest.fixture(scope="module")
def tiny_ref():
    from toy_models import tiny_flux_reference

    return tiny_flux_reference()


def _images(sampler, model, listener=None):
    return sampler(model, torch.arange(2), num_steps=STEPS, guidance_scale=2.0, seed=3, listener=listener)


def test_pipeline_path_follows_the_mask_keeps_a_cache_per_cfg_branch_and_comes_off(tiny_ref):
    pytest.importorskip("cache_dit")
    from taylorseer.eval.flux import FluxSampler  # registers the FluxPipeline path
    from taylorseer.integrations.cache_dit import PIPELINES, CacheDitSettings, apply_cache_dit

    assert PIPELINES["FluxTransformer2DModel"][1] is True  # true CFG: separate CFG
    sampler = FluxSampler(tiny_ref)
    call = FluxPipeline.__call__
    plain = _images(sampler, tiny_ref.transformer)
    clone = copy.deepcopy(tiny_ref.transformer)
    settings = CacheDitSettings(1, 0, full_steps=(0, 3), calibrator="taylorseer", warmup_steps=0)
    peer = apply_cache_dit(clone, settings, STEPS)
    assert isinstance(peer.adapter, FluxPipeline) and peer.calls_per_step == 2
    assert FluxPipeline.__call__ is not call  # cache-dit's per-generation reset wraps the pipeline class
    cached = _images(sampler, clone, peer)
    stats = peer.stats()
    assert stats["pattern"] == "FffFff" and stats["steps_full"] == 2
    assert torch.isfinite(cached).all() and not torch.allclose(cached, plain, atol=1e-4)
    again = _images(sampler, clone, peer)  # a second generation starts from fresh caches
    torch.testing.assert_close(again, cached, rtol=0, atol=0)
    peer.remove()
    assert FluxPipeline.__call__ is call
    every = copy.deepcopy(tiny_ref.transformer)
    peer = apply_cache_dit(every, CacheDitSettings(1, 0, full_steps=tuple(range(STEPS)), warmup_steps=0), STEPS)
    torch.testing.assert_close(_images(sampler, every, peer), plain, rtol=0, atol=1e-5)
    peer.remove()
    one = copy.deepcopy(tiny_ref.transformer)
    peer = apply_cache_dit(one, CacheDitSettings(1, 0, separate_cfg=False), STEPS)  # told one call per step
    with pytest.raises(RuntimeError, match="step 0 made 2 model calls"):
        _images(sampler, one, peer)
    peer.remove()


@pytest.mark.slow
def test_flux_bench_records_the_pipeline_peer(tiny_ref, tmp_path):
    pytest.importorskip("cache_dit")
    from importlib.metadata import version

    from taylorseer.eval.flux import cache_dit_flux_methods, run_flux_bench
    from taylorseer.eval.methods import Method

    methods = cache_dit_flux_methods(STEPS, {"s": (0, 3)})
    names = [m.name for m in methods]
    assert "cachedit-F1B0-ts1-mask@s" in names and "cachedit-F2B0-ts1-mask@s" in names
    assert all(m.family == "cache-dit" for m in methods)
    chosen = [Method("full", None, STEPS)] + [m for m in methods if m.name == "cachedit-F1B0-ts1-mask@s"]
    records = run_flux_bench(tiny_ref, chosen, num_images=2, repeats=1, out_path=str(tmp_path / "r.jsonl"),
                             progress=False)
    full, cd = records
    assert cd["error"] is None and cd["peer_version"] == version("cache-dit")
    assert cd["steps_full"] == 2 and full["block_calls"] == 2 * 3 * STEPS  # 3 blocks, two calls per step
    # Fn=1 of 3 blocks: every block on the 2 full steps, the first block alone on the 4 others, both branches
    assert cd["block_calls"] == 2 * (2 * 3 + 4 * 1)
    assert 0 < cd["flops_fraction"] < 1


def test_without_cache_dit_no_flux_methods(monkeypatch):
    import importlib

    import taylorseer.integrations.cache_dit as cd
    from taylorseer.eval.flux import cache_dit_flux_methods

    real = importlib.import_module

    def no_cache_dit(name, *args, **kwargs):
        if name == "cache_dit" or name.startswith("cache_dit."):
            raise ImportError("No module named 'cache_dit' (simulated)")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(cd.importlib, "import_module", no_cache_dit)
    assert cache_dit_flux_methods(50, {"cal": (0, 10)}) == []
    with pytest.raises(ImportError, match="taylorseer\\[peers\\]"):
        cd.apply_cache_dit(torch.nn.Linear(2, 2), cd.CacheDitSettings(), 10)


@pytest.mark.slow
def test_the_flux_bench_command_offers_cache_dit_on_its_calibrations_schedules(capsys):
    """`taylorseer bench --model flux` has cache-dit's pipeline path in its grid: its own rule, and each shipped
    calibration's schedule as a step mask (an unknown method name lists what the command offers)."""
    from taylorseer.cli import main

    pytest.importorskip("cache_dit")
    cal = "docs/results/flux/calibration/ts2-output-b8-s50.safetensors"
    code = main(["bench", "--model", "flux", "--steps", "50", "--calibration", cal, "--methods", "no-such-method",
                 "--out", "/dev/null"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown name(s) ['no-such-method']" in err
    assert "'cachedit-F1B0-reuse-t0.08'" in err  # its own threshold rule
    assert "'cachedit-F1B0-ts2-mask@ts2-output-b8-s50'" in err  # the calibration's schedule as its step mask
