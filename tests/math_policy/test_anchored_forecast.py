"""The anchored linear forecaster (issue #23): fitted weights over the cached features and the step's freshly
computed anchor output. Exactness on a synthetic linear relation, the fit recovering it from recorded Grams, JSON
round-trip, the runtime passing the probe's fresh output, refusals."""

import dataclasses

import pytest
import torch
from torch import nn

from taylorseer.calibration.anchor_fit import anchored_indices, fit_anchored
from taylorseer.calibration.fit import FitOptions
from taylorseer.calibration.record import TrajectoryStats
from taylorseer.forecast.anchored import AnchoredLinearForecast, AnchoredLinearForecaster
from taylorseer.forecast.linear import LinearTable, StepWeights


def test_predict_combines_own_cached_fresh_and_cached_anchor_features():
    n = 6
    # step 3: 0.5 * own(2) + 2 * fresh anchor(3) - 1 * anchor(2) + bias 0.25
    sw = StepWeights((2, n + 3, n + 2), torch.tensor([0.5, 2.0, -1.0]), torch.tensor(0.25))
    table = LinearTable({"*": {3: sw}}, num_steps=n, full_steps=(0, 2), grouping="all", history=3)
    f = AnchoredLinearForecaster(table, anchor="b.0")
    own = f.update(f.update(f.empty(), torch.full((1, 2, 3), 1.0), 0.0), torch.full((1, 2, 3), 4.0), 2.0)
    anchor_state = f.update(f.empty(), torch.full((1, 2, 3), 7.0), 2.0)
    f.observe_anchor("b.0", 3.0, [torch.full((1, 2, 3), 10.0)], (anchor_state,))
    out = f.predict(own, 3.0, target="b.5")
    assert torch.allclose(out, torch.full((1, 2, 3), 0.5 * 4 + 2 * 10 - 7 + 0.25))
    assert torch.equal(f.predict(anchor_state, 3.0, target="b.0"), torch.full((1, 2, 3), 10.0))  # the anchor itself


def test_refusals_name_what_is_missing():
    n = 4
    table = LinearTable({"*": {1: StepWeights((0, n + 1), torch.tensor([1.0, 1.0]))}}, num_steps=n,
                        full_steps=(0,), grouping="all", history=2)
    f = AnchoredLinearForecaster(table, anchor="b.0")
    s = f.update(f.empty(), torch.ones(1, 2, 3), 0.0)
    with pytest.raises(ValueError, match="step 1.0 has no computed output of the anchor 'b.0'"):
        f.predict(s, 1.0, target="b.1")
    f.observe_anchor("b.0", 1.0, [torch.ones(1, 4, 3)], None)
    with pytest.raises(ValueError, match="exactly one must have that shape"):
        f.predict(s, 1.0, target="b.1")  # no anchor tensor of the target's shape
    f.observe_anchor("b.0", 2.0, [torch.ones(1, 2, 3)], None)
    with pytest.raises(ValueError, match="no weights for target 'b.1'.*step 2.0"):
        f.predict(s, 2.0, target="b.1")
    with pytest.raises(ValueError, match="AnchoredLinearForecast.calibration"):
        AnchoredLinearForecast("")
    stats = TrajectoryStats(4, "all")
    with pytest.raises(ValueError, match="stats.anchor is None"):
        fit_anchored(stats, (0, 2))
    with pytest.raises(ValueError, match="anchor_features are needed exactly when"):
        stats.add("b.1", torch.ones(4, 1, 2, 3), torch.ones(4, 1, 2, 3))


def test_anchored_indices():
    assert anchored_indices((0, 1, 5), 7, 10, history=2, anchor_history=1) == (5, 1, 17, 15)
    assert anchored_indices((0, 1, 5), 3, 10, history=3, anchor_history=0) == (1, 0, 13)


def test_fit_recovers_an_exact_linear_relation_that_the_cached_features_cannot():
    """Target(s) = 3 * anchor(s) - anchor(0) + 0.5 * target(0), with anchor(s) random per step: the anchored fit is
    exact (fit error ~0); the plain fit from cached features alone is not."""
    torch.manual_seed(0)
    n, rows, tokens, channels = 5, 2, 16, 3
    anchor = torch.randn(n, rows, tokens, channels)
    target = torch.empty_like(anchor)
    target[0] = torch.randn(rows, tokens, channels)
    for s in range(1, n):
        target[s] = 3 * anchor[s] - anchor[0] + 0.5 * target[0]
    stats = TrajectoryStats(n, "target", anchor="b.0")
    stats.add("b.1", target, anchor)
    options = FitOptions(history=1, match_variance=False, ridge=0.0)
    table, error = fit_anchored(stats, (0,), options, anchor_history=1)
    assert error["rel_error"] < 1e-6
    sw = table.steps["b.1"][3]
    assert sw.anchors == (0, n + 3, n + 0)
    assert torch.allclose(sw.weights[:, 0, :], torch.tensor([[0.5] * 3, [3.0] * 3, [-1.0] * 3]), atol=1e-5)
    # the runtime forecast with the fitted table reproduces step 3 exactly
    f = AnchoredLinearForecaster(table, anchor="b.0")
    own = f.update(f.empty(), target[0], 0.0)
    f.observe_anchor("b.0", 3.0, [anchor[3]], (f.update(f.empty(), anchor[0], 0.0),))
    assert torch.allclose(f.predict(own, 3.0, target="b.1"), target[3], atol=1e-4)
    from taylorseer.calibration.fit import fit_linear

    plain = TrajectoryStats(n, "target")
    plain.add("b.1", target)
    assert fit_linear(plain, (0,), options)[1]["rel_error"] > 0.3


