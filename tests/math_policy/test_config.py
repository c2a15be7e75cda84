"""Config validation and JSON round-trip."""

import dataclasses

import pytest

from taylorseer import PRESET_NAMES, TaylorSeerConfig, preset


def test_json_round_trip_all_presets_and_custom():
    configs = [preset(n) for n in PRESET_NAMES] + [
        TaylorSeerConfig(interval=3, max_order=3, modules=("blocks.*.attn", "blocks.*.mlp"), factor_dtype="bfloat16",
                         abscissa="timestep", granularity="block", tail_steps=2)
    ]
    for cfg in configs:
        back = TaylorSeerConfig.from_json(cfg.to_json())
        assert back == cfg and back.name == cfg.name and back.modules == cfg.modules


@pytest.mark.parametrize(
    "field, value, exc",
    [("interval", 0, ValueError), ("interval", 2.5, TypeError), ("max_order", -1, ValueError),
     ("warmup_steps", -1, ValueError), ("scheme", "newton", ValueError), ("abscissa", "time", ValueError),
     ("granularity", "layer", ValueError), ("factor_dtype", "int8", ValueError), ("modules", "blocks.*", TypeError),
     ("tail_steps", True, TypeError)],
)
def test_invalid_values_name_the_field_and_allowed_values(field, value, exc):
    with pytest.raises(exc, match=field) as info:
        TaylorSeerConfig(**{field: value})
    if field in ("scheme", "abscissa", "granularity"):
        assert "one of" in str(info.value)


def test_unknown_key_rejected():
    with pytest.raises(ValueError, match="unknown TaylorSeerConfig field.*intervall"):
        TaylorSeerConfig.from_dict({"intervall": 3})


def test_unknown_preset():
    with pytest.raises(ValueError, match="paper_dit"):
        preset("paper_sd3")


def test_presets_match_algorithm_table():
    def wno(name):
        cfg = preset(name)
        return cfg.warmup_steps, cfg.interval, cfg.max_order

    assert wno("paper_dit") == (2, 4, 4) and wno("paper_flux") == (3, 6, 1)
    assert wno("paper_hunyuan_video") == (1, 5, 1) and wno("paper_wan") == (1, 5, 1)
    assert preset("paper_dit").scheme == "reference"


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TaylorSeerConfig().interval = 3
