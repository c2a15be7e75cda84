"""diffusers' FirstBlockCache and MagCache as bench peers (``taylorseer.integrations.diffusers_caches``), on the tiny
DiT of ``conftest.py`` (2 blocks, random weights) with our DDIM sampler: they run and skip at a loose threshold,
skip nothing (and match plain sampling bit for bit) at the exact settings, reset between generations, count skips
the same way from the hooks' state and from a forward hook, and come off leaving the model as it was."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers.hooks import HookRegistry

from taylorseer.eval.bench import INSTALLERS, Method, run_bench
from taylorseer.eval.peer_grid import peer_methods
from taylorseer.integrations.diffusers_caches import (
    PEER_FAMILIES,
    FirstBlockCacheSettings,
    MagCacheSettings,
    apply_diffusers_cache,
    calibrate_mag_ratios,
)
from taylorseer.models.sampler import sample

STEPS = 10
LABELS = torch.tensor([0, 1])
LOOSE = {"firstblockcache": 1.0, "magcache": 1.0}


def _settings(family: str, model, threshold: float, max_skip: int = 3) -> FirstBlockCacheSettings | MagCacheSettings:
    if family == "firstblockcache":
        return FirstBlockCacheSettings(threshold)
    return MagCacheSettings(threshold, max_skip, 0.0, calibrate_mag_ratios(model, STEPS, 1, len(LABELS)))


def _sample(model, listener=None, seed: int = 0, cfg_mode: str = "batch") -> torch.Tensor:
    return sample(model, LABELS, num_steps=STEPS, seed=seed, cfg_mode=cfg_mode, listener=listener)


def _layout(model) -> list[tuple[str, list[str]]]:
    return [(name, sorted(vars(m))) for name, m in model.named_modules()]


#################################################################################
#                           Runs, skips, exact setting                          #
#################################################################################

@pytest.mark.parametrize("family", PEER_FAMILIES)
def test_loose_threshold_skips_and_both_counts_agree(tiny_dit, family):
    plain = _sample(tiny_dit)
    with apply_diffusers_cache(tiny_dit, _settings(family, tiny_dit, LOOSE[family]), STEPS) as cache:
        images = _sample(tiny_dit, cache)
        stats = cache.stats
    assert stats.pattern()[0] == "F"  # nothing cached yet at step 0
    assert 0 < stats.steps_skipped < STEPS
    assert stats.steps_full + stats.steps_skipped == STEPS == len(stats.pattern())
    assert stats.steps_full_observed == stats.steps_full  # hooks' state vs the second block really running
    assert [d["observed"] for d in stats.decisions] == [d["compute"] for d in stats.decisions]
    assert stats.peak_cache_bytes > 0
    assert stats.to_dict()["steps_forecast"] == stats.steps_skipped
    assert images.shape == plain.shape and torch.isfinite(images).all()
    assert not torch.equal(images, plain)  # a skipped step changes the images


@pytest.mark.parametrize(("family", "threshold", "max_skip"),
                         [("firstblockcache", 0.0, 3), ("magcache", 0.0, 3), ("magcache", 1.0, 0)])
def test_exact_setting_skips_nothing_and_matches_plain_sampling(tiny_dit, family, threshold, max_skip):
    plain = _sample(tiny_dit)
    with apply_diffusers_cache(tiny_dit, _settings(family, tiny_dit, threshold, max_skip), STEPS) as cache:
        images = _sample(tiny_dit, cache)
        assert cache.stats.pattern() == "F" * STEPS
        assert cache.stats.steps_full_observed == STEPS
    assert torch.equal(images, plain)


@pytest.mark.parametrize("family", PEER_FAMILIES)
def test_split_cfg_keeps_one_state_per_branch(tiny_dit, family):
    with apply_diffusers_cache(tiny_dit, _settings(family, tiny_dit, LOOSE[family]), STEPS) as cache:
        _sample(tiny_dit, cache, cfg_mode="split")
        decisions = cache.stats.decisions
    assert [(d["step"], d["branch"]) for d in decisions] == [(i, b) for i in range(STEPS) for b in (0, 1)]
    assert cache.stats.steps_full + cache.stats.steps_skipped == STEPS  # counted on branch 0 only
    assert cache.stats.pattern(1)[0] == "F"  # the uncond branch starts from its own empty state


#################################################################################
#                                Reset per generation                           #
#################################################################################

@pytest.mark.parametrize("family", PEER_FAMILIES)
def test_two_identical_generations_give_identical_outputs(tiny_dit, family):
    settings = _settings(family, tiny_dit, 1e9, max_skip=STEPS)  # skips whenever it has a cache: stale state shows
    with apply_diffusers_cache(tiny_dit, settings, STEPS) as cache:
        first, pattern = _sample(tiny_dit, cache), cache.stats.pattern()
        _sample(tiny_dit, cache, seed=1)  # a different generation in between
        second = _sample(tiny_dit, cache)
        assert cache.stats.pattern() == pattern
    assert "f" in pattern
    assert torch.equal(first, second)


@pytest.mark.parametrize("family", PEER_FAMILIES)
def test_begin_clears_an_interrupted_generation(tiny_dit, family):
    """Three steps of one generation, then a full one: it must equal a generation on a fresh installation."""
    settings = _settings(family, tiny_dit, 1e9, max_skip=STEPS)  # skips everything it can
    fresh_model = copy.deepcopy(tiny_dit)
    with apply_diffusers_cache(fresh_model, settings, STEPS) as fresh:
        expected = _sample(fresh_model, fresh)
    with apply_diffusers_cache(tiny_dit, settings, STEPS) as cache:
        cache.begin(STEPS)
        x = torch.randn(4, 1, 28, 28)
        for i in range(3):
            with cache.step(i, 999 - 100 * i, 1.0):
                tiny_dit(x, timestep=torch.full((4,), 999 - 100 * i), class_labels=torch.tensor([0, 1, 10, 10]))
        assert cache.stats.pattern() == "Fff"
        images = _sample(tiny_dit, cache)
        assert cache.stats.pattern()[0] == "F"
    assert torch.equal(images, expected)


def test_without_the_reset_first_block_cache_reuses_the_last_generation(tiny_dit, monkeypatch):
    """The reset tests above can fail: with diffusers' reset disabled, step 0 of the next generation is skipped."""
    with apply_diffusers_cache(tiny_dit, FirstBlockCacheSettings(1e9), STEPS) as cache:
        first = _sample(tiny_dit, cache)
        monkeypatch.setattr(HookRegistry, "reset_stateful_hooks", lambda self, recurse=True: None)
        second = _sample(tiny_dit, cache)
        assert cache.stats.pattern() == "f" * STEPS
        monkeypatch.undo()
    assert not torch.equal(first, second)