class Chain(nn.Module):
    """Two residual blocks: block 1's update is 2x block 0's (an exact anchored relation at every step)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Scale(1.0), Scale(2.0, follows=True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks[0](x)
        return self.blocks[1](h, x)


class Scale(nn.Module):
    def __init__(self, k: float, follows: bool = False):
        super().__init__()
        self.k, self.follows = k, follows

    def forward(self, hidden_states: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        src = hidden_states if x is None else x
        return hidden_states + self.k * torch.sin(src)


def test_runtime_passes_the_probe_output_and_json_round_trips(tmp_path):
    """On a model whose block 1 adds exactly 2x what block 0 adds, an anchored calibration forecasts block 1 from
    block 0's fresh output: the hybrid run equals full compute; the config round-trips through JSON."""
    import taylorseer
    from taylorseer.calibration.anchor_fit import anchored_config
    from taylorseer.calibration.io import new_header, save_calibration
    from taylorseer.parts import CacheConfig, Targets
    from taylorseer.policy.schedule import FixedSchedule

    model = Chain()
    n = 5
    # weights: block 1's residual at a forecast step = 2 * block 0's fresh residual (index n + s)
    steps = {s: StepWeights((0, n + s), torch.tensor([0.0, 2.0])) for s in range(1, n)}
    table = LinearTable({"blocks.1": steps}, num_steps=n, full_steps=(0,), grouping="target", history=2)
    header = new_header("linear", "chain", model, FixedSchedule((0,), n), granularity="block",
                        forecaster={"anchor": "blocks.0"}, targets={"blocks.1": "blocks.1"})
    cal = save_calibration(tmp_path / "chain.safetensors", header, table)
    cfg = anchored_config(cal.path)
    assert CacheConfig.from_json(cfg.to_json()) == cfg
    cfg = dataclasses.replace(cfg, targets=Targets("block", ("blocks.*",)))  # no adapter for this toy model
    assert CacheConfig.from_json(cfg.to_json()) == cfg
    assert cfg.forecaster == AnchoredLinearForecast(cal.path, cal.sha256)
    xs = [torch.randn(2, 3) for _ in range(n)]
    full = [model(x) for x in xs]
    plain = CacheConfig(FixedSchedule((0,), n), taylorseer.forecast.TaylorForecast(max_order=0),
                        cfg.targets, abscissa="step")
    outs, reused = [], []
    for config, sink in ((cfg, outs), (plain, reused)):
        with taylorseer.apply(model, config) as handle:
            handle.begin(n)
            for i, x in enumerate(xs):
                with handle.step(i):
                    sink.append(model(x))
    for got, want in zip(outs, full):
        assert torch.allclose(got, want, atol=1e-6)
    assert not all(torch.allclose(got, want, atol=1e-3) for got, want in zip(reused, full))  # reuse is not exact


def test_an_anchored_file_runs_only_as_the_hybrid(tmp_path):
    """An anchored file's own config is the hybrid (its cache_config(), so bench --calibration and generate
    --calibration run it as made); read as a plain LinearForecast it is refused by name (its weights would be
    misread); its config is readable from JSON in a fresh process (the forecaster is registered on import)."""
    import subprocess
    import sys

    from taylorseer.calibration.anchor_fit import anchored_config
    from taylorseer.calibration.io import load_calibration, new_header, save_calibration
    from taylorseer.forecast import CalibrationError, LinearForecast, build_forecaster
    from taylorseer.policy import AnchorSchedule
    from taylorseer.policy.schedule import FixedSchedule

    model, n = Chain(), 5
    steps = {s: StepWeights((0, n + s), torch.tensor([0.0, 2.0])) for s in (1, 2, 4)}
    table = LinearTable({"blocks.1": steps}, num_steps=n, full_steps=(0, 3), grouping="target", history=2)
    header = new_header("linear", "chain", model, FixedSchedule((0, 3), n), granularity="block",
                        forecaster={"anchor": "blocks.0"}, targets={"blocks.1": "blocks.1"})
    cal = save_calibration(tmp_path / "chain.safetensors", header, table)
    cfg = load_calibration(cal.path).cache_config()
    assert cfg.policy == AnchorSchedule((0, 3), n, 1)
    assert cfg.forecaster == AnchoredLinearForecast(str(cal.path), cal.sha256)
    assert cfg == anchored_config(cal.path)
    with pytest.raises(CalibrationError, match="anchored weights.*blocks.0"):
        build_forecaster(LinearForecast(str(cal.path), cal.sha256))
    code = ("import sys; from taylorseer.parts import CacheConfig; "
            "print(CacheConfig.from_json(sys.stdin.read()).forecaster.calibration)")
    out = subprocess.run([sys.executable, "-c", code], input=cfg.to_json(), capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == str(cal.path)
