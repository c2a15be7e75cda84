"""The hot path a GPU needs (issue 24), counted on the CPU: host syncs per generation, the tensor ops the library
dispatches per forecast step, graph breaks and recompiles under torch.compile, and exactness of the batched pass.

Counting: a ``TorchDispatchMode`` sees every aten op; an op is the library's when the innermost Python frame outside
torch itself lies in ``taylorseer/runtime`` or ``taylorseer/forecast`` (the model's own ops, reached through a
wrapper, have the model's frame innermost). A host sync is ``aten._local_scalar_dense`` or ``aten.is_nonzero``
(``.item()``, ``bool()``, ``float()`` of a tensor); the reads the runtime does on purpose (finiteness, a probe's
observation) go through ``state.read_host`` and are counted in ``engine.host_reads``.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch
import torch._dynamo
import torch._dynamo.config
from diffusers import DiTTransformer2DModel
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import taylorseer
from taylorseer import TaylorSeerConfig
from taylorseer.forecast import AdamsForecast, CorrectorForecast, HermiteForecast, TaylorForecast
from taylorseer.models.flux_reference import ClassPrompts, build_flux_reference, image_ids, text_ids
from taylorseer.models.reference import DIT_MODELS
from taylorseer.parts import CacheConfig, Store, Targets
from taylorseer.policy import ConfidenceGate, IntervalSchedule

SYNCS = {"aten._local_scalar_dense.default", "aten.is_nonzero.default"}
LIBRARY = (os.sep + os.path.join("taylorseer", "runtime") + os.sep, os.sep + os.path.join("taylorseer", "forecast")
           + os.sep)
TORCH = os.path.dirname(torch.__file__)
STEPS = 10


class OpCounter(TorchDispatchMode):
    """Counts aten ops, split by whose they are (library or model), and host syncs."""

    def __init__(self) -> None:
        super().__init__()
        self.library: Counter = Counter()
        self.model: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame = sys._getframe(1)
        while frame is not None and (frame.f_code.co_filename.startswith(TORCH) or frame.f_code.co_filename == __file__
                                     and frame.f_code.co_name == "__torch_dispatch__"):
            frame = frame.f_back
        name = frame.f_code.co_filename if frame is not None else ""
        (self.library if any(part in name for part in LIBRARY) else self.model)[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def syncs(self, which: Counter) -> int:
        return sum(n for op, n in which.items() if op in SYNCS)


#################################################################################
#                       Models: the embedded DiT, a tiny FLUX                   #
#################################################################################

def dit(layers: int = 2):
    """The tiny DiT of the contract tests (``DiT-FM-T/4``) with ``layers`` blocks."""
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**{**DIT_MODELS["DiT-FM-T/4"](), "num_layers": layers}).eval().requires_grad_(False)
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 7, 1])
    return model, lambda t: model(x, timestep=torch.full((4,), t), class_labels=y).sample


def flux():
    torch.manual_seed(0)
    model, prompts = build_flux_reference("Flux-FM-T-16").requires_grad_(False), ClassPrompts("Flux-FM-T-16")
    x = torch.randn(2, 64, 4, generator=torch.Generator().manual_seed(1))
    seq, pooled = (p.detach() for p in prompts(torch.tensor([3, 10])))
    ids, tids = image_ids(16), text_ids()
    return model, lambda t: model(hidden_states=x, encoder_hidden_states=seq, pooled_projections=pooled,
                                  timestep=torch.full((2,), t / 1000), img_ids=ids, txt_ids=tids,
                                  return_dict=False)[0]


MODELS = {"dit": dit, "flux": flux}


def config(forecaster, policy=None, **targets) -> CacheConfig:
    policy = policy or IntervalSchedule(interval=3, warmup_steps=2)
    return CacheConfig(policy, forecaster, Targets(**targets), Store())


FORECASTERS = {
    "taylor-divided": TaylorForecast(max_order=2),
    "taylor-reference": TaylorForecast(max_order=2, scheme="reference"),
    "hermite": HermiteForecast(max_order=2),
    "adams": AdamsForecast(order=2),
    "corrector": CorrectorForecast(),
}


def generation(call, handle, steps: int = STEPS, per_step=None) -> list[torch.Tensor]:
    """One told generation; ``per_step(i, full)`` is entered around each step's model call (a context factory)."""
    outs = []
    handle.begin(steps)
    for i in range(steps):
        t = 999.0 - 90 * i
        with handle.step(i) as full:
            if per_step is None:
                outs.append(call(t))
            else:
                with per_step(i, full):
                    outs.append(call(t))
    return outs


#################################################################################
#                                   Host syncs                                  #
#################################################################################

@pytest.mark.parametrize("name", sorted(FORECASTERS))
@pytest.mark.parametrize("family", sorted(MODELS))
def test_a_scheduled_generation_reads_nothing_from_the_device_per_call(family, name):
    """0 host syncs dispatched by the library in a whole generation at module granularity; its deliberate reads
    (the batched finiteness flags) are at most one per full step, none per target."""
    model, call = MODELS[family]()
    with taylorseer.apply(model, config(FORECASTERS[name])) as handle:
        generation(call, handle)  # warm: first-call effects (lazy inits) are not the hot path
        handle.engine.host_reads = 0  # (an attribute the old runtime lacks: then only the dispatch count decides)
        with OpCounter() as ops:
            generation(call, handle)
        full = handle.stats.steps_full
        assert handle.stats.steps_forecast > 0 and len(handle.targets) >= 4
    assert ops.syncs(ops.library) == 0, ops.library
    assert handle.engine.host_reads <= full


