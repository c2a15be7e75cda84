"""Adaptive and explicit policies as literal compute/forecast patterns on hand-written observation sequences.

Every expected pattern below is written out by hand from the policy's rule (F = full, f = forecast); the comment
above each one walks through the steps. Observation values are dyadic (0.125, 0.25, ...) where they are summed,
so that float sums are exact and the equality cases (``== threshold`` / ``== budget``) are real equalities.
"""

import json
import math
import re

import pytest

from taylorseer.policy import (
    ConfidenceGate,
    Decision,
    ErrorBudget,
    FixedSchedule,
    IntervalSchedule,
    Observation,
    Policy,
    StepInfo,
    build_policy,
    registered_policies,
)

#################################################################################
#                 A minimal stand-in for the runtime (test driver)               #
#################################################################################


def run(policy, values, num_steps="len", forced=(), key="forecast_error", told_steps=True):
    """Drive ``policy`` through one generation the way the runtime does.

    ``values[i]``: the observed value at step ``i`` if the policy probes there (None: the test expects no probe
    at step ``i``). ``forced``: steps the runtime computes in full whatever was decided (it still resolves a probe
    when a value is given). Returns the pattern string and the list of decision reasons.
    """
    n = len(values) if num_steps == "len" else num_steps
    policy.begin(n)
    pattern, reasons = [], []
    for index, value in enumerate(values):
        info = StepInfo(index, n if told_steps else None, float(index), "cond")
        decision = policy.decide(info)
        reasons.append(decision.reason)
        computed = decision.compute
        if decision.probe:
            if value is None:
                assert index in forced, f"unexpected probe at step {index}"
            else:
                other = 0.0
                observation = Observation(value, other) if key == "forecast_error" else Observation(other, value)
                computed = policy.resolve(info, observation)
        else:
            assert value is None, f"expected a probe at step {index}, got {decision}"
        if index in forced:
            computed = True
        policy.notify(info, computed)
        pattern.append("F" if computed else "f")
    return "".join(pattern), reasons


def gate(**kwargs):
    return build_policy(ConfidenceGate(**kwargs))


def budget(**kwargs):
    return build_policy(ErrorBudget(**kwargs))


#################################################################################
#                                 ConfidenceGate                                 #
#################################################################################


def test_gate_compares_each_probe_error_with_the_threshold():
    # threshold 0.1, warm-up 2: steps 0, 1 full; then full iff error > 0.1 (0.1 itself is not > 0.1).
    #   step:   0     1     2     3    4     5     6    7    8     9
    #   error:  -     -     0.05  0.2  0.01  0.02  0.3  0.1  0.09  0.5
    #   ->      F     F     f     F    f     f     F    f    f     F
    errors = [None, None, 0.05, 0.2, 0.01, 0.02, 0.3, 0.1, 0.09, 0.5]
    pattern, reasons = run(gate(threshold=0.1, warmup_steps=2), errors)
    assert pattern == "FFfFffFffF"
    assert reasons == ["warmup", "warmup"] + ["gate"] * 8


def test_gate_cap_computes_without_probing_after_max_forecast_forecasts():
    # threshold 1.0 never triggers on errors of 0; max_forecast 3: after 3 forecasts the 4th step is full ("cap").
    errors = [None, 0.0, 0.0, 0.0, None, 0.0, 0.0, 0.0, None, 0.0]
    pattern, reasons = run(gate(threshold=1.0, warmup_steps=1, max_forecast=3), errors)
    assert pattern == "FfffFfffFf"
    assert reasons == ["warmup", "gate", "gate", "gate", "cap", "gate", "gate", "gate", "cap", "gate"]


def test_gate_full_step_restarts_the_cap_count():
    # max_forecast 2; the gate fires at step 2 (0.5 > 0.1), so the cap counts from step 3: cap at step 5.
    errors = [None, 0.0, 0.5, 0.0, 0.0, None, 0.0, 0.0]
    pattern, reasons = run(gate(threshold=0.1, warmup_steps=1, max_forecast=2), errors)
    assert pattern == "FfFffFff"
    assert reasons[5] == "cap"


