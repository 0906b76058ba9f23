"""``mace-bench ik --protocol batch``: many targets in one batch (:func:`~.batch.solve_batch`),
valid solutions per second.

The full-pose issue asks for valid full-pose solutions per second on batches of 1,000 targets
(cuRoboV2 reports 100 collision-free IK solutions of a Franka in 2.73 ms on its GPU). Targets are
drawn as the ``requests`` protocol draws them (hand poses of configurations PyBullet calls free,
or positions in the scene's region), answered in one batch in process with K solutions each,
and every answer is judged afterwards by PyBullet and float64 FK, as there.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ..robot.scenes import Scene
from .adapter import IKAdapter
from .batch import default_total_budget, solve_batch
from .benchmark import (SolutionJudge, environment, sample_pose_targets, sample_targets,
                        target_request)


def run_batch_benchmark(adapter: IKAdapter, scene: Scene, num_targets: int, seed: int,
                        target_kind: str = "pose", num_solutions: int = 8,
                        time_budget_s: float = 1.0, total_time_budget_s: float | None = None,
                        orientation_tolerance: float = 1e-3, position_tolerance: float = 1e-4,
                        log: Callable[[str], None] = lambda _s: None) -> dict:
    """One batch of ``num_targets`` drawn targets (seeded), K = ``num_solutions`` each within
    ``time_budget_s`` a target and ``total_time_budget_s`` for all (None: the per-target budget
    times the targets, at most the service's limit). Returns the JSON-ready report: the
    figures, ``targets`` and each target's valid count and time."""
    judge = SolutionJudge(scene, position_tolerance, orientation_tolerance=orientation_tolerance)
    try:
        pose = target_kind == "pose"
        targets = (sample_pose_targets(scene, num_targets, seed, judge.checker) if pose
                   else sample_targets(scene, num_targets, seed))
        requests = [target_request(t, scene, orientation_tolerance,
                                   num_solutions=num_solutions, time_budget_s=time_budget_s,
                                   seed=seed * 100003 + i)
                    for i, t in enumerate(np.asarray(targets))]
        total = (total_time_budget_s if total_time_budget_s is not None
                 else default_total_budget(num_targets, time_budget_s,
                                           adapter.config.limits.max_time_budget_s))
        adapter.warm_up()
        log(f"[{scene.name}] batch of {num_targets} {target_kind} targets, K = {num_solutions}, "
            f"{total:g} s")
        t0 = time.perf_counter()
        answers = solve_batch(adapter, requests, total, start=t0)
        wall = time.perf_counter() - t0
        valid, times = [], []
        for answer, target in zip(answers, np.asarray(targets)):
            q = (np.array([s.q for s in answer.result.solutions]) if answer.result
                 else np.zeros((0, 7)))
            valid.append(int(judge.judge(q, target)[0].sum()))
            times.append(answer.result.timings.total if answer.result else 0.0)
    finally:
        judge.close()
    valid_arr, times_arr = np.array(valid), np.array(times)
    return dict(scene=scene.name, protocol="batch", environment=environment(),
                config=dict(num_targets=num_targets, seed=seed, target_kind=target_kind,
                            num_solutions=num_solutions, time_budget_s=time_budget_s,
                            total_time_budget_s=total, position_tolerance=position_tolerance,
                            orientation_tolerance=orientation_tolerance),
                wall_s=wall, targets_per_s=num_targets / wall,
                valid_solutions_per_s=float(np.minimum(valid_arr, num_solutions).sum()) / wall,
                success_rate=float((valid_arr >= 1).mean()),
                k_success_rate=float((valid_arr >= num_solutions).mean()),
                median_target_s=float(np.median(times_arr)),
                p90_target_s=float(np.percentile(times_arr, 90)),
                targets=np.asarray(targets).round(9).tolist(),
                per_target=[dict(valid=v, time_s=t) for v, t in zip(valid, times)])


def format_batch(report: dict) -> str:
    """The report as a few lines for the terminal."""
    c = report["config"]
    return (f"scene {report['scene']}, one batch of {c['num_targets']} {c['target_kind']} "
            f"targets, K = {c['num_solutions']}, {c['time_budget_s']:g} s a target "
            f"({c['total_time_budget_s']:g} s in all)\n"
            f"wall {report['wall_s']:.3f} s: {report['targets_per_s']:.0f} targets/s, "
            f"{report['valid_solutions_per_s']:.0f} valid solutions/s (PyBullet, "
            f"{c['position_tolerance'] * 1e3:g} mm); targets with >= 1 valid "
            f"{report['success_rate']:.3f}, with all K {report['k_success_rate']:.3f}; per "
            f"target median {report['median_target_s'] * 1e3:.1f} ms, p90 "
            f"{report['p90_target_s'] * 1e3:.1f} ms")
