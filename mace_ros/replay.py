"""Replay a bag of ``/mace/adapt_ik`` calls against mace and its baselines, in process.

The bag's requests (:func:`mace_ros.bags.read_ik_requests`) are grouped by what the benchmark
holds fixed: the scene (their obstacles), the target kind (position or pose), K, the time
budget and the orientation tolerance. Each group runs as ``mace-bench ik`` runs a scene, its
targets the recorded ones, every method in turns on each target and every answer judged by
PyBullet and float64 forward kinematics (:func:`mace_core.ik.benchmark.run_benchmark`).

With ``--node`` the recorded requests also go to a running node over DDS (method ``mace_node``,
timed end to end as a client sees it). ``mace-bench replay BAG [--node] --json OUT
[--markdown FILE] [--plots DIR]``: the JSON holds every request's record and every solution;
the Markdown tables (:func:`markdown_report`) and the plots
(:mod:`mace_ros.plotting`) are computed from those records.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from mace_core.ik.adapter import IKAdapter
from mace_core.ik.baselines import TargetOutcome
from mace_core.ik.benchmark import METHODS, POSE_METHODS, IKBenchmarkConfig, run_benchmark
from mace_core.ik.benchmark_report import format_table
from mace_core.ik.request import IKRequest
from mace_core.robot.rotations import matrix_to_quaternion_xyzw
from mace_core.robot.scenes import Scene, TargetRegion, load_scene
from mace_ros.bags import read_ik_requests
from mace_ros.conversions import ik_request_from_msg, ik_request_to_msg
from mace_ros import shipped


@dataclass
class RequestGroup:
    """Recorded requests that one benchmark run replays together."""

    scene: Scene  #: the requests' obstacles (the target region: the box around their targets)
    target_kind: str  #: "position" or "pose"
    num_solutions: int  #: K
    time_budget_s: float  #: s
    orientation_tolerance: float  #: rad (pose targets)
    targets: list[np.ndarray]  #: (3,) positions or (7,) poses (x, y, z, qx, qy, qz, qw)
    messages: list = field(default_factory=list)  #: the recorded AdaptIK requests, as sent
    #: MoveIt's recorded calls (:class:`mace_ros.moveit_bags.MoveItIKCall`), for its groups
    recorded: list = field(default_factory=list)
    #: per request, the robot's joints it was asked at, ``(7,)`` (NaN: none recorded)
    seed_states: list[np.ndarray] = field(default_factory=list)


def _same_obstacles(a: Sequence, b: Sequence) -> bool:
    """Whether two obstacle lists are the same shapes at the same poses (names aside)."""
    return len(a) == len(b) and all(
        x.kind == y.kind and np.allclose(x.size, y.size) and np.allclose(x.position, y.position)
        and np.allclose(x.rotation_matrix, y.rotation_matrix) for x, y in zip(a, b))


def known_scene_name(obstacles: Sequence, scenes: Sequence[Scene]) -> str | None:
    """The name of the scene among ``scenes`` whose obstacles ``obstacles`` are, if any."""
    for scene in scenes:
        if _same_obstacles(scene.obstacles, obstacles):
            return scene.name
    return None


def group_requests(requests: list[IKRequest], defaults: IKBenchmarkConfig,
                   messages: list | None = None,
                   scene_files: Sequence[str] | None = None, prefix: str = "bag",
                   recorded: list | None = None) -> list[RequestGroup]:
    """Group ``requests`` (core requests, in the bag's order; ``messages``: the same as
    recorded, ``recorded``: MoveIt's calls they come from); unset K and budget take the
    benchmark's defaults. A group whose obstacles are those of one of ``scene_files`` (default:
    the shipped scenes) is named ``<prefix>-N-<scene>``."""
    scene_files = shipped.scene_files() if scene_files is None else scene_files
    known_scenes = [load_scene(path) for path in scene_files] if requests else []
    groups: dict[tuple, RequestGroup] = {}
    for index, request in enumerate(requests):
        pose = request.rotation is not None
        k = request.num_solutions or defaults.num_solutions
        budget = request.time_budget_s or defaults.time_budget_s
        tolerance = request.orientation_tolerance if pose else defaults.orientation_tolerance
        key = (tuple(request.obstacles), pose, k, budget, tolerance)
        if key not in groups:
            known = known_scene_name(request.obstacles, known_scenes)
            name = f"{prefix}-{len(groups) + 1}" + (f"-{known}" if known else "")
            scene = Scene(name=name, ee_link="panda_grasptarget",
                          obstacles=tuple(request.obstacles),
                          targets=TargetRegion(min=(0.0, 0.0, 0.0), max=(0.0, 0.0, 0.0)))
            groups[key] = RequestGroup(scene, "pose" if pose else "position", k, budget,
                                       tolerance, [])
        target = np.asarray(request.position, dtype=float)
        if pose:
            target = np.concatenate([target, matrix_to_quaternion_xyzw(
                np.asarray(request.rotation, dtype=float))])
        groups[key].targets.append(target)
        groups[key].seed_states.append(np.full(7, np.nan) if request.seed_state is None
                                       else np.asarray(request.seed_state, dtype=float))
        if messages is not None:
            groups[key].messages.append(messages[index])
        if recorded is not None:
            groups[key].recorded.append(recorded[index])
    for group in groups.values():
        xyz = np.stack([t[:3] for t in group.targets])
        group.scene = replace(group.scene, targets=TargetRegion(
            min=tuple(xyz.min(0).tolist()), max=tuple(xyz.max(0).tolist())))
    return list(groups.values())


def node_runner(client, messages: list, timeout_s: float
                ) -> Callable[[int, np.ndarray], TargetOutcome]:
    """A method that sends recorded request ``i`` to a running node (``client``: a
    :class:`~mace_ros.client.MaceClient`) and times the call end to end, as a client sees it;
    the stage times are the node's own (its ``total_time``: the solve, without the call)."""
    def run(i: int, target: np.ndarray) -> TargetOutcome:
        message = messages[min(i, len(messages) - 1)]  # past the end: the warm-up
        t0 = time.perf_counter()
        response = client.call(message, timeout_s=timeout_s)
        elapsed = time.perf_counter() - t0
        return TargetOutcome.at_once([s.positions for s in response.solutions], elapsed,
                                     valid_fraction_prior=response.valid_fraction_prior,
                                     valid_fraction_adapted=response.valid_fraction_adapted,
                                     iterations_run=response.iterations_run,
                                     stage_times=dict(sampling=response.sampling_time,
                                                      adaptation=response.adaptation_time,
                                                      refinement=response.refinement_time,
                                                      total=response.total_time))
    return run