#################################################################################
#                               Told steps, removal                             #
#################################################################################

def test_magcache_refuses_a_step_count_that_disagrees_with_the_told_step(tiny_dit):
    with apply_diffusers_cache(tiny_dit, _settings("magcache", tiny_dit, 1.0), STEPS) as cache:
        cache.begin(STEPS)
        x = torch.randn(2, 1, 28, 28)
        with cache.step(0, 999, 1.0, branch=0):
            tiny_dit(x, timestep=torch.full((2,), 999), class_labels=LABELS)
            with pytest.raises(RuntimeError, match="counts model calls"):
                tiny_dit(x, timestep=torch.full((2,), 999), class_labels=LABELS)  # a second call as branch 0
        with pytest.raises(ValueError, match="installed for 10 steps"):
            cache.begin(STEPS + 1)


def test_model_call_outside_a_step_is_refused(tiny_dit):
    with apply_diffusers_cache(tiny_dit, FirstBlockCacheSettings(0.1), STEPS) as cache:
        cache.begin(STEPS)
        with pytest.raises(RuntimeError, match="outside a told step"):
            tiny_dit(torch.randn(2, 1, 28, 28), timestep=torch.full((2,), 999), class_labels=LABELS)


@pytest.mark.parametrize("family", PEER_FAMILIES)
def test_removal_restores_the_model_bit_for_bit(tiny_dit, family):
    reference = copy.deepcopy(tiny_dit)
    layout = _layout(tiny_dit)
    settings = _settings(family, tiny_dit, LOOSE[family])  # calibrating MagCache installs and removes once
    assert _layout(tiny_dit) == layout
    cache = apply_diffusers_cache(tiny_dit, settings, STEPS)
    assert _layout(tiny_dit) != layout  # diffusers' registries and instance forwards are there
    _sample(tiny_dit, cache)
    cache.remove()
    cache.remove()  # idempotent
    assert _layout(tiny_dit) == layout
    assert all(torch.equal(a, b) for a, b in zip(tiny_dit.state_dict().values(), reference.state_dict().values()))
    assert torch.equal(_sample(tiny_dit), _sample(reference))
    with pytest.raises(RuntimeError, match="removed"):
        cache.begin(STEPS)
    apply_diffusers_cache(tiny_dit, settings, STEPS).remove()  # installable again


def test_models_the_caches_cannot_take_are_refused_with_the_reason(tiny_dit):
    one_block = copy.deepcopy(tiny_dit)
    one_block.transformer_blocks = one_block.transformer_blocks[:1]
    with pytest.raises(ValueError, match="at least 2 blocks"):
        apply_diffusers_cache(one_block, FirstBlockCacheSettings(0.1), STEPS)
    with pytest.raises(ValueError, match="needs mag_ratios"):
        apply_diffusers_cache(tiny_dit, MagCacheSettings(0.1), STEPS)
    no_blocks = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="at least 1 blocks"):
        INSTALLERS["magcache"](no_blocks, Method("m", MagCacheSettings(0.1), STEPS))
    with apply_diffusers_cache(tiny_dit, FirstBlockCacheSettings(0.1), STEPS), pytest.raises(ValueError,
                                                                                           match="already has"):
        apply_diffusers_cache(tiny_dit, FirstBlockCacheSettings(0.2), STEPS)


