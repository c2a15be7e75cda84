"""Guidance cache (issue #13.3): the estimates on hand-computed values, the config's validation, the sampler's
half steps (calls, batch sizes, exactness on an analytic model) and its combination with a taylorseer handle."""

import contextlib
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import taylorseer
from taylorseer.models.reference import NULL_CLASS, build_reference
from taylorseer.models.sampler import sample
from taylorseer.policy import GuidanceCache
from taylorseer.policy.guidance import estimate_difference, linear_difference

torch.set_num_threads(1)
LABELS = torch.tensor([0, 3, 7])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_reference("DiT-FM-T/4").eval()


class Counting(nn.Module):
    """Delegates to ``inner`` and records (timestep, class labels) of every call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[int, list[int]]] = []

    @property
    def config(self):
        return self.inner.config

    def forward(self, x, timestep, class_labels):
        self.calls.append((int(timestep[0]), class_labels.tolist()))
        return self.inner(x, timestep=timestep, class_labels=class_labels)


class Analytic(nn.Module):
    """eps = g(x, t) + [y != null] (A + B t / 1000): the guidance difference A + B t / 1000 is linear in the
    timestep, hence in the step index on DDIM's uniform spacing."""

    config = SimpleNamespace(sample_size=4)

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.a = torch.randn(1, 1, 4, 4, generator=generator)
        self.b = torch.randn(1, 1, 4, 4, generator=generator)

    def forward(self, x, timestep, class_labels):
        t = timestep.float().view(-1, 1, 1, 1) / 1000
        cond = (class_labels != NULL_CLASS).float().view(-1, 1, 1, 1)
        return SimpleNamespace(sample=0.3 * x * torch.cos(3 * t) + 0.1 * t + cond * (self.a + self.b * t))


class Recorder:
    """A listener that records what it is told."""

    def __init__(self):
        self.told: list = []

    def begin(self, num_steps=None):
        self.told.append(("begin", num_steps))

    def step(self, index, timestep=None, sigma=None):
        self.told.append(index)
        return contextlib.nullcontext()


#################################################################################
#                                   Estimates                                   #
#################################################################################

def test_reuse_returns_the_last_computed_difference():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([5.0, -1.0])
    assert estimate_difference("reuse", [(0, a), (2, b)], 5) is b
    assert estimate_difference("reuse", [(0, a)], 1) is a


def test_linear_on_hand_computed_values():
    known = [(1, torch.tensor([1.0, -2.0])), (3, torch.tensor([3.0, 0.0]))]  # slope (1, 1) per step
    assert torch.equal(estimate_difference("linear", known, 4), torch.tensor([4.0, 1.0]))
    assert torch.equal(estimate_difference("linear", known, 6), torch.tensor([6.0, 3.0]))
    assert torch.equal(linear_difference(0, torch.tensor([2.0]), 4, torch.tensor([0.0]), 5), torch.tensor([-0.5]))
    only = torch.tensor([7.0])
    assert estimate_difference("linear", [(0, only)], 3) is only  # one known difference: reuse


def test_linear_is_exact_on_a_linear_difference_and_reuse_is_not():
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2, 1, 5, 5, generator=generator, dtype=torch.float64) for _ in range(2))
    known = [(s, a + b * s) for s in (0, 2, 5)]
    for step in (6, 7, 11):
        assert torch.allclose(estimate_difference("linear", known, step), a + b * step, rtol=0, atol=1e-12)
        assert not torch.allclose(estimate_difference("reuse", known, step), a + b * step, atol=1e-3)


def test_estimate_refuses_what_it_cannot_do():
    d = torch.zeros(1)
    with pytest.raises(ValueError, match="estimate must be one of"):
        estimate_difference("cubic", [(0, d)], 1)
    with pytest.raises(ValueError, match="both-branch step must come first"):
        estimate_difference("reuse", [], 0)
    with pytest.raises(ValueError, match="earlier steps only"):
        estimate_difference("reuse", [(3, d)], 3)
    with pytest.raises(ValueError, match="step_a < step_b"):
        linear_difference(2, d, 2, d, 3)


