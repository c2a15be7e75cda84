"""Hardening (issue #11): no silent wrong results, no stale state, clear errors before work is lost.

Each test names the issue item it proves. Every one of them fails on the runtime before the fix (d68c9aa, the
handle before the runtime split, or the split itself where it still missed a case; see docs/reliability.md).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import warnings

import diffusers
import pytest
import torch
from test_diffusers import FAMILY, TEXT, LoopPipeline, _grid_ids, full_run, loop_pipeline, tiny
from torch import nn

import taylorseer
from taylorseer import TaylorSeerConfig
from taylorseer.models.sampler import sample

LABELS = torch.tensor([0, 3])


def dit_call(model: nn.Module, batch: int, t: int) -> torch.Tensor:
    """One call of the tiny reference DiT on the first ``batch`` rows of fixed inputs."""
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))[:batch]
    return model(x, timestep=torch.full((batch,), t), class_labels=torch.arange(batch)).sample


def swapped(model: nn.Module) -> list[bool]:
    return ["forward" in m.__dict__ for m in model.modules()]


def is_taylorseer(function: object) -> bool:
    """Whether a callable is taylorseer code (a wrapper object, a closure or a bound method of ours)."""
    owner = getattr(function, "__func__", function)
    return any(str(getattr(x, "__module__", "")).startswith("taylorseer") for x in (type(function), owner))


#################################################################################
#                 Item 2: a shape change within a generation re-anchors          #
#################################################################################

@pytest.mark.parametrize("granularity, targets", [("module", 4), ("block", 2), ("output", 1)])
def test_batch_shrinking_mid_generation_computes_in_full_and_restarts(tiny_dit, granularity, targets):
    """Batch 2 -> 1 at a planned forecast step: that call equals a fresh computation (never the old batch's
    forecast, never a broadcast), later forecasts have the new batch, the stats count the fallbacks."""
    calls = [(2 if i < 3 else 1, 900 - 100 * i) for i in range(8)]
    plain = [dit_call(tiny_dit, batch, t) for batch, t in calls]  # a fresh computation of each call
    config = TaylorSeerConfig(interval=3, warmup_steps=2, max_order=1, granularity=granularity)
    with taylorseer.apply(tiny_dit, config) as handle:
        plan = handle.plan(8)
        assert plan == [True, True, False, False, True, False, False, True]
        handle.begin(8)
        for i, (batch, t) in enumerate(calls):
            with handle.step(i, timestep=t):
                out = dit_call(tiny_dit, batch, t)
            assert out.shape == (batch, 1, 28, 28) and torch.isfinite(out).all()
            assert torch.equal(out, plain[i]) == plan[i] or i == 3
            if i == 3:  # planned forecast, inputs of another shape: computed in full
                assert torch.equal(out, plain[i])
                assert handle.stats.fallbacks == {"shape": targets}
        stats = handle.stats
        assert stats.pattern() == "FFfFFffF"  # step 3 computed (fallback), the plan resumes
        assert stats.steps_full + stats.steps_forecast == 8 and stats.steps_forecast == 3
        assert [d["reason"] for d in stats.decisions][3] == "fallback"


def test_batch_change_also_reanchors_skipped_modules():
    """FLUX module granularity: the single-stream block's attention/MLP are skipped (zeros) on forecast steps;
    their zeros must follow the new batch too, else the forecast proj_out sees the old batch (broadcast)."""
    family, model = FAMILY["flux"], tiny("flux")

    def call(batch: int, t: float) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, *family.latent, generator=g)[:batch]
        context = {k: torch.randn(2, *shape, generator=g)[:batch] for k, shape in family.context.items()}
        with torch.no_grad():
            return family.forward(model, x, torch.tensor(t), context)

    calls = [(2 if i < 3 else 1, 900.0 - 100 * i) for i in range(8)]
    plain = [call(batch, t) for batch, t in calls]
    with taylorseer.apply(model, TaylorSeerConfig(interval=3, warmup_steps=2)) as handle:
        assert {t.mode for t in handle.targets} == {"output", "skip"}
        handle.begin(8)
        for i, (batch, t) in enumerate(calls):
            with handle.step(i, timestep=t):
                out = call(batch, t)
            assert out.shape == (batch, *family.latent)
            if i == 3:
                assert torch.equal(out, plain[i])
                assert handle.stats.fallbacks["shape"] == len(handle.targets)


class TwoInputs(nn.Module):
    """``out = (x * t, context * t)``: its second input alone may change shape."""

    def forward(self, x: torch.Tensor, context: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        return x * t, context * t


class TextModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([TwoInputs()])

    def forward(self, x: torch.Tensor, context: torch.Tensor, t: float) -> torch.Tensor:
        a, b = self.blocks[0](x, context, t)
        return torch.cat([a, b], dim=1)


def test_change_of_a_later_input_shape_reanchors():
    """Only the second input (text length 5 -> 3) changes: still computed in full, never the old shape."""
    model = TextModel()
    x = torch.ones(2, 4, 8)
    contexts = [torch.ones(2, 5 if i < 3 else 3, 8) for i in range(6)]
    plain = [model(x, c, float(i + 1)) for i, c in enumerate(contexts)]
    with taylorseer.apply(model, TaylorSeerConfig(interval=3, warmup_steps=2, modules=("blocks.*",))) as handle:
        handle.begin(6)
        for i, context in enumerate(contexts):
            with handle.step(i):
                out = model(x, context, float(i + 1))
            assert out.shape == (2, 4 + context.shape[1], 8)
            assert torch.equal(out, plain[i]) or i in (2, 5)  # step 3 computed in full; 2 and 5 forecast
        assert handle.stats.fallbacks == {"shape": 1} and handle.stats.pattern() == "FFfFFf"


#################################################################################
#              Item 3: copies are plain models; pickling is refused clearly      #
#################################################################################

def test_deepcopy_of_a_model_with_a_handle_is_a_plain_model(tiny_dit):
    reference = sample(tiny_dit, LABELS, num_steps=8, seed=1)
    config = TaylorSeerConfig(interval=3, warmup_steps=1, max_order=2)
    with taylorseer.apply(tiny_dit, config) as handle:
        cached = sample(tiny_dit, LABELS, num_steps=8, seed=1, listener=handle)
        assert not torch.equal(cached, reference)
        handle.begin(8)
        with handle.step(0, timestep=999):  # mid-generation, factors held
            dit_call(tiny_dit, 2, 999)
        clone = copy.deepcopy(tiny_dit)
        assert not any(is_taylorseer(m.__dict__.get("forward")) for m in clone.modules())
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in clone.modules())  # none of the handle's
        # The copy's forwards are its own modules' (nothing points back at the original or the handle).
        bound = [m.__dict__["forward"] for m in clone.modules() if "forward" in m.__dict__]
        assert bound and all(f.__self__ in set(clone.modules()) for f in bound)
        assert torch.equal(sample(clone, LABELS, num_steps=8, seed=1), reference)
        # Called inside the original's steps (where the original forecasts), the copy still computes in full,
        # and it leaves the original's generation alone.
        plain = [dit_call(clone, 2, 999 - 100 * i) for i in range(8)]
        handle.begin(8)
        for i in range(8):
            with handle.step(i, timestep=999 - 100 * i):
                ours = dit_call(tiny_dit, 2, 999 - 100 * i)
                assert torch.equal(dit_call(clone, 2, 999 - 100 * i), plain[i])
            if i == 0:
                assert torch.equal(ours, plain[0])  # a full step
        assert handle.stats.steps_forecast == 8 - sum(handle.plan(8)) > 0
        assert sum(handle.stats.module_full.values()) == 4 * sum(handle.plan(8))
        assert torch.equal(sample(tiny_dit, LABELS, num_steps=8, seed=1, listener=handle), cached)
        # The copy can carry its own handle.
        with taylorseer.apply(clone, config) as other:
            assert torch.equal(sample(clone, LABELS, num_steps=8, seed=1, listener=other), cached)
    assert torch.equal(sample(tiny_dit, LABELS, num_steps=8, seed=1), reference)


def test_pickling_a_model_with_a_handle_is_refused_with_a_hint(tiny_dit):
    reference = sample(tiny_dit, LABELS, num_steps=4, seed=0)
    with taylorseer.apply(tiny_dit, TaylorSeerConfig(granularity="block")):
        with pytest.raises(TypeError, match=r"cannot pickle a model with taylorseer applied.*handle\.remove\(\) "
                                            r"first, or save model\.state_dict\(\)"):
            torch.save(tiny_dit, io.BytesIO())
        torch.save(tiny_dit.state_dict(), io.BytesIO())  # the weights save as usual
    buffer = io.BytesIO()
    torch.save(tiny_dit, buffer)  # after remove(): a plain model again
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(sample(loaded, LABELS, num_steps=4, seed=0), reference)


#################################################################################
#                 Item 4: applying twice is refused, whatever granularity        #
#################################################################################

@pytest.mark.parametrize("first", ["module", "block", "output"])
@pytest.mark.parametrize("second", ["module", "block", "output"])
def test_apply_twice_is_refused_for_every_granularity_pair(tiny_dit, first, second):
    handle = taylorseer.apply(tiny_dit, TaylorSeerConfig(interval=2, granularity=first))
    before = swapped(tiny_dit)
    with pytest.raises(ValueError, match="already applied.*remove\\(\\) that handle first"):
        taylorseer.apply(tiny_dit, TaylorSeerConfig(interval=3, granularity=second))
    assert swapped(tiny_dit) == before  # the refused apply changed nothing
    cached = sample(tiny_dit, LABELS, num_steps=6, seed=0, listener=handle)
    assert handle.stats.steps_forecast > 0 and torch.isfinite(cached).all()
    handle.remove()
    assert not any(swapped(tiny_dit))
    with taylorseer.apply(tiny_dit, TaylorSeerConfig(granularity=second)):  # free again
        pass


def test_apply_is_refused_on_a_part_or_a_holder_of_an_accelerated_model(tiny_dit):
    with taylorseer.apply(tiny_dit, TaylorSeerConfig(granularity="output")):
        holder = nn.Sequential(tiny_dit)
        with pytest.raises(ValueError, match="already applied"):
            taylorseer.apply(holder, TaylorSeerConfig(modules=("0.transformer_blocks.*.attn1",)))
    with taylorseer.apply(tiny_dit, TaylorSeerConfig()):
        with pytest.raises(ValueError, match="already applied"):
            taylorseer.apply(tiny_dit.transformer_blocks[0], TaylorSeerConfig(modules=("attn1",)))
        with pytest.raises(ValueError, match="already applied"):
            taylorseer.apply(tiny_dit.transformer_blocks[0].attn1, TaylorSeerConfig(granularity="output"))
    assert not any(swapped(tiny_dit))


#################################################################################
#                  Item 6: non-finite abscissae and factors                      #
#################################################################################

@pytest.mark.parametrize("abscissa", ["timestep", "sigma"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, torch.tensor([math.nan, 1.0]),
                                   torch.tensor(math.inf)])
def test_non_finite_timestep_or_sigma_is_refused(toy, abscissa, value):
    with taylorseer.apply(toy, TaylorSeerConfig(abscissa=abscissa, modules=("blocks.*.poly",))) as handle:
        with handle.step(0, **{abscissa: 0.5}):
            toy(torch.zeros(8, dtype=torch.float64), 0.5)
        with pytest.raises(ValueError, match=f"{abscissa} of step 1 must be finite"):
            with handle.step(1, **{abscissa: value}):
                pytest.fail("the step must not open")
        assert handle.cached_keys()  # the generation is intact
        with handle.step(1, **{abscissa: 0.25}):
            assert torch.isfinite(toy(torch.zeros(8, dtype=torch.float64), 0.25)).all()


class Growing(nn.Module):
    """``out = 1000 (1 + 10 t^2)`` on 4 features: exceeds float16's 65504 from t = 2.5 on."""

    def forward(self, t: float) -> torch.Tensor:
        return torch.full((4,), 1000.0 * (1 + 10 * t * t))


class GrowingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Growing(), Growing()])

    def forward(self, t: float) -> torch.Tensor:
        return self.blocks[0](t) + self.blocks[1](t)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_float16_factor_overflow_computes_in_full_and_warns_once(order):
    """Features above 65504 stored as float16 overflow to inf: their forecast steps are computed in full (counted
    in stats.fallbacks['non-finite']) with one RuntimeWarning; the outputs are the true ones, never inf/NaN.
    The overflow first happens at a full step whose differences still fit in float16 (step 4)."""
    model = GrowingModel()
    config = TaylorSeerConfig(interval=2, warmup_steps=1, max_order=order, modules=("blocks.*",),
                              factor_dtype="float16")
    plain = [model(float(i)) for i in range(10)]
    with taylorseer.apply(model, config) as handle:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs = []
            handle.begin(10)
            for i in range(10):
                with handle.step(i):
                    outs.append(model(float(i)))
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "non-finite factors" in messages[0] and "65504" in messages[0]
        stats = handle.stats
        assert stats.pattern() == "FfFfFFFFFF"  # steps 5, 7, 9: planned forecasts, computed (fallback)
        for i, out in enumerate(outs):
            assert torch.isfinite(out).all(), i
            if i >= 4:  # from the first overflowing full step (step 4: 161000 > 65504) on: computed in full
                assert torch.equal(out, plain[i]), i
        assert stats.fallbacks["non-finite"] == 2 * 3  # steps 5, 7, 9, both targets
        assert stats.steps_full == 8 and stats.steps_forecast == 2