def test_gate_tail_steps_are_full_without_probing():
    errors = [None, None, 0.0, 0.0, 0.0, 0.0, None, None]
    pattern, reasons = run(gate(threshold=0.1, warmup_steps=2, tail_steps=2), errors)
    assert pattern == "FFffffFF"
    assert reasons == ["warmup", "warmup", "gate", "gate", "gate", "gate", "tail", "tail"]


def test_gate_tail_needs_num_steps():
    policy = gate(tail_steps=1)
    with pytest.raises(ValueError, match=r"tail_steps=1 needs num_steps"):
        policy.begin(None)


def test_gate_without_num_steps_runs_when_no_tail():
    errors = [None, 0.0, 0.2, 0.0]
    pattern, _ = run(gate(threshold=0.1, warmup_steps=1), errors, num_steps=None, told_steps=False)
    assert pattern == "FfFf"


def test_gate_forced_full_via_notify_resets_the_cap_count():
    # max_forecast 3; the runtime forces step 2 to full (e.g. no factors), without a probe value.
    # Reset by notify: forecasts at 3, 4, 5, cap at 6. (Without the reset the cap would fall at step 4.)
    errors = [None, 0.0, None, 0.0, 0.0, 0.0, None, 0.0, 0.0]
    pattern, reasons = run(gate(threshold=1.0, warmup_steps=1, max_forecast=3), errors, forced={2})
    assert pattern == "FfFfffFff"
    assert reasons[2] == "gate" and reasons[6] == "cap"


def test_gate_without_warmup_probes_step_zero_and_runtime_forces_it():
    errors = [None, 0.0, 0.0]
    pattern, reasons = run(gate(threshold=0.1, warmup_steps=0), errors, forced={0})
    assert pattern == "Fff"
    assert reasons == ["gate", "gate", "gate"]


def test_gate_nan_and_inf_errors_compute_in_full():
    errors = [None, math.nan, 0.0, math.inf, 0.0]
    pattern, _ = run(gate(threshold=0.1, warmup_steps=1), errors)
    assert pattern == "FFfFf"


def test_gate_begin_resets_state_between_generations():
    # No warm-up, max_forecast 2: the first generation ends two forecasts into the cap window (steps 1, 2).
    # Carried over, step 0 of the second would be "cap"; after begin() it is probed ("gate") like the first time.
    policy = gate(threshold=0.1, warmup_steps=0, max_forecast=2)
    errors = [None, 0.0, 0.0]
    first = run(policy, errors, forced={0})
    second = run(policy, errors, forced={0})
    assert first == second == ("Fff", ["gate", "gate", "gate"])
    assert policy.since_full == 2


def test_gate_is_deterministic_and_ignores_point_and_branch():
    config = ConfidenceGate(threshold=0.1, warmup_steps=1)
    errors = [0.05, 0.2, 0.01, 0.3, 0.0]
    decisions = []
    for point_scale, branch in ((1.0, "cond"), (-7.5, "uncond")):
        policy = build_policy(config)
        policy.begin(5)
        out = []
        for index, error in enumerate(errors):
            info = StepInfo(index, 5, point_scale * index, branch)
            decision = policy.decide(info)
            full = decision.compute or policy.resolve(info, Observation(error, 0.0))
            policy.notify(info, full)
            out.append(full)
        decisions.append(out)
    assert decisions[0] == decisions[1] == [True, True, False, True, False]


def test_gate_probe_blocks_and_plan():
    policy = gate(probe_blocks=3)
    assert policy.probe_blocks == 3
    assert policy.plan(10) is None  # adaptive: no static plan


#################################################################################
#                                   ErrorBudget                                  #
#################################################################################