#################################################################################
#                                    Bench                                      #
#################################################################################

def test_settings_and_methods_are_validated():
    with pytest.raises(ValueError, match="threshold"):
        FirstBlockCacheSettings(-0.1)
    with pytest.raises(ValueError, match="retention_ratio"):
        MagCacheSettings(0.1, retention_ratio=1.5)
    with pytest.raises(ValueError, match="needs its settings"):
        Method("x", FirstBlockCacheSettings(0.1), family="fora")
    with pytest.raises(ValueError, match="needs its settings"):
        Method("x", FirstBlockCacheSettings(0.1), family="magcache")
    methods = peer_methods(50)
    assert [m.family for m in methods] == ["firstblockcache"] * 5 + ["magcache"] * 5 + ["seacache"] * 4
    assert all(isinstance(m, Method) and m.num_steps == 50 for m in methods)
    assert json.loads(json.dumps([m.to_dict() for m in methods]))[5]["config"]["max_skip_steps"] == 8
    assert methods[0].full_steps() is None  # adaptive: the record's steps_full is measured


@pytest.mark.slow
def test_bench_runs_the_peers_on_a_deep_copy_and_records_their_steps(tiny_dit, tmp_path):
    reference = copy.deepcopy(tiny_dit)
    layout = _layout(tiny_dit)
    # thresholds that skip on this model: a peer equal to the reference gets PSNR = inf, which the bench's JSON
    # writer (allow_nan=False) refuses
    methods = [Method("full", None, STEPS),
               Method("fbcache-t1", FirstBlockCacheSettings(1.0), STEPS),
               Method("magcache-t1", MagCacheSettings(1.0, 3, 0.0, calibration_images=2), STEPS)]
    records = run_bench(tiny_dit, methods, num_images=2, repeats=1, out_path=tmp_path / "r.jsonl",
                        progress=False, probe_images=1, save_samples=False)
    by_name = {r["name"]: r for r in records}
    for method in methods[1:]:
        record = by_name[method.name]
        assert record["error"] is None, record["error"]
        assert record["family"] == method.family
        assert 1 <= record["steps_full"] <= STEPS and record["steps_full"] + record["steps_forecast"] == STEPS
        assert 0 < record["steps_forecast"] and record["flops"] < by_name["full"]["flops"]
    assert _layout(tiny_dit) == layout
    assert torch.equal(_sample(tiny_dit), _sample(reference))


#################################################################################
#                 cache-dit (the peers extra): present and absent                #
#################################################################################

def _cache_dit_settings(**fields):
    from taylorseer.integrations.cache_dit import CacheDitSettings

    return CacheDitSettings(**fields)


def test_cache_dit_step_mask_is_followed_and_every_step_full_is_plain_sampling(tiny_dit):
    pytest.importorskip("cache_dit")
    from taylorseer.integrations.cache_dit import apply_cache_dit

    plain = _sample(tiny_dit)
    masked = copy.deepcopy(tiny_dit)
    peer = apply_cache_dit(masked, _cache_dit_settings(full_steps=(0, 3, 6), calibrator="taylorseer",
                                                       warmup_steps=0), STEPS)
    images = _sample(masked, peer)
    stats = peer.stats()
    peer.remove()
    assert stats["pattern"] == "FffFffFfff" and stats["steps_full"] == 3 and stats["steps_forecast"] == 7
    assert torch.isfinite(images).all() and not torch.equal(images, plain)
    every = copy.deepcopy(tiny_dit)
    peer = apply_cache_dit(every, _cache_dit_settings(full_steps=tuple(range(STEPS)), warmup_steps=0), STEPS)
    images = _sample(every, peer)
    assert peer.stats()["steps_full"] == STEPS
    torch.testing.assert_close(images, plain, rtol=0, atol=1e-5)


def test_cache_dit_refuses_two_calls_per_step_and_too_many_blocks(tiny_dit):
    pytest.importorskip("cache_dit")
    from taylorseer.integrations.cache_dit import apply_cache_dit

    with pytest.raises(ValueError, match="fn_blocks \\+ bn_blocks = 3 exceeds the 2 blocks"):
        apply_cache_dit(copy.deepcopy(tiny_dit), _cache_dit_settings(fn_blocks=2, bn_blocks=1), STEPS)
    model = copy.deepcopy(tiny_dit)
    peer = apply_cache_dit(model, _cache_dit_settings(), STEPS)
    with pytest.raises(RuntimeError, match="step 0 made 2 model calls"):
        _sample(model, peer, cfg_mode="split")