def test_nan_feature_on_a_full_step_is_not_forecast(toy):
    """A target that returns NaN on one full step: the forecast steps after it are computed in full."""
    poly = toy.blocks[0].poly
    original = poly.forward

    def sometimes_nan(t: float) -> torch.Tensor:
        out = original(t)
        return out * math.nan if t == 4.0 else out

    poly.forward = sometimes_nan
    config = TaylorSeerConfig(interval=2, warmup_steps=1, max_order=1, modules=("blocks.0.poly",))
    h = torch.zeros(8, dtype=torch.float64)
    plain = toy(h, 5.0)
    with taylorseer.apply(toy, config) as handle, pytest.warns(RuntimeWarning, match="non-finite factors"):
        handle.begin(8)
        for i in range(8):
            with handle.step(i):
                out = toy(h, float(i))
            if i == 5:  # forecast from step 4's NaN: computed instead
                assert torch.isfinite(out).all() and torch.equal(out, plain)
        assert handle.stats.fallbacks == {"non-finite": 1}
    del poly.forward


#################################################################################
#                          Item 9: messages say what happened                    #
#################################################################################

@pytest.mark.parametrize("abscissa", ["timestep", "sigma"])
def test_repeated_timestep_names_heun_and_suggests_step_abscissa(toy, abscissa):
    config = TaylorSeerConfig(warmup_steps=3, abscissa=abscissa, modules=("blocks.*.poly",))
    h = torch.zeros(8, dtype=torch.float64)
    with taylorseer.apply(toy, config) as handle:
        with handle.step(0, **{abscissa: 0.75}):
            toy(h, 0.75)
        with pytest.raises(ValueError, match=rf"step 1 has the same {abscissa} \(0.75\).*Heun.*abscissa='step'"):
            with handle.step(1, **{abscissa: 0.75}):
                toy(h, 0.75)
    with taylorseer.apply(toy, config.replace(abscissa="step")) as handle:  # the suggested fix works
        for i in range(2):
            with handle.step(i):
                toy(h, 0.75)


