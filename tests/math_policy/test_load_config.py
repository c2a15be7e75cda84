"""parts.load_config: the one reader behind every command's --config JSON|FILE|NAME."""

import json

import pytest

from taylorseer import TaylorSeerConfig, preset
from taylorseer.forecast import TaylorForecast
from taylorseer.parts import CacheConfig, load_config, parts_of
from taylorseer.policy import IntervalSchedule


def test_a_preset_name_gives_the_presets_parts():
    cfg = load_config("paper_dit")
    assert cfg.policy == IntervalSchedule(interval=4, warmup_steps=2, tail_steps=0)
    assert cfg.forecaster.max_order == 4 and cfg.name == "paper_dit"


def test_json_text_file_and_dict_give_the_same_config(tmp_path):
    cfg = CacheConfig(IntervalSchedule(interval=5), TaylorForecast(max_order=1), name="mine")
    path = tmp_path / "cfg.json"
    path.write_text(cfg.to_json())
    assert load_config(cfg.to_json()) == cfg
    assert load_config(str(path)) == cfg
    assert load_config(path) == cfg
    assert load_config(json.loads(cfg.to_json())) == cfg


def test_taylorseer_fields_are_read_as_a_taylorseer_config():
    assert load_config('{"interval": 3, "max_order": 1}') == parts_of(TaylorSeerConfig(interval=3, max_order=1))
    assert load_config(preset("fora")) == parts_of(preset("fora"))


@pytest.mark.parametrize("spec, words", [("no_such_preset", "preset name"), ("{bad", "not valid JSON"),
                                         ('{"interval": 0}', "interval"), ('{"colour": 1}', "colour")])
def test_bad_specs_are_refused_by_name(spec, words):
    with pytest.raises((ValueError, TypeError), match=words):
        load_config(spec)
