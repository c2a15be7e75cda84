"""The host (Python) side of the hot path (issue 24): what a forecast step costs in Python per target, counted
deterministically (Python calls, not seconds), and the per-generation caches that keep it flat.

Timing lives in ``scripts/profile_forecast_step.py --python``; these tests count what the timing is made of, so they
fail when a per-call cost comes back, on any machine.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch
from diffusers import DiTTransformer2DModel

import taylorseer
from taylorseer.models.reference import DIT_MODELS
from taylorseer.policy import IntervalSchedule
from taylorseer.policy.base import StepInfo, build_policy
from taylorseer.policy.interval import IntervalPolicy

#################################################################################
#                 The interval policy: one plan per generation                  #
#################################################################################

@pytest.mark.parametrize("num_steps", [None, 1000])
def test_interval_decisions_are_planned_once_not_at_every_step(monkeypatch, num_steps):
    calls = []
    plan = IntervalPolicy.plan
    monkeypatch.setattr(IntervalPolicy, "plan", lambda self, n: calls.append(n) or plan(self, n))
    policy = build_policy(IntervalSchedule(interval=4, warmup_steps=2))
    policy.begin(num_steps)
    decisions = [policy.decide(StepInfo(i, num_steps, float(i))) for i in range(1000)]
    # 'FF' then 'fffF' repeated: the literal schedule of interval 4 after a warm-up of 2
    expected = [True, True] + ([False, False, False, True] * 250)[:998]
    assert [d.compute for d in decisions] == expected
    assert [d.reason for d in decisions[:7]] == ["warmup", "warmup", "interval", "interval", "interval", "interval",
                                                  "interval"]
    assert len(calls) <= (1 if num_steps else 11)  # growing by doubling without num_steps: log2(1000) + 1 plans


#################################################################################
#           A forecast step's Python: frames per target, fed observers          #
#################################################################################

RUNTIME = os.sep + os.path.join("taylorseer", "runtime") + os.sep


def _tiny_dit(layers: int):
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**{**DIT_MODELS["DiT-FM-T/4"](), "num_layers": layers}).eval().requires_grad_(False)
    x, y = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 5])
    return model, lambda t: model(x, timestep=torch.full((2,), t), class_labels=y).sample


_MODULES = taylorseer.TaylorSeerConfig(interval=6, warmup_steps=2, granularity="module", block_shortcuts=False)


def _frames_per_step(layers: int, steps: int = 4) -> tuple[Counter, Counter, int]:
    """Python frames on the forecast steps of a generation (module targets, no block shortcuts), per step: those of
    the target calls (each installed wrapper and everything it runs, the batched pass left out; no target computes
    on these steps, so none of it is the model's), and those of the step context (``handle.step``: creating it,
    entering, leaving, and everything they run); and the number of targets."""
    model, call = _tiny_dit(layers)
    calls: Counter = Counter()
    context: Counter = Counter()
    stack: list = []  # the outermost counted frame (a wrapper, or the batched pass to leave out) while it runs

    def profile(frame, event, arg):
        code = frame.f_code
        if event == "call":
            if stack:
                if stack[0][1] is calls:
                    calls[code.co_filename, code.co_name] += 1
            elif code.co_filename.endswith(os.sep + "install.py") and RUNTIME in code.co_filename:
                stack.append((frame, calls))
                calls[code.co_filename, code.co_name] += 1
            if code.co_name == "_prepare" and RUNTIME in code.co_filename:
                calls[code.co_filename, code.co_name] -= 1
                stack.insert(0, (frame, None))  # the batched pass: once per step, the forecaster's frames
        elif event == "return" and stack and frame is stack[0][0]:
            stack.pop(0)

    def context_profile(frame, event, arg):
        if event == "call":
            context[frame.f_code.co_filename, frame.f_code.co_name] += 1

    with torch.no_grad(), taylorseer.apply(model, _MODULES) as handle:
        targets = len(handle.targets)
        handle.begin(8)  # a first generation, as a sampler runs many: what is kept across generations is made
        for i in range(8):
            with handle.step(i):
                call(900.0 - 100 * i)
        handle.begin(8)
        for i in range(2):
            with handle.step(i):
                call(900.0 - 100 * i)
        for i in range(2, 2 + steps):
            sys.setprofile(context_profile)
            step = handle.step(i)
            computed = step.__enter__()
            sys.setprofile(profile)
            call(900.0 - 100 * i)  # the model's own modules run too: only the wrappers' frames are counted
            sys.setprofile(context_profile)
            step.__exit__(None, None, None)
            sys.setprofile(None)
            assert not computed
        assert handle.stats.module_forecast == Counter({path: steps for path in [t.path for t in handle.targets]})
    context.pop((sys.setprofile.__module__, "setprofile"), None)
    return Counter({k: v / steps for k, v in calls.items()}), Counter({k: v / steps for k, v in context.items()}), \
        targets


def test_a_forecast_call_runs_two_python_frames_per_target():
    # Each target call after the branch's first: the wrapper and its compile check (install.Forward.__call__,
    # torch.compiler.is_dynamo_compiling), no engine frame. The first call also runs the engine's entry point and
    # the kind's forecast. Before (1155ac7): five frames at every call (the wrapper, torch.compiler.is_compiling
    # and the torch.jit.is_scripting it calls, Engine.call, OutputKind.forecast).
    for layers in (1, 4):
        calls, _, targets = _frames_per_step(layers)
        assert targets == 2 * layers
        assert sum(calls.values()) == 2 * targets + 2, calls


def test_a_forecast_step_context_runs_at_most_fourteen_python_frames():
    # handle.step(i) created, entered and left on a forecast step of a second generation: a plain class (contextlib's
    # generator machinery before), one frozen StepInfo per (step, branch) kept across generations, the policy's
    # no-op notify skipped, the observer told once per branch. The first forecast step after a full step also reads
    # the finiteness flags (7 frames, 1.75 per step over these 4). Before (1155ac7): 27.5 frames per step here.
    _, context, _ = _frames_per_step(1)
    assert sum(context.values()) <= 14 + 1.75, context


#################################################################################
#      CUDA graphs (reduce-overhead), what the CPU can test: static buffers      #
#################################################################################

def _compiled_generations(static: bool | None, generations: int = 2):
    """Two told generations of a regionally compiled tiny DiT (dynamo, eager backend: the traced path without a
    compiler), recording at each forecast step the addresses the traced forecasts read."""
    model, _ = _tiny_dit(2)
    x, y = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 5])
    handle = taylorseer.apply(model, _MODULES)
    handle.engine.static_factors = static
    for block in model.transformer_blocks:
        block.compile(backend="eager")
    outputs, addresses, copies = [], [], []
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            for g in range(generations):
                handle.begin(12)  # interval 6 after a warm-up of 2: full steps 0, 1, 7 (then 8-11 forecast)
                with torch._dynamo.config.patch(error_on_recompile=g > 0):
                    for i in range(12):
                        with handle.step(i) as full:
                            outputs.append(model(x, timestep=torch.full((2,), 900.0 - 70 * i), class_labels=y).sample)
                            if not full:
                                live = [s for s in handle.engine.forecast_slots if s.live]
                                assert len(live) == len(handle.targets)
                                seen = {("weights", len(s.weights)): s.weights.data_ptr() for s in live}
                                seen.update({(s.path, leaf, k): f.data_ptr() for s in live
                                             for leaf, st in enumerate(s.entry.states)
                                             for k, f in enumerate(st.factors)})
                                addresses.append(seen)
                                copies.append(handle.engine.static.copies)
        static_buffers = handle.engine.static
        buffers = [b for bs in static_buffers.buffers.values() for b in bs]
        buffers += list(static_buffers.weight_buffers.values())
        marks = {getattr(b, "_dynamo_static_input_type", None) for b in buffers}
    finally:
        handle.remove()
        torch._dynamo.reset()
    return outputs, addresses, copies, marks, static_buffers


@pytest.mark.slow
def test_static_factor_buffers_keep_their_addresses_and_change_nothing():
    outputs, addresses, copies, marks, static = _compiled_generations(static=True)
    plain, plain_addresses, _, _, _ = _compiled_generations(static=False)
    for a, b in zip(outputs, plain, strict=True):
        assert torch.equal(a, b)  # a copy into a buffer is exact
    # steps 2-6 and 8-11 of each generation are forecast: 9 per generation, with 2 factors per target until the
    # full step 7, then 3 (and 3 weights); each buffer keeps its address in both generations
    assert len(addresses) == 18
    assert [len(a) for a in addresses] == ([1 + 4 * 2] * 5 + [1 + 4 * 3] * 4) * 2
    first = {key: ptr for a in addresses for key, ptr in a.items()}
    assert all(a[key] == first[key] for a in addresses for key in a)
    assert any(a[key] != plain_addresses[0][key] for a in plain_addresses for key in plain_addresses[0] if key in a)
    assert marks == {"unguarded"}  # torch._dynamo.mark_static_address: CUDA graphs read them in place
    # copies only on the forecast step after a full step (each factor once), none on the forecast steps after it
    assert copies[1] == copies[0] and copies[5] > copies[4] and copies[6] == copies[5]
    assert not static.buffers and not static.weight_buffers  # remove() frees them