def test_budget_accumulates_changes_since_the_last_full_step():
    # budget 0.5, warm-up 2. A = accumulated change of forecast steps; full iff A + change > 0.5, then A = 0.
    #   step:    0  1  2      3      4      5      6      7      8      9      10
    #   change:  -  -  0.125  0.125  0.25   0.125  0.5    0.0    0.25   0.25   0.0625
    #   A+c:           0.125  0.25   0.5    0.625  0.5    0.5    0.75   0.25   0.3125
    #   ->       F  F  f      f      f      F      f      f      F      f      f
    # Step 4 (A + c == 0.5) is forecast; step 6 starts from 0 (step 5's triggering change is not carried).
    changes = [None, None, 0.125, 0.125, 0.25, 0.125, 0.5, 0.0, 0.25, 0.25, 0.0625]
    pattern, reasons = run(budget(budget=0.5, warmup_steps=2), changes, key="change")
    assert pattern == "FFfffFffFff"
    assert reasons == ["warmup", "warmup"] + ["budget"] * 9


def test_budget_accumulator_value_after_each_step():
    policy = budget(budget=0.5, warmup_steps=1)
    policy.begin(5)
    seen = []
    for index, change in enumerate([None, 0.25, 0.125, 0.25, 0.0625]):
        info = StepInfo(index, 5, float(index))
        decision = policy.decide(info)
        full = decision.compute or policy.resolve(info, Observation(0.0, change))
        policy.notify(info, full)
        seen.append(policy.accumulated)
    assert seen == [0.0, 0.25, 0.375, 0.0, 0.0625]


def test_budget_cap_resets_the_accumulator():
    # max_forecast 2: step 3 is full by cap; A restarts at 0, so step 4 (0.25) and step 5 (0.5) are forecast.
    # (Without the reset, step 4 would see 0.5 + 0.25 > 0.5 and compute.)
    changes = [None, 0.25, 0.25, None, 0.25, 0.25]
    pattern, reasons = run(budget(budget=0.5, warmup_steps=1, max_forecast=2), changes, key="change")
    assert pattern == "FffFff"
    assert reasons == ["warmup", "budget", "budget", "cap", "budget", "budget"]


def test_budget_forced_full_via_notify_resets_the_accumulator():
    # Step 2: resolve sees 0.25 + 0.25 = 0.5 (not > 0.5: forecast), but the runtime computes it in full anyway.
    # notify(True) resets A, so steps 3 (0.25) and 4 (0.5) are forecast and step 5 (0.75) is full.
    changes = [None, 0.25, 0.25, 0.25, 0.25, 0.25]
    pattern, _ = run(budget(budget=0.5, warmup_steps=1), changes, key="change", forced={2})
    assert pattern == "FfFffF"


def test_budget_unprobed_forecast_adds_nothing():
    # Step 1's change 0.75 triggers a full step (A = 0); step 2 is forecast without a probe: A stays 0.
    policy = budget(budget=0.5, warmup_steps=1)
    policy.begin(4)
    for index, change in ((0, None), (1, 0.75)):
        info = StepInfo(index, 4, float(index))
        decision = policy.decide(info)
        policy.notify(info, decision.compute or policy.resolve(info, Observation(0.0, change)))
    assert policy.accumulated == 0.0
    info = StepInfo(2, 4, 2.0)
    assert policy.decide(info).probe
    policy.notify(info, False)  # forecast without a probe
    assert policy.accumulated == 0.0
    assert policy.since_full == 1


def test_budget_tail_and_warmup_are_not_probed():
    changes = [None, 0.0, 0.0, 0.0, None]
    pattern, reasons = run(budget(budget=0.1, warmup_steps=1, tail_steps=1), changes, key="change")
    assert pattern == "FfffF"
    assert reasons == ["warmup", "budget", "budget", "budget", "tail"]


def test_budget_infinite_or_nan_change_computes():
    # Without warm-up the first probe has no previous step: change = inf -> full.
    changes = [math.inf, 0.0, math.nan, 0.0]
    pattern, _ = run(budget(budget=0.5, warmup_steps=0), changes, key="change")
    assert pattern == "FfFf"