#################################################################################
#                                    Config                                     #
#################################################################################

def test_plans_are_literal():
    assert GuidanceCache(interval=3, warmup_steps=2).pattern(10) == "BBhhBhhBhh"
    assert GuidanceCache(interval=4, tail_steps=1).pattern(10) == "BhhhBhhhBB"
    assert GuidanceCache(interval=1).pattern(4) == "BBBB"
    assert GuidanceCache(both_steps=[0, 3]).pattern(5) == "BhhBh"
    assert GuidanceCache(both_steps=[0, 3]).both_steps == (0, 3)
    assert GuidanceCache(interval=2).cost(50) == 37.5


@pytest.mark.parametrize("kwargs, field", [
    ({"interval": 0}, "GuidanceCache.interval"),
    ({"interval": True}, "GuidanceCache.interval"),
    ({"interval": 2, "warmup_steps": 0}, "GuidanceCache.warmup_steps"),
    ({"interval": 2, "tail_steps": -1}, "GuidanceCache.tail_steps"),
    ({"interval": 2, "estimate": "cubic"}, "GuidanceCache.estimate"),
    ({"interval": 2, "name": 3}, "GuidanceCache.name"),
    ({}, "exactly one of interval"),
    ({"interval": 2, "both_steps": (0, 2)}, "exactly one of interval"),
    ({"both_steps": (1, 2)}, "GuidanceCache.both_steps must start with step 0"),
    ({"both_steps": (0, 2, 2)}, "GuidanceCache.both_steps must be sorted"),
    ({"both_steps": (0, 1.5)}, "GuidanceCache.both_steps must hold ints"),
    ({"both_steps": "01"}, "GuidanceCache.both_steps must be a tuple"),
    ({"both_steps": (0, 2), "warmup_steps": 2}, "GuidanceCache.warmup_steps"),
])
def test_bad_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GuidanceCache(**kwargs)


def test_config_is_frozen_and_round_trips_through_json():
    cache = GuidanceCache(both_steps=(0, 1, 5), estimate="linear", name="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cache.estimate = "reuse"  # type: ignore[misc]
    for config in (cache, GuidanceCache(interval=3, warmup_steps=2, tail_steps=1)):
        assert GuidanceCache.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown keys"):
        GuidanceCache.from_dict({"interval": 2, "intervall": 3})
    with pytest.raises(ValueError, match=r"both_steps must lie in \[0, num_steps - 1\] = \[0, 4\]"):
        cache.plan(5)


#################################################################################
#                                    Sampler                                    #
#################################################################################

@pytest.mark.parametrize("cfg_mode", ["batch", "split"])
def test_none_and_all_both_steps_are_bit_identical_to_full(tiny, cfg_mode):
    full = sample(tiny, LABELS, num_steps=5, cfg_mode=cfg_mode)
    assert torch.equal(sample(tiny, LABELS, num_steps=5, cfg_mode=cfg_mode, guidance_cache=None), full)
    assert torch.equal(sample(tiny, LABELS, num_steps=5, cfg_mode=cfg_mode,
                              guidance_cache=GuidanceCache(interval=1)), full)
    assert torch.equal(sample(tiny, LABELS, num_steps=5, cfg_mode=cfg_mode,
                              guidance_cache=GuidanceCache(both_steps=tuple(range(5)), estimate="linear")), full)
    half = sample(tiny, LABELS, num_steps=5, cfg_mode=cfg_mode, guidance_cache=GuidanceCache(interval=2))
    assert not torch.equal(half, full)


def test_half_steps_call_the_conditional_batch_only(tiny):
    null = [NULL_CLASS] * 3
    cache = GuidanceCache(interval=2)  # BhBhB
    batch, split, listener = Counting(tiny), Counting(tiny), Recorder()
    sample(batch, LABELS, num_steps=5, guidance_cache=cache, listener=listener)
    sample(split, LABELS, num_steps=5, guidance_cache=cache, cfg_mode="split")
    assert [labels for _, labels in batch.calls] == [[0, 3, 7] + null, [0, 3, 7]] * 2 + [[0, 3, 7] + null]
    assert [labels for _, labels in split.calls] == [[0, 3, 7], null, [0, 3, 7]] * 2 + [[0, 3, 7], null]
    assert [t for t, _ in batch.calls] == [800, 600, 400, 200, 0]
    assert listener.told == [("begin", 5), 0, 1, 2, 3, 4]  # every step told, half steps too


def test_estimates_on_an_analytic_model():
    """A guidance difference linear in the step: "linear" is exact (to float32 rounding), "reuse" is not."""
    model = Analytic()
    labels = torch.tensor([1, 2])
    full = sample(model, labels, num_steps=10, guidance_scale=3.0)
    cached = {estimate: sample(model, labels, num_steps=10, guidance_scale=3.0,
                               guidance_cache=GuidanceCache(interval=3, warmup_steps=2, estimate=estimate))
              for estimate in ("linear", "reuse")}
    assert (cached["linear"] - full).abs().max() < 1e-5
    assert (cached["reuse"] - full).abs().max() > 1e-2


def test_sampler_refuses_a_guidance_cache_it_cannot_run(tiny):
    with pytest.raises(ValueError, match=r"guidance_cache needs classifier-free guidance.*guidance_scale=1.0"):
        sample(tiny, LABELS, num_steps=3, guidance_scale=1.0, guidance_cache=GuidanceCache(interval=2))
    with pytest.raises(TypeError, match="guidance_cache must be a GuidanceCache"):
        sample(tiny, LABELS, num_steps=3, guidance_cache={"interval": 2})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="both_steps must lie in"):
        sample(tiny, LABELS, num_steps=3, guidance_cache=GuidanceCache(both_steps=(0, 3)))