@pytest.mark.parametrize("cfg_mode", ["batch", "split"])  # split: branch 1 repeats the timestep after branch 0
def test_heun_scheduler_through_a_pipeline(cfg_mode):
    pipe, family = loop_pipeline("flux"), FAMILY["flux"]
    pipe.scheduler = diffusers.FlowMatchHeunDiscreteScheduler()
    # Heun evaluates the model twice per timestep: steps 1 and 2 (both full in the warm-up) share one timestep.
    with taylorseer.apply(pipe, TaylorSeerConfig(interval=3, warmup_steps=3, abscissa="timestep")):
        with pytest.raises(ValueError, match="Heun or DPM2-type schedulers repeat timesteps.*abscissa='step'"):
            pipe(family, num_inference_steps=4, cfg_mode=cfg_mode)
    with taylorseer.apply(pipe, TaylorSeerConfig(interval=3, warmup_steps=2, abscissa="step")) as handle:
        out = pipe(family, num_inference_steps=4, cfg_mode=cfg_mode)
        assert handle.stats.steps_forecast > 0 and torch.isfinite(out).all()


def test_a_step_told_twice_says_so(toy):
    """Two handle.step contexts for one step: with automatic branches, and with one named branch twice."""
    h = torch.zeros(8, dtype=torch.float64)
    config = TaylorSeerConfig(warmup_steps=3, modules=("blocks.*.poly",))
    with taylorseer.apply(toy, config) as handle:
        with handle.step(0):
            toy(h, 0.0)
        with pytest.raises(ValueError, match=r"step 0 was told twice.*put all model calls of a step in one "
                                             r"handle\.step context.*or name each call's branch"):
            with handle.step(0):
                pytest.fail("the step must not open")
        with handle.step(1):  # the handle is still usable
            toy(h, 1.0)
    with taylorseer.apply(toy, config) as handle:
        with handle.step(0, branch="cond"):
            toy(h, 0.0)
        with handle.step(0, branch="uncond"):
            toy(h, 0.0)
        with pytest.raises(ValueError, match=r"'blocks.0.poly' was computed twice in step 0 of branch 'cond' \(two "
                                             r"handle.step contexts for one step and branch\)"):
            with handle.step(0, branch="cond"):
                toy(h, 0.0)


