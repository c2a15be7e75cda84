"""Paper presets reproduce the official algorithm's outputs bit for bit (independent oracle, 50 DDIM steps)."""

import pytest
import torch
from diffusers import DDIMScheduler

import taylorseer
from taylorseer import preset
from taylorseer.models.reference import NULL_CLASS, SCHEDULE

from . import official_oracle


def _ddim_loop(model, num_steps, before_step=None, listener=None):
    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=True, set_alpha_to_one=True)
    scheduler.set_timesteps(num_steps)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([3, 7, NULL_CLASS, NULL_CLASS])
    if listener is not None:
        listener.begin(num_steps)
    for i, t in enumerate(scheduler.timesteps):
        if before_step is not None:
            before_step(i)
        ctx = listener.step(i, int(t)) if listener is not None else torch.no_grad()
        with torch.no_grad(), ctx:
            out = model(torch.cat([x, x]), timestep=torch.full((4,), int(t)), class_labels=y).sample
        cond, uncond = out.chunk(2)
        x = scheduler.step(uncond + 1.5 * (cond - uncond), t, x).prev_sample
    return x


@pytest.mark.parametrize(
    "name, overrides, full_steps",
    [("paper_dit", {}, 14), ("fora", {}, 14), ("paper_flux", {}, 10), ("paper_flux", {"max_order": 2}, 10),
     ("paper_wan", {}, 10)],
)
def test_preset_matches_official_oracle_bitwise(tiny_dit, name, overrides, full_steps):
    """paper_flux with O = 2 exercises the history quirk (no differences on step 1 with W = 3)."""
    cfg = preset(name, **overrides)
    num_steps = 50
    cache_dic, current, restore = official_oracle.install(tiny_dit, cfg.warmup_steps, cfg.interval, cfg.max_order)
    current["num_steps"] = num_steps

    def before_step(i):
        current["step"] = num_steps - 1 - i  # the official DiT loop counts steps down
        official_oracle.cal_type(cache_dic, current)

    oracle = _ddim_loop(tiny_dit, num_steps, before_step=before_step)
    restore()
    assert len(current["activated_steps"]) == cfg.full_steps(num_steps) == full_steps
    with taylorseer.apply(tiny_dit, cfg) as handle:
        ours = _ddim_loop(tiny_dit, num_steps, listener=handle)
    full = _ddim_loop(tiny_dit, num_steps)
    assert not torch.equal(ours, full)  # forecasting really happened
    assert torch.equal(ours, oracle)