#################################################################################
#                       With a taylorseer handle on the model                    #
#################################################################################

def test_batch_cfg_with_a_handle_is_refused(tiny):
    counting = Counting(tiny)
    with taylorseer.apply(tiny, taylorseer.TaylorSeerConfig(interval=2, warmup_steps=1)) as handle:
        for listener in (handle, None):
            with pytest.raises(ValueError, match=r"cfg_mode='batch' on a model with a taylorseer handle.*"
                                                 r"cfg_mode='split'"):
                sample(counting, LABELS, num_steps=4, guidance_cache=GuidanceCache(interval=2), listener=listener)
    assert counting.calls == []  # refused before any model call


def test_split_cfg_with_a_handle_combines(tiny):
    cache = GuidanceCache(both_steps=(0, 1, 4, 7))  # BBhhBhhB
    alone = sample(tiny, LABELS, num_steps=8, cfg_mode="split", guidance_cache=cache)
    with taylorseer.apply(tiny, taylorseer.TaylorSeerConfig(interval=1)) as handle:
        exact = sample(tiny, LABELS, num_steps=8, cfg_mode="split", guidance_cache=cache, listener=handle)
    assert torch.equal(exact, alone)  # interval 1 stays bit-identical under the guidance cache
    config = taylorseer.TaylorSeerConfig(interval=3, warmup_steps=2, max_order=1)  # FFfFfFfF... -> FFffFffF
    with taylorseer.apply(tiny, config) as handle:
        both = sample(tiny, LABELS, num_steps=8, cfg_mode="split", guidance_cache=cache, listener=handle)
        decisions = [(d["step"], d["branch"], d["compute"]) for d in handle.stats.decisions]
        held = handle.cached_keys()
    assert decisions == [(0, 0, True), (0, 1, True), (1, 0, True), (1, 1, True), (2, 0, False), (3, 0, False),
                         (4, 0, True), (4, 1, True), (5, 0, False), (6, 0, False), (7, 0, True), (7, 1, True)]
    assert held == []  # the told generation frees its factors, though its branches were uneven
    assert torch.isfinite(both).all() and not torch.equal(both, alone)