def node_batch_runner(client, group: RequestGroup, timeout_s: float
                      ) -> Callable[[int, np.ndarray], TargetOutcome]:
    """A method that sends all of ``group``'s requests to a running node in one
    ``/mace/adapt_ik_batch`` call (at the first request's turn; the warm-up sends the first
    request alone) and gives each request its answer, timed as the call's end-to-end time over
    the requests: what a pipeline that asks for its targets together pays for each."""
    targets = np.stack(group.targets)
    pose = group.target_kind == "pose"
    answered: dict[str, tuple] = {}

    def ask(rows: np.ndarray):
        t0 = time.perf_counter()
        response = client.adapt_ik_batch(
            rows, obstacles=group.scene.obstacles, num_solutions=group.num_solutions,
            time_budget_s=group.time_budget_s,
            orientation_tolerance=group.orientation_tolerance if pose else 0.0)
        return response.answers, (time.perf_counter() - t0) / len(rows)

    def run(i: int, target: np.ndarray) -> TargetOutcome:
        if i >= len(targets):  # the warm-up
            answers, per = ask(targets[:1])
            answer = answers[0]
        else:
            if "all" not in answered:
                answered["all"] = ask(targets)
            answers, per = answered["all"]
            answer = answers[i]
        return TargetOutcome.at_once([s.positions for s in answer.solutions], per)
    return run


def recorded_runner(calls: list) -> Callable[[int, np.ndarray], TargetOutcome]:
    """A method that answers request ``i`` with MoveIt's recorded answer (one solution, or none
    on a failure) after its recorded latency."""
    def run(i: int, target: np.ndarray) -> TargetOutcome:
        call = calls[min(i, len(calls) - 1)]  # past the end: the warm-up
        solutions = [] if call.solution is None else [call.solution]
        return TargetOutcome.at_once(solutions, float(call.latency_s))
    return run