class CallsTwice(nn.Module):
    """Runs ``blocks.1.poly`` twice in one forward (a shared module)."""

    def __init__(self, toy: nn.Module):
        super().__init__()
        self.blocks = toy.blocks

    def forward(self, h: torch.Tensor, t: float) -> torch.Tensor:
        return self.blocks[0].poly(t) + self.blocks[1].poly(t) + self.blocks[1].poly(t + 1)


def test_module_called_twice_in_one_forward_says_so(toy):
    model = CallsTwice(toy)
    with taylorseer.apply(model, TaylorSeerConfig(modules=("blocks.*.poly",))) as handle:
        with pytest.raises(ValueError, match=r"'blocks.1.poly' ran twice within one model call.*used several "
                                             r"times per forward.*leave it out of modules"):
            with handle.step(0):
                model(torch.zeros(8), 0.0)


#################################################################################
#                         Item 10: output structures                             #
#################################################################################

class Returns(nn.Module):
    """Returns whatever ``make(t)`` builds."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def forward(self, t: float):
        return self.make(t)


class Holder(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.blocks = nn.ModuleList([Returns(make)])

    def forward(self, t: float):
        return self.blocks[0](t)


@pytest.mark.parametrize("make, kind", [
    (lambda t: torch.ones(3) > t, "torch.bool tensor"),
    (lambda t: torch.arange(3) * int(t + 1), "torch.int64 tensor"),
    (lambda t: (torch.ones(3) * t, torch.zeros(3, dtype=torch.bool)), "torch.bool tensor"),
    (lambda t: (torch.ones(3) * t, object()), "object object"),
    (lambda t: {"sample": torch.ones(3) * t, "extra": [1, 2, {3}]}, "set object"),
])
def test_unsupported_outputs_are_refused_at_the_first_full_step(make, kind):
    model = Holder(make)
    with taylorseer.apply(model, TaylorSeerConfig(modules=("blocks.*",))) as handle:
        with pytest.raises(TypeError, match=rf"target 'blocks.0' returns a {kind}.*leave this module out"):
            with handle.step(0):
                model(0.0)
        assert handle.stats.module_full["blocks.0"] == 1 and not handle.cached_keys()


class ListBlock(nn.Module):
    """One output per input tensor (a list of the same length)."""

    def forward(self, items: list[torch.Tensor], t: float) -> list[torch.Tensor]:
        return [x * t for x in items]


class ListModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ListBlock()])

    def forward(self, items: list[torch.Tensor], t: float) -> torch.Tensor:
        return torch.stack(self.blocks[0](items, t)).sum(0)


def test_list_output_whose_length_follows_its_input_reanchors():
    """The input list grows 2 -> 3 at a forecast step: computed in full (before: StopIteration or a stale list)."""
    model = ListModel()
    items = [[torch.full((4,), float(k + 1)) for k in range(2 if i < 3 else 3)] for i in range(6)]
    plain = model(items[3], 3.0)
    with taylorseer.apply(model, TaylorSeerConfig(interval=3, warmup_steps=2, modules=("blocks.*",))) as handle:
        handle.begin(6)
        for i in range(6):
            with handle.step(i):
                out = model(items[i], float(i))
            if i == 3:
                assert torch.equal(out, plain)
        assert handle.stats.fallbacks == {"shape": 1} and handle.stats.pattern() == "FFfFFf"


@pytest.mark.parametrize("make, change", [
    (lambda t: [torch.ones(2) * t] * (1 if t < 3 else 2), "its output structure"),
    (lambda t: (torch.ones(2) * t, int(t)), r"a non-tensor output \(0 -> 3\)"),
    (lambda t: torch.ones(2 if t < 3 else 3) * t, "the shape of an output tensor"),
])
def test_output_changing_with_unchanged_inputs_is_refused(make, change):
    """Outputs whose structure, non-tensor values or shapes change with the step (inputs unchanged) would be
    returned stale on forecast steps: refused at the next full step, naming the target and what changed."""
    model = Holder(make)
    with taylorseer.apply(model, TaylorSeerConfig(interval=3, warmup_steps=1, modules=("blocks.*",))) as handle:
        handle.begin(6)
        for i in range(3):
            with handle.step(i):
                model(float(i))
        with pytest.raises(ValueError, match=rf"target 'blocks.0' changed {change} between full steps although "
                                             rf"its inputs kept their shapes.*leave this module out"):
            with handle.step(3):
                model(3.0)


def test_constant_non_tensor_outputs_are_kept():
    """None, flags and strings the module returns unchanged every step come back as they are."""
    model = Holder(lambda t: (torch.ones(2) * t, None, True, "tag", 3))
    with taylorseer.apply(model, TaylorSeerConfig(interval=2, warmup_steps=2, max_order=1,
                                                  modules=("blocks.*",))) as handle:
        for i in range(5):
            with handle.step(i):
                out = model(float(i))
            assert out[1:] == (None, True, "tag", 3) and torch.equal(out[0], torch.ones(2) * i)  # linear: exact
        assert handle.stats.pattern() == "FFfFf"


#################################################################################
#           Item 11: a pattern naming a container is refused                     #
#################################################################################

@pytest.mark.parametrize("pattern", ["transformer_blocks", "transformer_blocks.*.attn1.to_out"])
def test_pattern_naming_a_container_is_refused(tiny_dit, pattern):
    with pytest.raises(ValueError, match=rf"modules pattern '{pattern}' names '{pattern}' \(a ModuleList\): a "
                                         rf"container is never called.*'{pattern}\.\*"):
        taylorseer.apply(tiny_dit, TaylorSeerConfig(modules=(pattern,)))
    assert not any(swapped(tiny_dit))
    with pytest.raises(ValueError, match=r"e\.g\. \[.*'transformer_blocks\.\*\.attn1'"):
        taylorseer.apply(tiny_dit, TaylorSeerConfig(modules=("transformer_blocks",)))


def test_wildcards_pass_over_containers(tiny_dit):
    with taylorseer.apply(tiny_dit, TaylorSeerConfig(modules=("transformer_blocks.*.attn1.*",))) as handle:
        paths = [t.path for t in handle.targets]
    assert paths == [f"transformer_blocks.{b}.attn1.{m}" for b in range(2) for m in ("to_q", "to_k", "to_v")]


#################################################################################
#               Item 13: factors are freed when the generation ends              #
#################################################################################

@pytest.mark.parametrize("branches", [None, ("cond", "uncond")])
def test_factors_freed_at_the_end_of_a_generation_ending_in_forecasts(toy, branches):
    config = TaylorSeerConfig(interval=4, warmup_steps=1, max_order=2, modules=("blocks.*.poly",))
    h = torch.zeros(8, dtype=torch.float64)
    with taylorseer.apply(toy, config) as handle:
        assert handle.plan(10)[-1] is False  # FfffFfffFf: the last step is a forecast
        handle.begin(10)
        for i in range(10):
            for branch in branches or (None,):
                with handle.step(i, branch=branch):
                    toy(h, float(i))
            if i < 9:
                assert handle.cache_bytes() > 0
        assert handle.cache_bytes() == 0 and handle.cached_keys() == [] and handle.stats.cache_bytes == 0
        assert handle.stats.peak_cache_bytes > 0


@pytest.mark.parametrize("cfg_mode", ["batch", "split"])
def test_pipeline_frees_factors_when_the_call_returns(cfg_mode):
    pipe, family = loop_pipeline("wan"), FAMILY["wan"]
    with taylorseer.apply(pipe, TaylorSeerConfig(interval=3, warmup_steps=1, max_order=1)) as handle:
        assert handle.plan(8)[-1] is False  # FffFffFf
        pipe(family, cfg_mode=cfg_mode)
        assert handle.stats.steps_forecast == 5
        assert handle.cache_bytes() == 0 and handle.stats.cache_bytes == 0 < handle.stats.peak_cache_bytes


def test_peak_cache_bytes_is_the_generations_own(tiny_dit):
    with taylorseer.apply(tiny_dit, TaylorSeerConfig(interval=3, warmup_steps=1)) as handle:
        sample(tiny_dit, torch.arange(4), num_steps=6, seed=0, listener=handle)
        big = handle.stats.peak_cache_bytes
        sample(tiny_dit, torch.arange(1), num_steps=6, seed=0, listener=handle)
        assert handle.stats.peak_cache_bytes * 4 == big


#################################################################################
#       Item 1: a pipeline call that failed partway leaks nothing into later calls       #
#################################################################################

def failing_after(family, calls: int):
    """The family's transformer call, raising (as a failing callback would) before its ``calls``-th call."""
    count = [0]

    def forward(model, x, t, context):
        count[0] += 1
        if count[0] == calls:
            raise RuntimeError("callback failed")
        return family.forward(model, x, t, context)

    return dataclasses.replace(family, forward=forward)


