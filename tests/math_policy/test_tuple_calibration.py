"""Calibration of targets that return tuples: each tensor's tokens are rows of one joined feature (issue #23), so
block and module calibration (fitted weights) run on the FLUX-architecture reference, whose double-stream blocks
return ``(encoder_hidden_states, hidden_states)``."""

import pytest
import torch
from torch import nn

import taylorseer
from taylorseer.calibration.record import TrajectoryRecorder, TrajectoryStats, joined_feature


class Pair(nn.Module):
    """Returns (x[:, :2] * 2, x[:, 2:] + 1): two tensors with the same rows and channels, other token counts."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, :2] * 2, x[:, 2:] + 1


class Wrap(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner(x)


def test_joined_feature_concatenates_tokens_and_refuses_other_channels():
    a, b = torch.arange(6.0).reshape(1, 2, 3), torch.arange(12.0).reshape(1, 4, 3)
    joined = joined_feature("t", "tuple", [a, b])
    assert joined.shape == (1, 6, 3)
    assert torch.equal(joined[:, :2], a) and torch.equal(joined[:, 2:], b)
    assert joined_feature("t", "Tensor", [a]).shape == (1, 2, 3)
    with pytest.raises(TypeError, match="'blocks.3'.*same first .rows. and last .channels."):
        joined_feature("blocks.3", "tuple", [a, torch.zeros(1, 4, 5)])
    with pytest.raises(TypeError, match="'blocks.3' returns tuple with no tensor"):
        joined_feature("blocks.3", "tuple", [])


def test_recorder_keeps_a_tuple_output_as_one_feature_per_step():
    model = Wrap(Pair())
    rec = TrajectoryRecorder(model, ["inner"])
    rec.begin(2)
    x = torch.arange(10.0).reshape(1, 5, 2)
    for step in range(2):
        with rec.step(step):
            model(x + step)
    out = rec.take()["inner"]
    assert out.shape == (2, 1, 5, 2)
    # step 1: first two tokens doubled, the other three plus one, as the module returns them
    assert torch.equal(out[1, :, :2], (x[:, :2] + 1) * 2)
    assert torch.equal(out[1, :, 2:], x[:, 2:] + 2)
    stats = TrajectoryStats(2, "target")
    stats.add("inner", out)
    assert stats.rows["inner"] == 5  # every token of both tensors is a calibration row
    rec.remove()


@pytest.fixture(scope="module")
def tiny_flux():
    from toy_models import tiny_flux_reference

    return tiny_flux_reference()


@pytest.mark.parametrize("granularity", ["block", "module"])
def test_flux_block_and_module_calibration_fit_and_run(tiny_flux, tmp_path, granularity):
    from taylorseer.calibration import calibrate
    from taylorseer.eval.flux import FluxSampler
    from taylorseer.forecast import TaylorForecast
    from taylorseer.parts import CacheConfig, Targets
    from taylorseer.policy.schedule import FixedSchedule

    torch.set_num_threads(1)
    sampler = FluxSampler(tiny_flux)
    steps = 8
    schedule = FixedSchedule((0, 1, 3, 6), steps)
    cal = calibrate(tiny_flux.transformer, budget=4, out=str(tmp_path / "t.safetensors"), num_steps=steps,
                    images=4, classes=(0, 1, 2, 3), guidance_scale=2.0, cfg_mode="split", schedule=schedule,
                    sampler=sampler, progress=False, granularity=granularity, on_policy=False)
    assert cal.kind == "linear" and cal.granularity == granularity
    double = [p for p in cal.header["targets"] if p.startswith("transformer_blocks.0")]
    assert double, cal.header["targets"]
    assert cal.header["fit"]["rel_error"] < 1.0  # the fit explains part of the trajectories
    labels = torch.arange(2)
    full = sampler(tiny_flux.transformer, labels, num_steps=steps, guidance_scale=2.0, seed=5)
    reuse = CacheConfig(schedule, TaylorForecast(max_order=0), Targets(granularity=granularity), abscissa="step")
    with taylorseer.apply(tiny_flux.transformer, reuse) as handle:
        fora = sampler(tiny_flux.transformer, labels, num_steps=steps, guidance_scale=2.0, seed=5, listener=handle)
    with taylorseer.apply(tiny_flux.transformer, cal.cache_config()) as handle:
        fitted = sampler(tiny_flux.transformer, labels, num_steps=steps, guidance_scale=2.0, seed=5, listener=handle)
        assert sum(handle.stats.module_forecast.values()) > 0
    # the fitted weights forecast closer to full compute than reusing the last full step (FORA)
    assert (fitted - full).pow(2).mean() < (fora - full).pow(2).mean()
