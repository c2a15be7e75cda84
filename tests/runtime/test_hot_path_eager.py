"""The eager fast path of a forecast call (issue 24): ``install.Forward`` hands out the batched pass's ready tensor
itself, behind one compile check (``torch.compiler.is_dynamo_compiling`` or the module flag that non-strict export
sets). These tests pin what that check must decide and what the fast path must leave unchanged.

- Eager: the same results to the bit and the same stats as the engine's path (the fast path turned off).
- Traced by dynamo while the fast path is armed (a block compiled after an eager one whose call ran the pass): the
  traced path is taken, nothing recompiles in a second generation.
- Non-strict export (no dynamo, the module flag): the traced path is taken.
- The model's own wrapper skips its two disabled step-reading calls inside told steps past step 0 only.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch._dynamo
import torch._dynamo.config
from diffusers import DiTTransformer2DModel
from torch import nn

import taylorseer
from taylorseer.models.reference import DIT_MODELS
from taylorseer.runtime.autostep import CallSteps

CONFIG = taylorseer.TaylorSeerConfig(interval=4, warmup_steps=2, granularity="module", block_shortcuts=False)
STEPS = 10  # full steps 0, 1, 5, 9; steps 2-4 and 6-8 forecast


def _dit(layers: int = 2):
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**{**DIT_MODELS["DiT-FM-T/4"](), "num_layers": layers}).eval().requires_grad_(False)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([3, 5])
    return model, lambda t: model(x, timestep=torch.full((2,), t), class_labels=y).sample


def _generation(handle, call, inside=None) -> list[torch.Tensor]:
    outputs = []
    handle.begin(STEPS)
    for i in range(STEPS):
        with handle.step(i) as full:
            outputs.append(call(900.0 - 80 * i))
            if inside is not None:
                inside(i, full)
    return outputs


def test_the_fast_path_changes_no_bit_and_no_count(monkeypatch):
    model, call = _dit()
    taken: list[int] = []

    def watch(i, full):  # the wrappers popped every ready tensor (fast path or engine path alike)
        assert handle.engine.ready == {}

    with torch.no_grad(), taylorseer.apply(model, CONFIG) as handle:
        engine_call = handle.engine.call
        monkeypatch.setattr(handle.engine, "call", lambda *a: taken.append(1) or engine_call(*a))
        fast = _generation(handle, call, watch)
        fast_stats = handle.stats
        fast_calls = len(taken)
        taken.clear()
        # the same generation with the fast path never armed: every call through the engine
        prepare = handle.engine._prepare
        monkeypatch.setattr(handle.engine, "_prepare", lambda slot: (prepare(slot), setattr(handle.engine, "hot",
                                                                                            False)))
        slow = _generation(handle, call, watch)
        slow_stats = handle.stats
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)
    targets = 2 * 2  # attn1 and ff of 2 blocks
    assert len(taken) == STEPS * targets  # the engine path: every call of every step
    assert fast_calls == STEPS * targets - 6 * (targets - 1)  # fast: one call per forecast step left to the engine
    assert fast_stats.module_forecast == slow_stats.module_forecast == Counter(
        {t.path: 6 for t in handle.targets})
    assert fast_stats.decisions == slow_stats.decisions
    assert (fast_stats.steps_full, fast_stats.steps_forecast) == (slow_stats.steps_full, slow_stats.steps_forecast) \
        == (4, 6)


def test_a_changed_input_shape_leaves_the_fast_path_for_the_fallback():
    model, call = _dit()
    with torch.no_grad(), taylorseer.apply(model, CONFIG) as handle:
        handle.begin(STEPS)
        for i in range(3):
            with handle.step(i):
                call(900.0 - 80 * i)
        ff = model.transformer_blocks[1].ff
        with handle.step(3):
            model.transformer_blocks[0].attn1.forward(torch.randn(2, 16, 64))  # the opening target: the pass ran
            assert handle.engine.hot
            wider = torch.randn(2, 20, 64)
            assert torch.equal(ff(wider), ff.forward.original(wider))  # computed in full, not the ready tensor
        assert handle.stats.fallbacks == Counter({"shape": 1})


@pytest.mark.slow
def test_a_block_traced_by_dynamo_after_an_eager_one_takes_the_traced_path():
    # Block 0 eager: its first call runs the batched pass and arms the fast path (engine.hot) for the whole branch.
    # Block 1 compiled (dynamo, eager backend): its wrappers are traced while armed and must still take the traced
    # path (the forecast from the bound factors inside the graph), leaving their ready tensors unpopped.
    model, call = _dit()
    handle = taylorseer.apply(model, CONFIG)
    model.transformer_blocks[1].compile(backend="eager")
    block1 = {s.index for s in handle.engine.slots if s.path.startswith("transformer_blocks.1.")}
    torch._dynamo.reset()
    left: list[set] = []

    def watch(i, full):
        if not full:
            left.append(set(handle.engine.ready))

    try:
        with torch.no_grad():
            first = _generation(handle, call, watch)
            with torch._dynamo.config.patch(error_on_recompile=True):
                second = _generation(handle, call, watch)
        assert handle.engine.compiled
    finally:
        handle.remove()
        torch._dynamo.reset()
    assert left == [block1] * 12  # 6 forecast steps per generation, two generations
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


class _Wrap(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, timestep=t, class_labels=y).sample


def test_non_strict_export_takes_the_traced_path():
    model, _ = _dit(1)
    wrap = _Wrap(model)
    x, y = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 5])
    with torch.no_grad(), taylorseer.apply(model, CONFIG) as handle:
        handle.begin(STEPS)
        for i in range(2):
            with handle.step(i):
                wrap(x, torch.full((2,), 900.0 - 80 * i), y)
        with handle.step(2) as full:
            assert not full
            assert not handle.engine.compiled
            torch.export.export(wrap, (x, torch.full((2,), 740.0), y), strict=False)
            assert handle.engine.compiled  # set by the wrapper's traced path only
            assert not torch.compiler.is_compiling()


def test_told_steps_skip_the_model_wrappers_step_reading_past_step_zero(monkeypatch):
    model, call = _dit(1)
    seen: list[int | None] = []
    before = CallSteps.before

    def counted(self, module, args, kwargs):
        seen.append(self.handle.engine.controller.index)
        return before(self, module, args, kwargs)

    monkeypatch.setattr(CallSteps, "before", counted)
    with torch.no_grad(), taylorseer.apply(model, CONFIG) as handle:
        told = _generation(handle, call)
        assert seen == [0]  # told steps: the layout check at step 0 only
        seen.clear()
        handle.begin(STEPS)
        untold = [call(900.0 - 80 * i) for i in range(STEPS)]  # steps read from each call's timestep
        assert seen == [None] * STEPS  # every untold call reads its step (no told step is open)
        assert handle.stats.steps_forecast == 6
    for a, b in zip(told, untold, strict=True):
        assert torch.equal(a, b)
