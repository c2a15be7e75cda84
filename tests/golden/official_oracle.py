"""An independent oracle written in the official code's style (dict caches, steps counting DOWN, a counter
schedule, `derivative_approximation` / `taylor_formula` arithmetic), used only by tests to check that our
paper presets reproduce the reference outputs. Written from ../shared/ALGORITHM.md and the published algorithm,
not imported from taylorseer."""

import math


def cal_type(cache_dic, current):
    first_steps = current["step"] > current["num_steps"] - cache_dic["first_enhance"] - 1
    if first_steps or cache_dic["cache_counter"] == cache_dic["fresh_threshold"] - 1:
        current["type"] = "full"
        cache_dic["cache_counter"] = 0
        current["activated_steps"].append(current["step"])
    else:
        cache_dic["cache_counter"] += 1
        current["type"] = "Taylor"


def derivative_approximation(cache_dic, current, feature):
    difference_distance = current["activated_steps"][-1] - current["activated_steps"][-2] \
        if len(current["activated_steps"]) > 1 else None
    updated = {0: feature}
    old = cache_dic["cache"].get(current["module"], {})
    for i in range(cache_dic["max_order"]):
        # DiT's condition: steps count down, derivatives only once step < num_steps - first_enhance + 1
        if old.get(i) is not None and current["step"] < current["num_steps"] - cache_dic["first_enhance"] + 1:
            updated[i + 1] = (updated[i] - old[i]) / difference_distance
        else:
            break
    cache_dic["cache"][current["module"]] = updated


def taylor_formula(derivative_dict, distance):
    output = 0
    for i in range(len(derivative_dict)):
        output += (1 / math.factorial(i)) * derivative_dict[i] * (distance**i)
    return output


def install(model, first_enhance, fresh_threshold, max_order):
    """Wrap every block's attn1 and ff; returns (cache_dic, current, restore)."""
    cache_dic = {"cache": {}, "first_enhance": first_enhance, "fresh_threshold": fresh_threshold,
                 "max_order": max_order, "cache_counter": 0}
    current = {"activated_steps": [], "step": None, "num_steps": None, "type": None}
    saved = []
    for layer, block in enumerate(model.transformer_blocks):
        for name in ("attn1", "ff"):
            module = getattr(block, name)
            original = module.forward

            def forward(*args, _orig=original, _key=(layer, name), **kwargs):
                current["module"] = _key
                if current["type"] == "full":
                    feature = _orig(*args, **kwargs)
                    derivative_approximation(cache_dic, current, feature)
                    return feature
                distance = current["step"] - current["activated_steps"][-1]
                return taylor_formula(cache_dic["cache"][_key], distance)

            module.forward = forward
            saved.append(module)

    def restore():
        for module in saved:
            del module.forward

    return cache_dic, current, restore