def direct(name: str, t: float) -> torch.Tensor:
    family = FAMILY[name]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, *family.latent, generator=g)
    context = {k: torch.randint(0, 1000, (2,), generator=g) if not shape else torch.randn(2, *shape, generator=g)
               for k, shape in family.context.items()}
    with torch.no_grad():
        return family.forward(tiny(name), x, torch.tensor(t), context)


@pytest.mark.parametrize("name", ["dit", "flux"])  # flux: the pipeline passes t / 1000 to the transformer
@pytest.mark.parametrize("after", ["direct call", "another pipeline", "the same pipeline"])
def test_failed_pipeline_call_leaks_no_forecasts(name, after):
    pipe, family = loop_pipeline(name), FAMILY[name]
    t = 431.0 if name == "dit" else 0.431  # the scheduler's step 4 has another timestep
    plain = direct(name, t)
    config = TaylorSeerConfig(interval=3, warmup_steps=1, max_order=1)  # FffFffFf
    with taylorseer.apply(pipe, config) as handle:
        clean = pipe(family)
        with pytest.raises(RuntimeError, match="callback failed"):
            pipe(failing_after(family, 5), guidance_scale=3.0)  # dies before step 4's call (a forecast step)
        assert handle.cache_bytes() > 0  # what the dead run left
        if after == "direct call":
            with pytest.warns(UserWarning, match="taylorseer ended that generation"):
                assert torch.equal(direct(name, t), plain)
            assert handle.cache_bytes() == 0
            assert torch.equal(direct(name, t), plain)  # and stays ended
        elif after == "another pipeline":
            other = LoopPipeline(pipe.transformer, family.scheduler())
            other.set_progress_bar_config(disable=True)
            with pytest.warns(UserWarning, match="ended that generation"):
                assert torch.equal(other(family), full_run(name))
        else:
            assert torch.equal(pipe(family), clean)
            assert handle.stats.steps_forecast == 5
    assert torch.equal(pipe(family), full_run(name))