def test_budget_begin_resets_between_generations():
    # The first generation ends with A = 0.5 (0.25 + 0.25, both forecast); begin() starts the second from 0.
    # (A warm-up step would reset A anyway, so this generation has none: with A carried over, step 0's
    # 0.25 would give 0.75 > 0.5 and compute.)
    policy = budget(budget=0.5, warmup_steps=0)
    changes = [0.25, 0.25]
    first = run(policy, changes, key="change")
    assert policy.accumulated == 0.5
    second = run(policy, changes, key="change")
    assert first == second == ("ff", ["budget", "budget"])
    policy.begin(3)
    assert (policy.accumulated, policy.since_full) == (0.0, 0)


#################################################################################
#                      Call-order contract of probing policies                    #
#################################################################################


@pytest.mark.parametrize("make", [gate, budget])
def test_decide_before_begin_is_an_error(make):
    with pytest.raises(RuntimeError, match=r"call begin\(num_steps\)"):
        make().decide(StepInfo(0, 5, 0.0))


@pytest.mark.parametrize("make", [gate, budget])
def test_steps_out_of_order_are_an_error(make):
    policy = make()
    policy.begin(5)
    with pytest.raises(ValueError, match="expected step 0, got step 2"):
        policy.decide(StepInfo(2, 5, 2.0))


@pytest.mark.parametrize("make", [gate, budget])
def test_decide_twice_without_notify_is_an_error(make):
    policy = make(warmup_steps=1)
    policy.begin(5)
    policy.decide(StepInfo(0, 5, 0.0))
    with pytest.raises(RuntimeError, match="decided but not notified"):
        policy.decide(StepInfo(1, 5, 1.0))


@pytest.mark.parametrize("make", [gate, budget])
def test_resolve_of_a_full_decision_is_an_error(make):
    policy = make(warmup_steps=1)
    policy.begin(5)
    info = StepInfo(0, 5, 0.0)
    policy.decide(info)
    with pytest.raises(RuntimeError, match="decided without a probe"):
        policy.resolve(info, Observation(0.0, 0.0))


@pytest.mark.parametrize("make", [gate, budget])
def test_resolve_twice_is_an_error(make):
    policy = make(warmup_steps=0)
    policy.begin(5)
    info = StepInfo(0, 5, 0.0)
    policy.decide(info)
    policy.resolve(info, Observation(0.0, 0.0))
    with pytest.raises(RuntimeError, match="already resolved"):
        policy.resolve(info, Observation(0.0, 0.0))


@pytest.mark.parametrize("make", [gate, budget])
def test_step_past_num_steps_or_other_num_steps_is_an_error(make):
    policy = make(warmup_steps=1)
    policy.begin(1)
    policy.decide(StepInfo(0, 1, 0.0))
    policy.notify(StepInfo(0, 1, 0.0), True)
    with pytest.raises(ValueError, match="past the generation's 1 steps"):
        policy.decide(StepInfo(1, None, 1.0))
    policy.begin(4)
    with pytest.raises(ValueError, match="num_steps=5 but begin"):
        policy.decide(StepInfo(0, 5, 0.0))


@pytest.mark.parametrize("make, field", [(gate, "forecast_error"), (budget, "change")])
def test_negative_observation_is_an_error(make, field):
    policy = make(warmup_steps=0)
    policy.begin(3)
    info = StepInfo(0, 3, 0.0)
    policy.decide(info)
    values = {"forecast_error": 0.0, "change": 0.0, field: -0.5}
    with pytest.raises(ValueError, match=f"Observation.{field} must be a float >= 0"):
        policy.resolve(info, Observation(**values))


#################################################################################
#                                 FixedSchedule                                  #
#################################################################################


def test_fixed_schedule_from_pattern_and_back():
    schedule = FixedSchedule.from_pattern("FFfffFfffF", name="dit-n4")
    assert schedule.full_steps == (0, 1, 5, 9)
    assert schedule.num_steps == 10
    assert schedule.name == "dit-n4"
    assert schedule.pattern() == "FFfffFfffF"
    assert schedule.plan(10) == [True, True, False, False, False, True, False, False, False, True]