def replay_bag(path: str, adapter: IKAdapter, methods: tuple[str, ...] = (),
               defaults: IKBenchmarkConfig = IKBenchmarkConfig(),
               log: Callable[[str], None] = lambda _s: None, client=None,
               node_timeout_s: float = 30.0, node_batch: bool = False) -> dict:
    """Replay every ``/mace/adapt_ik`` request of the bag at ``path``, and every MoveIt
    ``/compute_ik`` call (:mod:`mace_ros.moveit_bags`): the JSON-ready report (``groups``: one
    benchmark report per group, ``requests``: how many were read, ``moveit``: MoveIt's calls,
    how many were replayed and what was left out).
    ``methods``: those of a group's target kind run (none given or none of its kind: all).
    ``client`` (a :class:`~mace_ros.client.MaceClient`): the recorded requests also go to a
    running node, method ``mace_node``, timed end to end; with ``node_batch``, each group's
    requests also go in one batch call, method ``mace_node_batch`` (:func:`node_batch_runner`;
    not for groups whose requests carry the robot's joints, which a batch shares). MoveIt's
    calls are asked for K =
    ``defaults.num_solutions`` within ``defaults.time_budget_s`` (its own timeout bounds a
    solver's attempt, not the pipeline's wait), and MoveIt's recorded answers run as method
    ``moveit_recorded`` where every call's response and latency were recorded."""
    from mace_ros.moveit_bags import read_moveit_ik_calls, unsupported_summary

    messages = read_ik_requests(path)
    requests = [ik_request_from_msg(r, adapter.kin.base_link) for r in messages]
    calls = read_moveit_ik_calls(path, adapter.kin, defaults.orientation_tolerance)
    replayable = [c for c in calls if c.request is not None]
    moveit_requests = [replace(c.request, num_solutions=defaults.num_solutions,
                               time_budget_s=defaults.time_budget_s) for c in replayable]
    groups = group_requests(requests, defaults, messages) + group_requests(
        moveit_requests, defaults, [ik_request_to_msg(r, adapter.kin.base_link)
                                    for r in moveit_requests],
        prefix="moveit", recorded=replayable)
    reports = []
    for group in groups:
        allowed = POSE_METHODS if group.target_kind == "pose" else METHODS
        cfg = replace(defaults, num_targets=len(group.targets), target_kind=group.target_kind,
                      num_solutions=group.num_solutions, time_budget_s=group.time_budget_s,
                      orientation_tolerance=group.orientation_tolerance,
                      methods=tuple(m for m in methods if m in allowed) or allowed)
        log(f"[{group.scene.name}] {len(group.targets)} {group.target_kind} requests, "
            f"K = {group.num_solutions}, {group.time_budget_s:g} s")
        extra = {}
        if group.recorded and all(c.latency_s is not None and c.error_code is not None
                                  for c in group.recorded):
            extra["moveit_recorded"] = recorded_runner(group.recorded)
        seeds = np.stack(group.seed_states)
        if client is not None:
            extra["mace_node"] = node_runner(client, group.messages, node_timeout_s)
            if node_batch and not np.isfinite(seeds).any():
                extra["mace_node_batch"] = node_batch_runner(client, group, node_timeout_s)
        reports.append(run_benchmark(adapter, group.scene, cfg, log=log,
                                     targets=np.stack(group.targets), extra=extra or None,
                                     seed_states=seeds if np.isfinite(seeds).any() else None))
    return {"bag": str(path), "requests": len(requests) + len(calls), "groups": reports,
            "moveit": {"calls": len(calls), "replayed": len(replayable),
                       "unsupported": unsupported_summary(calls)}}


def _moveit_note(report: dict) -> str:
    moveit = report.get("moveit") or {}
    if not moveit.get("calls"):
        return ""
    note = (f"MoveIt /compute_ik calls: {moveit['calls']}, replayed {moveit['replayed']}")
    if moveit["unsupported"]:
        note += "; left out: " + "; ".join(moveit["unsupported"])
    return note