def test_timestep_check_allows_low_precision_timesteps():
    """FLUX pipelines pass t / 1000 in bfloat16: within the rounding of bfloat16 the calls match the schedule, so
    nothing ends the generation (no warning) and every planned step is forecast."""
    family = FAMILY["flux"]

    def forward(model, x, t, context):  # as FluxPipeline: timestep = t.expand(B).to(latents.dtype) / 1000
        timestep = t.expand(x.shape[0]).to(torch.bfloat16) / 1000
        return model(x, timestep=timestep, img_ids=_grid_ids(16, 4), txt_ids=torch.zeros(TEXT, 3), **context).sample

    bf16 = dataclasses.replace(family, forward=forward)
    pipe = loop_pipeline("flux")
    with taylorseer.apply(pipe, TaylorSeerConfig(interval=3, warmup_steps=1)) as handle:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pipe(bf16, num_inference_steps=28)
        assert handle.stats.steps_forecast == 28 - sum(handle.plan(28)) > 0


#################################################################################
#          Interrupts: an exception inside a step leaves nothing open            #
#################################################################################

@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupt_inside_a_step_leaves_the_handle_usable_and_removal_exact(tiny_dit, error):
    """An exception (or Ctrl-C) inside a target's own computation, mid-generation: the step closes, the next
    generation equals an uninterrupted one bitwise, and remove() restores the model exactly."""
    reference = sample(tiny_dit, LABELS, num_steps=8, seed=2)
    calls = [0]

    def fail_on_the_second_call(module, args):  # block 1's attention runs on full steps only: step 3
        calls[0] += 1
        if calls[0] == 2:
            raise error("interrupted")

    config = TaylorSeerConfig(interval=3, warmup_steps=1, max_order=2)
    with taylorseer.apply(tiny_dit, config) as handle:
        clean = sample(tiny_dit, LABELS, num_steps=8, seed=2, listener=handle)
        hook = tiny_dit.transformer_blocks[1].attn1.to_q.register_forward_pre_hook(fail_on_the_second_call)
        try:
            with pytest.raises(error, match="interrupted"):
                sample(tiny_dit, LABELS, num_steps=8, seed=2, listener=handle)
        finally:
            hook.remove()
        assert calls[0] == 2 and not handle.engine.active and handle.stats.steps_full == 2
        assert torch.equal(sample(tiny_dit, LABELS, num_steps=8, seed=2, listener=handle), clean)
    assert not any(swapped(tiny_dit))
    assert torch.equal(sample(tiny_dit, LABELS, num_steps=8, seed=2), reference)


def test_interrupt_inside_a_pipeline_call_leaves_the_next_call_clean():
    pipe, family = loop_pipeline("sd3"), FAMILY["sd3"]
    with taylorseer.apply(pipe, TaylorSeerConfig(interval=3, warmup_steps=1, max_order=1)) as handle:
        clean = pipe(family, cfg_mode="split")
        with pytest.raises(KeyboardInterrupt):  # torch runs no forward hook after a KeyboardInterrupt
            pipe(dataclasses.replace(family, forward=_interrupt_at(family, 6)), cfg_mode="split")
        assert torch.equal(pipe(family, cfg_mode="split"), clean)  # set_timesteps closes what was left open
        assert handle._open is None and not handle.cache.engine.active
    assert torch.equal(pipe(family), full_run("sd3"))


def _interrupt_at(family, call: int):
    count = [0]

    def forward(model, x, t, context):
        count[0] += 1
        hook = None
        if count[0] == call:  # Ctrl-C inside the transformer call, after its pre-hook opened the step
            def stop(module, args):
                raise KeyboardInterrupt

            hook = model.transformer_blocks[0].register_forward_pre_hook(stop)
        try:
            return family.forward(model, x, t, context)
        finally:
            if hook is not None:
                hook.remove()

    return forward
