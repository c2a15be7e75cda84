"""The config vocabulary below the API (issue 21): the ground-floor config counts its full steps without the
policy layer, the runtime takes a CacheConfig only, and the calibration file's record is one reader."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taylorseer
from taylorseer.config import TaylorSeerConfig
from taylorseer.parts import CacheConfig, parts_of
from taylorseer.policy.interval import IntervalPolicy


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 12), st.integers(0, 8), st.integers(0, 8), st.integers(1, 80))
def test_full_steps_counts_the_interval_policys_plan(interval, warmup, tail, num_steps):
    # Two implementations: config.py's closed form (the ground floor imports no policy) and the policy's loop.
    config = TaylorSeerConfig(interval=interval, warmup_steps=warmup, tail_steps=tail)
    assert config.full_steps(num_steps) == sum(IntervalPolicy(interval, warmup, tail).plan(num_steps))
    assert config.full_steps(num_steps) == parts_of(config).full_steps(num_steps)


def test_full_steps_by_hand():
    assert TaylorSeerConfig(interval=4, warmup_steps=2).full_steps(10) == 4  # FFfffFfffF
    assert TaylorSeerConfig(interval=5, warmup_steps=3, tail_steps=4).full_steps(6) == 6  # all forced
    with pytest.raises(ValueError, match="num_steps"):
        TaylorSeerConfig().full_steps(0)


def test_the_runtime_takes_a_cache_config_and_apply_converts_once():
    from taylorseer.runtime.handle import CacheHandle

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="CacheHandle takes a CacheConfig"):
        CacheHandle(model, TaylorSeerConfig(modules=("0",)), [])  # type: ignore[arg-type]
    given = TaylorSeerConfig(interval=3, modules=("0",))
    with taylorseer.apply(model, given) as handle:
        assert handle.config is given  # what the user gave, shown by repr
        assert isinstance(handle.parts, CacheConfig) and handle.parts == parts_of(given)  # what runs
        assert handle.engine.parts is handle.parts


def test_cache_config_reads_every_part_through_one_serialiser():
    cfg = parts_of(TaylorSeerConfig(interval=3, modules=("blocks.*.attn",), factor_dtype="float16"))
    data = cfg.to_dict()
    assert data["policy"] == {"type": "IntervalSchedule", "interval": 3, "warmup_steps": 2, "tail_steps": 0}
    assert data["targets"] == {"granularity": "module", "modules": ["blocks.*.attn"], "block_shortcuts": True}
    assert CacheConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match=r"Targets.from_dict: unknown keys \['granularty'\]"):
        CacheConfig.from_dict({**data, "targets": {"granularty": "block"}})
    with pytest.raises(ValueError, match=r"TaylorForecast.from_dict: unknown keys \['order'\]"):
        CacheConfig.from_dict({**data, "forecaster": {"type": "TaylorForecast", "order": 2}})
    with pytest.raises(ValueError, match=r"missing \['forecaster'\]"):
        CacheConfig.from_dict({"policy": data["policy"]})
    with pytest.raises(ValueError, match="not valid JSON"):
        CacheConfig.from_json('{"policy": ')


def test_one_naming_rule_for_part_configs_and_the_objects_built_from_them():
    # docs/design.md "Parts": a forecaster config <X>Forecast builds an <X>Forecaster; a policy config <C> builds
    # a <C>Policy. Builders that are functions (a forecaster that reads a file) name their return type.
    import typing

    from taylorseer.forecast import base as forecast_base
    from taylorseer.policy import base as policy_base

    def built_name(builder):
        if isinstance(builder, type):
            return builder.__name__
        return str(typing.get_type_hints(builder).get("return", type(None)).__name__)

    ours = lambda registry: {c: b for c, b in registry.items() if c.__module__.startswith("taylorseer.")}  # noqa: E731
    forecasters = ours(forecast_base._FORECASTERS)  # the package's parts (a test or user may register others)
    policies = ours(policy_base._POLICIES)
    assert len(forecasters) >= 6 and len(policies) >= 6
    for config, builder in forecasters.items():
        assert config.__name__.endswith("Forecast") and built_name(builder) == config.__name__ + "er", config
    for config, builder in policies.items():
        assert built_name(builder) == config.__name__ + "Policy", config
