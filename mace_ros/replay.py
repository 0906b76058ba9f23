"""Replay a bag of ``/mace/adapt_ik`` calls against mace and its baselines, in process.

The bag's requests (:func:`mace_ros.bags.read_ik_requests`) are grouped by what the benchmark
holds fixed: the scene (their obstacles), the target kind (position or pose), K, the time
budget and the orientation tolerance. Each group runs as ``mace-bench ik`` runs a scene, its
targets the recorded ones, every method in turns on each target and every answer judged by
PyBullet and float64 forward kinematics (:func:`mace_core.ik.benchmark.run_benchmark`).

With ``--node`` the recorded requests also go to a running node over DDS (method ``mace_node``,
timed end to end as a client sees it). ``mace-bench replay BAG [--node] --json OUT``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from mace_core.ik.adapter import IKAdapter
from mace_core.ik.baselines import TargetOutcome
from mace_core.ik.benchmark import (METHODS, POSE_METHODS, IKBenchmarkConfig, format_table,
                                    run_benchmark)
from mace_core.ik.request import IKRequest
from mace_core.robot.rotations import matrix_to_quaternion_xyzw
from mace_core.robot.scenes import Scene, TargetRegion
from mace_ros.bags import read_ik_requests
from mace_ros.conversions import ik_request_from_msg


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


def group_requests(requests: list[IKRequest], defaults: IKBenchmarkConfig,
                   messages: list | None = None) -> list[RequestGroup]:
    """Group ``requests`` (core requests, in the bag's order; ``messages``: the same as
    recorded); unset K and budget take the benchmark's defaults."""
    groups: dict[tuple, RequestGroup] = {}
    for index, request in enumerate(requests):
        pose = request.rotation is not None
        k = request.num_solutions or defaults.num_solutions
        budget = request.time_budget_s or defaults.time_budget_s
        tolerance = request.orientation_tolerance if pose else defaults.orientation_tolerance
        key = (tuple(request.obstacles), pose, k, budget, tolerance)
        if key not in groups:
            scene = Scene(name=f"bag-{len(groups) + 1}", ee_link="panda_grasptarget",
                          obstacles=tuple(request.obstacles),
                          targets=TargetRegion(min=(0.0, 0.0, 0.0), max=(0.0, 0.0, 0.0)))
            groups[key] = RequestGroup(scene, "pose" if pose else "position", k, budget,
                                       tolerance, [])
        target = np.asarray(request.position, dtype=float)
        if pose:
            target = np.concatenate([target, matrix_to_quaternion_xyzw(
                np.asarray(request.rotation, dtype=float))])
        groups[key].targets.append(target)
        if messages is not None:
            groups[key].messages.append(messages[index])
    for group in groups.values():
        xyz = np.stack([t[:3] for t in group.targets])
        group.scene = replace(group.scene, targets=TargetRegion(
            min=tuple(xyz.min(0).tolist()), max=tuple(xyz.max(0).tolist())))
    return list(groups.values())


def node_runner(client, messages: list, timeout_s: float
                ) -> Callable[[int, np.ndarray], TargetOutcome]:
    """A method that sends recorded request ``i`` to a running node (``client``: a
    :class:`~mace_ros.client.MaceClient`) and times the call end to end, as a client sees it."""
    def run(i: int, target: np.ndarray) -> TargetOutcome:
        message = messages[min(i, len(messages) - 1)]  # past the end: the warm-up
        t0 = time.perf_counter()
        response = client.call(message, timeout_s=timeout_s)
        elapsed = time.perf_counter() - t0
        return TargetOutcome.at_once([s.positions for s in response.solutions], elapsed,
                                     valid_fraction_prior=response.valid_fraction_prior,
                                     valid_fraction_adapted=response.valid_fraction_adapted,
                                     iterations_run=response.iterations_run)
    return run


def replay_bag(path: str, adapter: IKAdapter, methods: tuple[str, ...] = (),
               defaults: IKBenchmarkConfig = IKBenchmarkConfig(),
               log: Callable[[str], None] = lambda _s: None, client=None,
               node_timeout_s: float = 30.0) -> dict:
    """Replay every ``/mace/adapt_ik`` request of the bag at ``path``: the JSON-ready report
    (``groups``: one benchmark report per group, ``requests``: how many were read).
    ``methods``: those of a group's target kind run (none given or none of its kind: all).
    ``client`` (a :class:`~mace_ros.client.MaceClient`): the recorded requests also go to a
    running node, method ``mace_node``, timed end to end."""
    messages = read_ik_requests(path)
    requests = [ik_request_from_msg(r, adapter.kin.base_link) for r in messages]
    reports = []
    for group in group_requests(requests, defaults, messages):
        allowed = POSE_METHODS if group.target_kind == "pose" else METHODS
        cfg = replace(defaults, num_targets=len(group.targets), target_kind=group.target_kind,
                      num_solutions=group.num_solutions, time_budget_s=group.time_budget_s,
                      orientation_tolerance=group.orientation_tolerance,
                      methods=tuple(m for m in methods if m in allowed) or allowed)
        log(f"[{group.scene.name}] {len(group.targets)} {group.target_kind} requests, "
            f"K = {group.num_solutions}, {group.time_budget_s:g} s")
        extra = ({"mace_node": node_runner(client, group.messages, node_timeout_s)}
                 if client is not None else None)
        reports.append(run_benchmark(adapter, group.scene, cfg, log=log,
                                     targets=np.stack(group.targets), extra=extra))
    return {"bag": str(path), "requests": len(requests), "groups": reports}


def format_replay(report: dict) -> str:
    """One table per group."""
    return "\n\n".join(format_table(r) for r in report["groups"])