def test_fixed_schedule_policy_decisions():
    policy = build_policy(FixedSchedule((0, 2, 3, 6), num_steps=7))
    policy.begin(7)
    decisions = [policy.decide(StepInfo(i, 7, float(i))) for i in range(7)]
    assert "".join("F" if d.compute else "f" for d in decisions) == "FfFFffF"
    assert all(not d.probe and d.reason == "schedule" for d in decisions)
    assert policy.plan(7) == [True, False, True, True, False, False, True]
    assert policy.probe_blocks == 0


def test_fixed_schedule_forced_full_does_not_move_later_steps():
    policy = build_policy(FixedSchedule.from_pattern("FffFf"))
    policy.begin(5)
    out = []
    for index in range(5):
        info = StepInfo(index, 5, float(index))
        out.append(policy.decide(info).compute)
        policy.notify(info, True)  # the runtime computes everything
    assert out == [True, False, False, True, False]


def test_fixed_schedule_refuses_another_num_steps():
    policy = build_policy(FixedSchedule.from_pattern("FFfffFfffF"))
    with pytest.raises(ValueError, match=r"schedule for 10 steps, but the generation has num_steps=12"):
        policy.begin(12)
    with pytest.raises(ValueError, match=r"schedule for 10 steps and needs the generation's num_steps"):
        policy.begin(None)
    with pytest.raises(ValueError, match=r"schedule for 10 steps, but the generation has num_steps=9"):
        FixedSchedule.from_pattern("FFfffFfffF").plan(9)
    policy.begin(10)
    with pytest.raises(ValueError, match=r"schedule for 10 steps, but the generation has num_steps=11"):
        policy.decide(StepInfo(0, 11, 0.0))
    with pytest.raises(ValueError, match=r"step 10 is outside the schedule's 10 steps"):
        policy.decide(StepInfo(10, None, 10.0))


def test_fixed_schedule_name_appears_in_mismatch_message():
    with pytest.raises(ValueError, match=r"FixedSchedule 'searched' is a schedule for 3 steps.*num_steps=4"):
        build_policy(FixedSchedule((0,), 3, name="searched")).begin(4)


def test_fixed_schedule_decide_before_begin():
    with pytest.raises(RuntimeError, match=r"call begin\(num_steps\)"):
        build_policy(FixedSchedule((0,), 3)).decide(StepInfo(0, 3, 0.0))


def test_fixed_schedule_dict_round_trip_through_json():
    schedule = FixedSchedule((0, 1, 5, 9), 10, "dit-n4")
    data = schedule.to_dict()
    assert data == {"full_steps": [0, 1, 5, 9], "num_steps": 10, "name": "dit-n4"}
    back = FixedSchedule.from_dict(json.loads(json.dumps(data)))
    assert back == schedule
    assert back.full_steps == (0, 1, 5, 9) and isinstance(back.full_steps, tuple)
    assert FixedSchedule.from_dict({"full_steps": [0, 2], "num_steps": 3}) == FixedSchedule((0, 2), 3, "")


def test_fixed_schedule_from_dict_rejects_unknown_and_missing_keys():
    with pytest.raises(ValueError, match=r"unknown keys \['steps'\]"):
        FixedSchedule.from_dict({"full_steps": [0], "num_steps": 2, "steps": 2})
    with pytest.raises(ValueError, match=r"missing keys \['num_steps'\]"):
        FixedSchedule.from_dict({"full_steps": [0]})
    with pytest.raises(TypeError, match="needs a dict"):
        FixedSchedule.from_dict([0, 1])


def test_fixed_schedule_list_is_stored_as_tuple():
    schedule = FixedSchedule([0, 2], 4)
    assert schedule.full_steps == (0, 2)
    assert hash(schedule) == hash(FixedSchedule((0, 2), 4))