def test_a_probe_policy_reads_at_most_once_per_step():
    model, call = dit()
    policy = ConfidenceGate(threshold=0.5, warmup_steps=2, probe_blocks=1)
    with taylorseer.apply(model, config(TaylorForecast(max_order=2), policy)) as handle:
        generation(call, handle)
        handle.engine.host_reads = 0  # (an attribute the old runtime lacks: then only the dispatch count decides)
        with OpCounter() as ops:
            generation(call, handle)
        assert handle.stats.steps_forecast > 0
    assert ops.syncs(ops.library) == 0, ops.library
    assert handle.engine.host_reads <= STEPS


#################################################################################
#                         Tensor ops per forecast step                          #
#################################################################################

def _forecast_step_ops(model_call, cfg) -> tuple[int, int]:
    """(library ops in the first forecast step of a second generation, number of targets)."""
    model, call = model_call
    counted: list[Counter] = []

    def per_step(i, full):
        mode = OpCounter()
        if not full and not counted:
            counted.append(mode.library)
            return mode
        return _Nothing()

    with taylorseer.apply(model, cfg) as handle:
        generation(call, handle)
        generation(call, handle, per_step=per_step)
        targets = len(handle.targets)
    return sum(counted[0].values()), targets


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("name", sorted(FORECASTERS))
def test_library_ops_per_forecast_step_grow_with_the_order_not_with_the_targets(name):
    order = 2
    cfg = config(FORECASTERS[name])
    few, few_targets = _forecast_step_ops(dit(layers=1), cfg)
    many, many_targets = _forecast_step_ops(dit(layers=6), cfg)
    assert many_targets >= 3 * few_targets
    assert many == few <= 3 * (order + 1), (few, many)


def test_library_ops_per_forecast_step_on_a_tiny_flux():
    ops, targets = _forecast_step_ops(flux(), config(TaylorForecast(max_order=2)))
    assert targets >= 6 and ops <= 3 * 3, ops


#################################################################################
#                 Exactness: the batched pass changes nothing                   #
#################################################################################

@pytest.mark.parametrize("name", sorted(FORECASTERS))
def test_batched_forecasts_equal_the_per_target_forecasts_to_the_bit(name):
    from taylorseer.forecast.base import build_forecaster, predict_batch

    f = build_forecaster(FORECASTERS[name])
    g = torch.Generator().manual_seed(0)
    states = []
    for k in range(5):  # states of different history lengths and spacings in one batch
        s = f.empty()
        for j, p in enumerate([0.0, 1.0, 3.0, 4.0][: 1 + k % 4]):
            s = f.update(s, torch.randn(3, 7, generator=g) * (k + 1), p + 0.5 * (k % 2) * j)
        states.append(s)
    for point in (5.0, 7.5, -2.0):
        batched = predict_batch(f, states, point)
        for s, b in zip(states, batched):
            assert torch.equal(b, f.predict(s, point))
        half = predict_batch(f, states, point, dtypes=[torch.float16] * len(states))
        for s, b in zip(states, half):
            assert torch.equal(b, f.predict(s, point, dtype=torch.float16))


#################################################################################
#                     torch.compile: graph breaks, recompiles                   #
#################################################################################

def _compile(model, cfg, mode):
    if mode in ("regional", "reduce-overhead"):
        # reduce-overhead: CUDA graphs where the device has them; on the CPU the same compile path without them
        # (what the CPU allows: decisions outside the graph, no recompiles, the same results).
        handle = taylorseer.apply(model, cfg)
        for block in model.transformer_blocks:
            block.compile(mode=None if mode == "regional" else mode)
        return model, handle
    compiled = torch.compile(model)
    return compiled, taylorseer.apply(compiled, cfg)


def _breaks_inside_blocks() -> int:
    """Graph breaks counted by dynamo since the last reset whose reason names a wrapper or engine frame."""
    return sum(n for reason, n in counters["graph_break"].items())


@pytest.mark.parametrize("mode", ["regional", "whole", "reduce-overhead"])
@pytest.mark.slow
def test_forecast_steps_take_no_graph_break_and_nothing_recompiles_after_the_first_generation(mode):
    model, _ = dit()
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 7, 1])
    cfg = TaylorSeerConfig(interval=3, warmup_steps=2, max_order=2)
    eager_model, eager_call = dit()
    with taylorseer.apply(eager_model, cfg) as handle:
        eager = generation(eager_call, handle)
    torch._dynamo.reset()
    breaks: dict[int, int] = {}
    explained: dict[int, list] = {}

    class Watch:
        def __init__(self, i, full):
            self.i, self.full = i, full

        def __enter__(self):
            counters.clear()

        def __exit__(self, *exc):
            if not self.full:
                breaks[self.i] = _breaks_inside_blocks()
                explained[self.i] = list(counters["graph_break"])
            return False

    compiled, handle = _compile(model, cfg, mode)
    call = lambda t: compiled(x, timestep=torch.full((4,), t), class_labels=y).sample  # noqa: E731
    try:
        first = generation(call, handle, per_step=Watch)
        assert breaks and all(n == 0 for n in breaks.values()), explained
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = generation(call, handle)
        assert handle.stats.steps_forecast > 0
    finally:
        handle.remove()
        torch._dynamo.reset()
    for a, b, c in zip(first, second, eager):
        assert torch.equal(a, b)
        assert float((a - c).abs().max()) <= 1e-4