def format_replay(report: dict) -> str:
    """One table per group (and what was left out of MoveIt's calls), then the shape calls'
    (:mod:`mace_ros.shape_replay`) when the bag had some."""
    from mace_ros.shape_replay import format_shape_replay

    note = _moveit_note(report)
    shape = [format_shape_replay(report["shape"])] if report.get("shape") else []
    return "\n\n".join([format_table(r) for r in report["groups"]] + ([note] if note else [])
                       + shape)


@dataclass
class MethodRow:
    """One method over one group's requests, from its per-request records."""

    method: str
    requests: int
    success: float  #: share of requests with >= 1 valid solution
    k_success: float  #: share with K valid
    first_median_s: float  #: s, time to the first valid solution (inf: none within the budget)
    first_p90_s: float
    k_median_s: float  #: s, time to K valid solutions (inf: not reached within the budget)
    k_p90_s: float
    position_error_m: float  #: m, mean over every returned solution
    orientation_error_rad: float  #: rad, mean over every returned solution
    pairwise_rad: float  #: rad, mean over requests of the mean pairwise joint distance (L2)
    #: rad, median over requests with a seed state of the distance from it to the nearest
    #: valid answer (nan: none)
    seed_distance_rad: float = math.nan


def time_to_first(row: dict) -> float:
    """s, when request ``row`` (a per-request record) had its first valid solution; inf when
    it had none."""
    return row["time_first_s"] if row["valid"] >= 1 else math.inf


def time_to_k(row: dict, k: int) -> float:
    """s, when request ``row`` had K valid solutions; inf when it never had them."""
    return row["time_s"] if row["valid"] >= k else math.inf


