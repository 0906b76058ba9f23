"""Extreme and malformed requests over DDS (``mace-bench fuzz``, a seeded share of its single
mutations) against the session's node: nothing hangs, crashes, errs internally or answers
success with NaN; messages stay short."""

from __future__ import annotations

import math

from mace_ros.fuzz import FuzzConfig, Mutation, RequestBuilder, run_fuzz, schedule


def test_fuzzed_requests_never_hang_crash_or_answer_nan(rclpy_context, mace_node):
    config = FuzzConfig(requests=150, seed=1, namespace="/mace",
                        params_file="config/panda.yaml")
    lines = []
    summary, records = run_fuzz(config, log=lines.append)
    assert mace_node.proc.poll() is None, "the node exited:\n" + mace_node.log()
    assert summary.requests == 150 and summary.answered == 150, lines
    assert summary.hangs == summary.crashes == 0, lines
    assert summary.internal_errors == 0, [r.message for r in records if r.internal_error]
    assert summary.nonfinite_successes == 0, [r.mutations for r in records
                                              if r.nonfinite_success]
    assert summary.long_messages == 0 and summary.longest_message_chars < 1000
    assert 0 < summary.successes < summary.requests  # both kinds of answer were exercised
    assert math.isfinite(summary.worst_overshoot_s)


def test_schedule_covers_every_field_and_value_first():
    """The single mutations come first, each once; combinations fill the rest."""
    plan = schedule(FuzzConfig(requests=500, seed=0, params_file="config/panda.yaml"))
    singles = [p[0] for p in plan if len(p) == 1]
    assert len(singles) == len({(m.service, m.path, repr(m.value)) for m in singles})
    assert all(len(p) in (2, 3) for p in plan[len(singles):])
    assert {m.path for m in singles} >= {"gradient_steps", "cloud*", "finger_radius", "seed"}
    tried = {(m.service, m.path, m.value) for m in singles}
    assert {("ik", "gradient_steps", 256), ("ik", "num_samples", 16384),
            ("shape", "iterations", 1000)} <= tried  # the limits themselves, accepted


def test_mutations_reach_the_message(rclpy_context):
    builder = RequestBuilder(FuzzConfig())
    service, msg, applied = builder.build([
        Mutation("ik", "obstacles[1].primitives[0].dimensions[2]", 1e300),
        Mutation("ik", "gradient_steps", 7)])
    assert len(applied) == 2
    assert service == "ik" and msg.obstacles[1].primitives[0].dimensions[2] == 1e300
    assert msg.gradient_steps == 7
    service, msg, applied = builder.build([Mutation("shape", "contact_directions[1].x", math.inf),
                                           Mutation("shape", "cloud.fields[2].offset", 3)])
    assert service == "shape" and msg.contact_directions[1].x == math.inf
    assert msg.cloud.width == 0  # contact fields go to the contacts request, which has no cloud
    assert [m.path for m in applied] == ["contact_directions[1].x"]
