"""Fresh forecasts written in place (block residual adds, the DiT shortcut's gates): the same bits as the
out-of-place expressions, taken only where that holds, and really taken on the embedded model's forecast steps."""

import pytest
import torch

import taylorseer
from taylorseer.adapters.shortcuts import _dit_block
from taylorseer.forecast.base import writable
from taylorseer.runtime.state import TENSOR, residual_leaves


def _pair(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) * 10 ** torch.randint(-3, 4, (), generator=g).item()
            for _ in range(2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_residual_add_in_place_is_bit_identical(dtype):
    for seed in range(5):
        inputs, residual = _pair((3, 17, 8), dtype, seed)
        expected = inputs + residual
        fresh = residual.clone()
        (out,) = residual_leaves("b", ("hidden_states",), ["hidden_states"], (inputs,), {}, [fresh], [TENSOR])
        assert out is fresh  # written in place
        assert torch.equal(out, expected)


def test_gate_and_add_in_place_is_bit_identical():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        a, f, h = (torch.randn(4, 9, 16, generator=g).to(dtype) for _ in range(3))
        g1, g2 = (torch.randn(4, 1, 16, generator=g).to(dtype) for _ in range(2))
        expected = g2 * f + (g1 * a + h)
        assert writable(a, g1, h) and writable(f, g2, a)
        assert torch.equal(f.clone().mul_(g2).add_(a.clone().mul_(g1).add_(h)), expected)


def test_writable_refuses_what_would_change_the_result():
    x = torch.zeros(2, 3)
    assert writable(x, torch.ones(1, 3), torch.ones(2, 3))
    assert not writable(torch.zeros(1, 3), torch.ones(2, 3))  # the result is larger than the forecast
    assert not writable(x, torch.ones(2, 3, dtype=torch.float64))  # type promotion: a float64 result
    assert not writable(x.to(torch.bfloat16), torch.ones(2, 3))
    assert not writable(torch.zeros(3, 2).t(), torch.ones(2, 3))  # not dense in order
    assert not writable(x, torch.ones(4, 3))  # not broadcastable: the out-of-place op raises its own error
    leaf = torch.ones(2, 3, requires_grad=True)
    assert not writable(x, leaf)  # autograd would need the forecast's old value
    with torch.no_grad():
        assert writable(x, leaf)
    assert not writable(torch.zeros(2, 3, requires_grad=True), torch.ones(2, 3))


def test_residual_falls_back_out_of_place_and_autograd_still_works():
    inputs = torch.randn(2, 5, requires_grad=True)
    residual = torch.randn(2, 5)
    (out,) = residual_leaves("b", ("x",), ["x"], (inputs,), {}, [residual.clone()], [TENSOR])
    out.sum().backward()
    assert torch.equal(inputs.grad, torch.ones(2, 5))
    half = torch.randn(2, 5, dtype=torch.float16)  # float16 residual + float32 input: a float32 output
    (out,) = residual_leaves("b", ("x",), ["x"], (inputs.detach(),), {}, [half], [TENSOR])
    assert out.dtype == torch.float32 and out is not half
    assert torch.equal(out, inputs.detach() + half)


def test_shortcut_writes_into_the_forecasts(tiny_dit):
    block = tiny_dit.transformer_blocks[0]
    width = block.norm1.linear.in_features
    g = torch.Generator().manual_seed(1)
    hidden, attn, ff = (torch.randn(2, 5, width, generator=g) for _ in range(3))
    step, labels = torch.tensor([10.0, 10.0]), torch.tensor([1, 2])
    with torch.no_grad():
        slow = _dit_block(block, {"attn1": attn.clone(), "ff": ff.clone()}, hidden.clone().requires_grad_(),
                          timestep=step, class_labels=labels)  # autograd would need the old values: out of place
        forecasts = {"attn1": attn.clone(), "ff": ff.clone()}
        fast = _dit_block(block, forecasts, hidden, timestep=step, class_labels=labels)
    assert fast is forecasts["ff"]
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("granularity, factor_dtype", [("block", None), ("block", "bfloat16"), ("module", None)])
def test_generation_on_the_embedded_model_unchanged_by_in_place(monkeypatch, granularity, factor_dtype):
    """The residual adds (block granularity, also with factors stored in bfloat16 and cast back) and the DiT
    shortcut's gates and adds (module granularity) in place on every forecast step of a real generation: the images
    equal those of the out-of-place expressions, to the bit."""
    import taylorseer.adapters.shortcuts as shortcuts
    import taylorseer.runtime.state as state
    from taylorseer.forecast import base
    from taylorseer.models.pretrained import load_reference
    from taylorseer.models.sampler import sample

    model, labels = load_reference(), torch.tensor([0, 3, 7])
    config = taylorseer.TaylorSeerConfig(interval=4, warmup_steps=2, max_order=2, granularity=granularity,
                                         factor_dtype=factor_dtype)
    taken = []

    def counted(*tensors):
        taken.append(base.writable(*tensors))
        return taken[-1]

    for owner in (state, shortcuts):
        monkeypatch.setattr(owner, "writable", counted)
    with torch.no_grad():
        with taylorseer.apply(model, config) as handle:
            fast = sample(model, labels, num_steps=14, seed=2, listener=handle)
        for owner in (state, shortcuts):
            monkeypatch.setattr(owner, "writable", lambda *a: False)
        with taylorseer.apply(model, config) as handle:
            slow = sample(model, labels, num_steps=14, seed=2, listener=handle)
    checks = len(model.transformer_blocks) * (2 if granularity == "module" else 1)  # per forecast step, CFG batched
    assert handle.stats.steps_forecast > 0
    assert taken == [True] * (handle.stats.steps_forecast * checks)
    assert torch.equal(fast, slow)