@pytest.mark.parametrize("field, value", [("fn_blocks", 0), ("bn_blocks", -1), ("threshold", -0.1),
                                          ("calibrator", "magic"), ("mask_policy", "sometimes"),
                                          ("full_steps", (1, 2))])
def test_cache_dit_settings_refuse_bad_fields_naming_them(field, value):
    with pytest.raises(ValueError, match=f"CacheDitSettings.{field}"):
        _cache_dit_settings(**{field: value})


@pytest.mark.slow
def test_bench_records_cache_dit_version_steps_and_block_call_fraction(tiny_dit, tmp_path):
    pytest.importorskip("cache_dit")
    from importlib.metadata import version

    from taylorseer.integrations.cache_dit import PEER_FAMILY

    before = copy.deepcopy(tiny_dit.state_dict())
    settings = _cache_dit_settings(full_steps=(0, 3, 6), calibrator="taylorseer", warmup_steps=0)
    methods = [Method("full", None, STEPS), Method("cd", settings, STEPS)]
    assert methods[1].family == PEER_FAMILY
    out = tmp_path / "records.jsonl"
    records = run_bench(tiny_dit, methods, num_images=2, repeats=1, out_path=out, progress=False,
                        save_samples=False, probe_images=1)
    full, cd = records
    assert cd["error"] is None and cd["peer_version"] == version("cache-dit")
    assert cd["steps_full"] == 3 and full["block_calls"] == 2 * STEPS
    # Fn=1 of 2 blocks: both blocks on the 3 full steps, the first block alone on the 7 others
    assert cd["block_calls"] == 3 * 2 + 7 * 1 and cd["block_call_fraction"] == pytest.approx(13 / 20)
    assert 0 < cd["flops_fraction"] < 1 and full["flops_fraction"] == 1.0
    assert all(torch.equal(v, before[k]) for k, v in tiny_dit.state_dict().items())  # ran on a copy


def test_without_cache_dit_the_peers_are_skipped_with_one_line(monkeypatch, capsys, tmp_path):
    import importlib

    import taylorseer.integrations.cache_dit as cd
    from taylorseer.eval.bench import Method, default_grid, run_bench
    from taylorseer.eval.peer_grid import cache_dit_methods
    from taylorseer.models.reference import build_reference

    real = importlib.import_module

    def no_cache_dit(name, *args, **kwargs):
        if name == "cache_dit" or name.startswith("cache_dit."):
            raise ImportError("No module named 'cache_dit' (simulated)")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(cd.importlib, "import_module", no_cache_dit)
    assert cd.cache_dit_version() is None
    assert cache_dit_methods(50, {"cal": (0, 10)}) == []
    capsys.readouterr()
    grid = default_grid(num_steps=50)
    assert "cache-dit" not in capsys.readouterr().err  # building a grid (also for `sample`'s names) prints nothing
    run_bench(build_reference("DiT-FM-T/4"), [Method("full", None, 2)], num_images=1, repeats=1,
              out_path=tmp_path / "r.jsonl", save_samples=False)  # a bench run says it, once
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "cache-dit" in line] == [
        'bench: cache-dit is not installed (pip install "taylorseer[peers]"): its methods are skipped']
    assert not [m for m in grid if m.family == cd.PEER_FAMILY]
    with pytest.raises(ImportError, match="taylorseer\\[peers\\]"):
        cd.apply_cache_dit(torch.nn.Linear(2, 2), _cache_dit_settings(), 10)


def test_seacache_skips_with_the_converted_sigma_and_comes_off_exactly(tiny_dit):
    from taylorseer.integrations.diffusers_caches import SeaCacheSettings

    plain = _sample(tiny_dit)
    layout = _layout(tiny_dit)
    with apply_diffusers_cache(tiny_dit, SeaCacheSettings(threshold=1.0, max_consecutive_cached=8), STEPS) as cache:
        _sample(tiny_dit, cache)
        stats = cache.stats
    # in fail-open mode (a sigma outside [0, 1]) SeaCache would compute every step
    assert 0 < stats.steps_skipped < STEPS and stats.pattern()[0] == "F"
    assert stats.steps_full_observed == stats.steps_full  # the hooks' gate vs the second block really running
    assert _layout(tiny_dit) == layout and torch.equal(_sample(tiny_dit), plain)
    with apply_diffusers_cache(tiny_dit, SeaCacheSettings(threshold=0.0), STEPS) as cache:
        exact = _sample(tiny_dit, cache)
        assert cache.stats.steps_skipped == 0
    assert torch.equal(exact, plain)
    with pytest.raises(ValueError, match="residual_order"):
        SeaCacheSettings(residual_order=2)