@pytest.mark.parametrize(
    "full_steps, num_steps, message",
    [
        ((1, 3), 5, "FixedSchedule.full_steps must start with step 0 (the first step is always full), got (1, 3)"),
        ((), 5, "FixedSchedule.full_steps must start with step 0 (the first step is always full), got ()"),
        ((0, 3, 2), 5, "FixedSchedule.full_steps must be sorted and unique, got (0, 3, 2) (2 after 3)"),
        ((0, 2, 2), 5, "FixedSchedule.full_steps must be sorted and unique, got (0, 2, 2) (2 after 2)"),
        ((0, 5), 5, "FixedSchedule.full_steps must lie in [0, num_steps - 1] = [0, 4], got step 5"),
        ((0, 1.0), 5, "FixedSchedule.full_steps must hold ints, got 1.0 in (0, 1.0)"),
        ((0, True), 5, "FixedSchedule.full_steps must hold ints, got True in (0, True)"),
        ("0", 5, "FixedSchedule.full_steps must be a tuple of ints, got '0'"),
        ((0,), 0, "FixedSchedule.num_steps must be an int >= 1, got 0"),
        ((0,), 2.0, "FixedSchedule.num_steps must be an int >= 1, got 2.0"),
    ],
)
def test_fixed_schedule_validation(full_steps, num_steps, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FixedSchedule(full_steps, num_steps)


def test_fixed_schedule_name_must_be_str():
    with pytest.raises(ValueError, match=re.escape("FixedSchedule.name must be a str, got 3")):
        FixedSchedule((0,), 1, name=3)


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("FFxf", "character 'x' at step 2 is neither 'F' (full) nor 'f' (forecast)"),
        ("", "FixedSchedule.from_pattern needs a non-empty str of 'F' and 'f', got ''"),
        ("fF", "FixedSchedule.full_steps must start with step 0"),
    ],
)
def test_fixed_schedule_from_pattern_validation(pattern, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FixedSchedule.from_pattern(pattern)


#################################################################################
#                  Config validation, serialisation, registration                #
#################################################################################


@pytest.mark.parametrize(
    "config_type, kwargs, message",
    [
        (ConfidenceGate, {"threshold": math.nan}, "ConfidenceGate.threshold must be a finite float > 0, got nan"),
        (ConfidenceGate, {"threshold": math.inf}, "ConfidenceGate.threshold must be a finite float > 0, got inf"),
        (ConfidenceGate, {"threshold": 0.0}, "ConfidenceGate.threshold must be a finite float > 0, got 0.0"),
        (ConfidenceGate, {"threshold": -0.1}, "ConfidenceGate.threshold must be a finite float > 0, got -0.1"),
        (ConfidenceGate, {"threshold": "0.1"}, "ConfidenceGate.threshold must be a finite float > 0, got '0.1'"),
        (ConfidenceGate, {"threshold": True}, "ConfidenceGate.threshold must be a finite float > 0, got True"),
        (ConfidenceGate, {"warmup_steps": -1}, "ConfidenceGate.warmup_steps must be an int >= 0, got -1"),
        (ConfidenceGate, {"warmup_steps": 1.5}, "ConfidenceGate.warmup_steps must be an int >= 0, got 1.5"),
        (ConfidenceGate, {"tail_steps": -2}, "ConfidenceGate.tail_steps must be an int >= 0, got -2"),
        (ConfidenceGate, {"max_forecast": 0}, "ConfidenceGate.max_forecast must be an int >= 1, got 0"),
        (ConfidenceGate, {"probe_blocks": 0}, "ConfidenceGate.probe_blocks must be an int >= 1, got 0"),
        (ErrorBudget, {"budget": math.nan}, "ErrorBudget.budget must be a finite float > 0, got nan"),
        (ErrorBudget, {"budget": 0}, "ErrorBudget.budget must be a finite float > 0, got 0"),
        (ErrorBudget, {"budget": None}, "ErrorBudget.budget must be a finite float > 0, got None"),
        (ErrorBudget, {"warmup_steps": True}, "ErrorBudget.warmup_steps must be an int >= 0, got True"),
        (ErrorBudget, {"tail_steps": -1}, "ErrorBudget.tail_steps must be an int >= 0, got -1"),
        (ErrorBudget, {"max_forecast": -3}, "ErrorBudget.max_forecast must be an int >= 1, got -3"),
        (ErrorBudget, {"probe_blocks": 2.0}, "ErrorBudget.probe_blocks must be an int >= 1, got 2.0"),
        (IntervalSchedule, {"interval": 0}, "interval must be an int >= 1, got 0"),
        (IntervalSchedule, {"warmup_steps": -1}, "warmup_steps must be an int >= 0, got -1"),
        (IntervalSchedule, {"tail_steps": "1"}, "tail_steps must be an int >= 0, got '1'"),
    ],
)
def test_config_validation_messages(config_type, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config_type(**kwargs)


def test_integer_threshold_and_budget_are_stored_as_float():
    assert ConfidenceGate(threshold=1).threshold == 1.0 and isinstance(ConfidenceGate(threshold=1).threshold, float)
    assert isinstance(ErrorBudget(budget=2).budget, float)


def test_configs_are_frozen():
    with pytest.raises(AttributeError):
        ConfidenceGate().threshold = 0.2
    with pytest.raises(AttributeError):
        FixedSchedule((0,), 1).num_steps = 2


@pytest.mark.parametrize(
    "config, data",
    [
        (ConfidenceGate(threshold=0.2, warmup_steps=3, tail_steps=1, max_forecast=4, probe_blocks=2),
         {"threshold": 0.2, "warmup_steps": 3, "tail_steps": 1, "max_forecast": 4, "probe_blocks": 2}),
        (ErrorBudget(budget=0.3, warmup_steps=1, tail_steps=0, max_forecast=5, probe_blocks=1),
         {"budget": 0.3, "warmup_steps": 1, "tail_steps": 0, "max_forecast": 5, "probe_blocks": 1}),
        (IntervalSchedule(interval=5, warmup_steps=1, tail_steps=2),
         {"interval": 5, "warmup_steps": 1, "tail_steps": 2}),
    ],
)
def test_config_dict_round_trip(config, data):
    assert config.to_dict() == data
    assert type(config).from_dict(json.loads(json.dumps(data))) == config


@pytest.mark.parametrize("config_type", [ConfidenceGate, ErrorBudget, IntervalSchedule])
def test_from_dict_rejects_unknown_keys(config_type):
    with pytest.raises(ValueError, match=re.escape(f"{config_type.__name__}.from_dict: unknown keys ['thresh']")):
        config_type.from_dict({"thresh": 0.1})


def test_from_dict_fills_defaults():
    assert ConfidenceGate.from_dict({"threshold": 0.2}) == ConfidenceGate(0.2, 2, 0, 6, 1)
    assert ErrorBudget.from_dict({}) == ErrorBudget(0.1, 2, 0, 6, 1)


def test_new_policies_are_registered():
    names = registered_policies()
    for config_type in (ConfidenceGate, ErrorBudget, FixedSchedule, IntervalSchedule):
        assert names[config_type.__name__] is config_type
    assert type(build_policy(ConfidenceGate())).__name__ == "ConfidenceGatePolicy"
    assert type(build_policy(ErrorBudget())).__name__ == "ErrorBudgetPolicy"
    assert type(build_policy(FixedSchedule((0,), 1))).__name__ == "FixedSchedulePolicy"
    assert all(isinstance(build_policy(c), Policy) for c in (ConfidenceGate(), ErrorBudget(), FixedSchedule((0,), 1)))


def test_build_policy_gives_independent_objects():
    config = ConfidenceGate(threshold=0.1, warmup_steps=1, max_forecast=2)
    a, b = build_policy(config), build_policy(config)
    assert a is not b
    run(a, [None, 0.0, 0.0])  # leaves a mid-window
    assert run(b, [None, 0.0, 0.0, None]) == ("Fff" + "F", ["warmup", "gate", "gate", "cap"])


def test_probe_decision_shape():
    policy = gate(warmup_steps=0)
    policy.begin(2)
    assert policy.decide(StepInfo(0, 2, 0.0)) == Decision(compute=False, probe=True, reason="gate")