def group_times(group: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per method of one group's report: the times ``(R,)`` s to the first valid solution and
    to K valid ones of each request (inf: never)."""
    k = group["config"]["num_solutions"]
    return {name: (np.array([time_to_first(r) for r in m["per_target"]]),
                   np.array([time_to_k(r, k) for r in m["per_target"]]))
            for name, m in group["methods"].items()}


def _weighted_mean(rows: list[dict], key: str) -> float:
    """Mean over every returned solution of a per-request mean ``key``."""
    pairs = [(r[key], r["returned"]) for r in rows if r.get(key) is not None and r["returned"]]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else math.nan


def method_rows(group: dict) -> list[MethodRow]:
    """The table rows of one group's report (:func:`run_benchmark`'s), from the per-request
    records alone."""
    out = []
    times = group_times(group)
    for name, m in group["methods"].items():
        rows = m["per_target"]
        first, full = times[name]
        pairwise = [r["pairwise_joint_distance_rad"] for r in rows
                    if r.get("pairwise_joint_distance_rad") is not None]
        seed = [r["seed_distance"] for r in rows if r.get("seed_distance") is not None]
        with np.errstate(invalid="ignore"):  # inf, inf: nan, shown as "-"
            quantiles = [float(np.percentile(t, q)) for t in (first, full) for q in (50, 90)]
        out.append(MethodRow(
            method=name, requests=len(rows), success=float(np.mean(np.isfinite(first))),
            k_success=float(np.mean(np.isfinite(full))),
            first_median_s=quantiles[0], first_p90_s=quantiles[1],
            k_median_s=quantiles[2], k_p90_s=quantiles[3],
            position_error_m=_weighted_mean(rows, "mean_position_error_m"),
            orientation_error_rad=_weighted_mean(rows, "mean_orientation_error_rad"),
            pairwise_rad=float(np.mean(pairwise)) if pairwise else math.nan,
            seed_distance_rad=float(np.median(seed)) if seed else math.nan))
    return out


def node_solve_share(group: dict) -> tuple[float, float] | None:
    """s, the median over one group's requests of the node's own solve time (the
    ``total_time`` it answers with) and of the same calls end to end: the difference is what
    the call over ROS costs (conversions, serialization, DDS, the client's wait). None
    without ``mace_node``."""
    node = group["methods"].get("mace_node")
    if node is None:
        return None
    rows = [r for r in node["per_target"] if (r.get("stage_times") or {}).get("total")]
    if not rows:
        return None
    return (float(np.median([r["stage_times"]["total"] for r in rows])),
            float(np.median([r["time_s"] for r in rows])))


def _ms(seconds: float) -> str:
    return "-" if not math.isfinite(seconds) else f"{seconds * 1e3:,.1f}"


def _num(value: float, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if not math.isfinite(value) else f"{value * scale:.{digits}f}"


def markdown_report(report: dict) -> str:
    """A Markdown table per group (scene and target kind) and method: success, time to the first
    valid answer and to K valid (median / p90, ms; "-": not within the budget for that share),
    mean position and orientation error, mean pairwise joint distance, and where the requests
    carried the robot's joints (``seed_state``, MoveIt's ``robot_state``) the median distance
    from them to the nearest valid answer."""
    parts = [f"# Replay of {report['bag']} ({report['requests']} requests)"]
    for group in report["groups"]:
        cfg = group["config"]
        k = cfg["num_solutions"]
        rows = method_rows(group)
        seeded = any(math.isfinite(r.seed_distance_rad) for r in rows)
        parts.append(
            f"## {group['scene']}: {len(group['targets'])} {cfg['target_kind']} requests, "
            f"K = {k}, budget {cfg['time_budget_s']:g} s\n\n"
            f"| method | requests | success | all {k} | first valid, median / p90 (ms) | "
            f"{k} valid, median / p90 (ms) | position error (mm) | orientation error (mrad) | "
            f"pairwise joint distance (rad) |"
            + (" nearest valid from the seed state (rad) |" if seeded else "") + "\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
            + (" ---: |" if seeded else ""))
        for r in rows:
            parts[-1] += (
                f"\n| {r.method} | {r.requests} | {r.success:.2f} | {r.k_success:.2f} | "
                f"{_ms(r.first_median_s)} / {_ms(r.first_p90_s)} | "
                f"{_ms(r.k_median_s)} / {_ms(r.k_p90_s)} | {_num(r.position_error_m, 1e3)} | "
                f"{_num(r.orientation_error_rad, 1e3)} | {_num(r.pairwise_rad, digits=2)} |"
                + (f" {_num(r.seed_distance_rad, digits=2)} |" if seeded else ""))
        share = node_solve_share(group)
        if share is not None:
            parts[-1] += (f"\n\n`mace_node`: the node's own solve (the `total_time` it "
                          f"answers with) took a median {_ms(share[0])} ms of the "
                          f"{_ms(share[1])} ms a call took end to end; the rest is the call "
                          f"over ROS (conversions, serialization, DDS, the client's wait).")
    note = _moveit_note(report)
    if note:
        parts.append(note + ". `moveit_recorded`: MoveIt's recorded answer "
                     "(one solution) after its recorded latency.")
    parts.append("Valid: collision-free for PyBullet and within "
                 f"{report['groups'][0]['config']['position_tolerance'] * 1e3:g} mm (and the "
                 "orientation tolerance for poses), whatever the method says. Times are wall "
                 "clock per request; `mace_node` end to end over DDS."
                 if report["groups"] else "No `/mace/adapt_ik` request in the bag.")
    if report.get("shape"):
        from mace_ros.shape_replay import shape_markdown

        parts.append(shape_markdown(report["shape"]))
    return "\n\n".join(parts) + "\n"


def write_outputs(report: dict, markdown_path: str = "", plots_dir: str = "") -> list[str]:
    """Write the Markdown tables and the plots of every group; returns the files written."""
    written = []
    if markdown_path:
        os.makedirs(os.path.dirname(os.path.abspath(markdown_path)), exist_ok=True)
        with open(markdown_path, "w") as f:
            f.write(markdown_report(report))
        written.append(markdown_path)
    if plots_dir:
        from mace_ros.plotting import plot_first_valid_times, plot_success_against_budget

        for group in report["groups"]:
            cfg, k = group["config"], group["config"]["num_solutions"]
            times = group_times(group)
            first = {m: t[0] for m, t in times.items()}
            full = {m: t[1] for m, t in times.items()}
            title = (f"{group['scene']}: {len(group['targets'])} {cfg['target_kind']} "
                     f"requests, K = {k}")
            stem = os.path.join(plots_dir, group["scene"] + f"_{cfg['target_kind']}")
            written.append(plot_success_against_budget(f"{stem}_success.png", first, full,
                                                       cfg["time_budget_s"], k, title))
            written.append(plot_first_valid_times(f"{stem}_first_valid.png", first, title))
    return written
