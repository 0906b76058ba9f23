"""What ``mace-bench ik``'s judged answers sum to: per method over all targets
(:class:`MethodSummary`, :func:`summarize`), the acceptance ratios (:func:`compare`) and the
text table (:func:`format_table`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .baselines import TargetOutcome


@dataclass
class MethodSummary:
    """Figures of one method over all targets (the ``methods`` entries of the JSON)."""

    success_rate: float  #: share of targets with >= 1 valid solution
    k_success_rate: float  #: share of targets with K distinct valid solutions
    median_time_s: float  #: s, median over targets of ``time_s``
    p90_time_s: float  #: s, 90th percentile of ``time_s``
    time_basis: str  #: what ``time_s`` measures for this method
    median_time_first_s: float  #: s, median time to the first valid solution (censored)
    p90_time_first_s: float  #: s
    mean_position_error_m: float  #: m, over every returned solution
    mean_orientation_error_rad: float  #: rad, over every returned solution (0: position targets)
    mean_checks_per_target: float  #: exact collision checks spent per target (see TargetOutcome)
    #: MACE, full poses: median over targets of the median distance (rad, max-norm) from the
    #: prior's samples to their closed-form projections, and the mean share that has one
    median_projection_distance_rad: float | None
    projectable_fraction: float | None
    mean_pairwise_joint_distance_rad: float  #: rad, L2 between returned solutions, per target
    mean_pairwise_joint_distance_valid_rad: float  #: rad, same over valid solutions only
    mean_valid_per_target: float  #: valid solutions per target (at most K)
    collision_free_fraction: float  #: share of returned solutions PyBullet calls collision-free
    valid_fraction_prior: float | None  #: MACE methods: mean over targets
    valid_fraction_adapted: float | None  #: MACE methods: mean over targets
    mean_iterations: float | None  #: MACE methods: mean MACE iterations run
    mean_attempts: float | None  #: TRAC-IK: mean attempts per target
    #: rad, median over targets with a seed state and a valid solution of the Euclidean joint
    #: distance from the seed to the nearest valid solution (None: no seed states)
    median_seed_distance_rad: float | None
    per_target: list[dict] = field(default_factory=list)  #: time_s, valid count, ... per target
    solutions: list[list[list[float]]] = field(default_factory=list)  #: per target, (S, 7) rad


def _pairwise_mean(q: np.ndarray) -> float | None:
    if len(q) < 2:
        return None
    d = np.linalg.norm(q[:, None] - q[None], axis=-1)
    iu = np.triu_indices(len(q), 1)
    return float(d[iu].mean())


def _median_or_none(values: Sequence[float | None], reduce=np.median) -> float | None:
    vals = [v for v in values if v is not None]
    return float(reduce(vals)) if vals else None


def _mean(values: Sequence[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


def summarize(outcomes: list[TargetOutcome], k: int, time_basis: str,
              timeout_s: float | None = None) -> MethodSummary:
    """Figures of one method from its judged outcomes (one per target).

    The time to the first valid solution is censored at ``time_s`` (the method gave up) when
    a target got none.
    """
    times = np.array([o.time_s for o in outcomes])
    firsts = np.array([o.time_first_s if o.valid.any() else o.time_s for o in outcomes])
    all_err = np.concatenate([o.position_error for o in outcomes]) if outcomes else np.zeros(0)
    all_turn = (np.concatenate([o.orientation_error for o in outcomes]) if outcomes
                else np.zeros(0))
    all_free = np.concatenate([o.collision_free for o in outcomes]) if outcomes else np.zeros(0)
    mace = outcomes[0].iterations_run is not None
    per_target = []
    for o in outcomes:
        row = dict(time_s=o.time_s, time_first_s=o.time_first_s, returned=int(len(o.solutions)),
                   valid=int(o.valid.sum()), collision_free=int(o.collision_free.sum()),
                   mean_position_error_m=float(o.position_error.mean())
                   if len(o.position_error) else None,
                   mean_orientation_error_rad=float(o.orientation_error.mean())
                   if len(o.orientation_error) else None,
                   pairwise_joint_distance_rad=_pairwise_mean(o.solutions), checks=o.checks,
                   seed_distance=o.seed_distance)
        if mace:
            row.update(projection_distance=o.projection_distance,
                       projectable_fraction=o.projectable_fraction)
            row.update(valid_fraction_prior=o.valid_fraction_prior,
                       valid_fraction_adapted=o.valid_fraction_adapted,
                       iterations_run=o.iterations_run, stage_times=o.stage_times)
        else:
            row.update(attempts=o.attempts, converged=o.converged)
        per_target.append(row)
    return MethodSummary(
        success_rate=float(np.mean([o.valid.any() for o in outcomes])),
        k_success_rate=float(np.mean([o.valid.sum() >= k for o in outcomes])),
        median_time_s=float(np.median(times)), p90_time_s=float(np.percentile(times, 90)),
        time_basis=time_basis,
        median_time_first_s=float(np.median(firsts)),
        p90_time_first_s=float(np.percentile(firsts, 90)),
        mean_position_error_m=float(all_err.mean()) if len(all_err) else float("nan"),
        mean_orientation_error_rad=float(all_turn.mean()) if len(all_turn) else float("nan"),
        mean_checks_per_target=_mean([o.checks for o in outcomes]),
        median_projection_distance_rad=_median_or_none(
            [o.projection_distance for o in outcomes]),
        projectable_fraction=_median_or_none([o.projectable_fraction for o in outcomes],
                                             np.mean),
        mean_pairwise_joint_distance_rad=_mean([_pairwise_mean(o.solutions) for o in outcomes]),
        mean_pairwise_joint_distance_valid_rad=_mean(
            [_pairwise_mean(o.solutions[o.valid]) for o in outcomes]),
        mean_valid_per_target=float(np.mean([min(int(o.valid.sum()), k) for o in outcomes])),
        collision_free_fraction=float(all_free.mean()) if len(all_free) else float("nan"),
        valid_fraction_prior=_mean([o.valid_fraction_prior for o in outcomes]) if mace else None,
        valid_fraction_adapted=(_mean([o.valid_fraction_adapted for o in outcomes])
                                if mace else None),
        mean_iterations=_mean([o.iterations_run for o in outcomes]) if mace else None,
        mean_attempts=None if mace else _mean([o.attempts for o in outcomes]),
        median_seed_distance_rad=_median_or_none([o.seed_distance for o in outcomes]),
        per_target=per_target,
        solutions=[o.solutions.round(9).tolist() for o in outcomes])


def compare(mace: dict, tracik: dict) -> dict:
    """The issue's acceptance figures: ``mace_refine`` against ``tracik_restarts``.

    ``time_ratio``: median time of mace_refine over the median time of the TRAC-IK restarts to K
    valid solutions (the issue asks <= 0.5, on cabinet <= 0.25); ``diversity_ratio``: mean
    pairwise joint distance of mace_refine over TRAC-IK's (asks >= 0.9); ``mace_success``: share
    of targets where mace_refine returned a valid solution (asks 1.0).
    """
    t = tracik["median_time_s"]
    d = tracik["mean_pairwise_joint_distance_rad"]
    return dict(time_ratio=mace["median_time_s"] / t if t > 0 else float("nan"),
                diversity_ratio=(mace["mean_pairwise_joint_distance_rad"] / d
                                 if d and d > 0 else float("nan")),
                mace_success=mace["success_rate"], mace_k_success=mace["k_success_rate"],
                tracik_k_success=tracik["k_success_rate"])


def _fmt(value, scale: float = 1.0, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * scale:.{digits}f}"


def format_table(report: dict) -> str:
    """The report as a text table (one row per method)."""
    methods = report["methods"]
    k = report["config"]["num_solutions"]
    env = report["environment"]
    head = (f"scene {report['scene']}, {len(report['targets'])} targets, protocol "
            f"{report['protocol']}, load {env['load_average_1m']:.1f}, torch threads "
            f"{env['torch_threads']}, core {env['core_sha256']}, models "
            f"{env.get('models_sha256', '-')}")
    if report["protocol"] == "table1":
        lines = [head, f"{'method':<8} {'valid frac':>14} {'score':>14} {'adapt med s':>11} "
                       f"{'adapt max s':>11} {'iters':>6}"]
        for name, m in methods.items():
            lines.append(f"{name:<8} {m['valid_fraction']:>7.3f} ±{m['valid_fraction_std']:.3f}"
                         f" {m['score']:>7.3f} ±{m['score_std']:.3f} "
                         f"{m['median_adaptation_time_s']:>11.3f} "
                         f"{m['max_adaptation_time_s']:>11.3f} {m['mean_iterations']:>6.1f}")
        return "\n".join(lines)
    seeded = any(m.get("median_seed_distance_rad") is not None for m in methods.values())
    lines = [head, f"{'method':<20} {'succ':>5} {'succK':>5} {'med s':>7} {'p90 s':>7} "
                   f"{'1st med':>7} {'1st p90':>7} {'valid/t':>7} {'err mm':>8} {'rot mrad':>8} "
                   f"{'div rad':>7} {'free':>5} {'checks':>6} {'proj':>5} {'vf pri':>6} "
                   f"{'vf ada':>6} {'iters':>5}" + (f" {'seed d':>6}" if seeded else "")]
    for name, m in methods.items():
        lines.append(
            f"{name:<20} {_fmt(m['success_rate'], digits=2):>5} "
            f"{_fmt(m['k_success_rate'], digits=2):>5} {_fmt(m['median_time_s']):>7} "
            f"{_fmt(m['p90_time_s']):>7} {_fmt(m['median_time_first_s']):>7} "
            f"{_fmt(m['p90_time_first_s']):>7} {_fmt(m['mean_valid_per_target'], digits=1):>7} "
            f"{_fmt(m['mean_position_error_m'], 1e3, 3):>8} "
            f"{_fmt(m['mean_orientation_error_rad'], 1e3, 3):>8} "
            f"{_fmt(m['mean_pairwise_joint_distance_rad'], digits=2):>7} "
            f"{_fmt(m['collision_free_fraction'], digits=2):>5} "
            f"{_fmt(m['mean_checks_per_target'], digits=0):>6} "
            f"{_fmt(m['median_projection_distance_rad'], digits=2):>5} "
            f"{_fmt(m['valid_fraction_prior'], digits=2):>6} "
            f"{_fmt(m['valid_fraction_adapted'], digits=2):>6} "
            f"{_fmt(m['mean_iterations'], digits=1):>5}"
            + (f" {_fmt(m.get('median_seed_distance_rad'), digits=2):>6}" if seeded else ""))
    if "comparison_analytic" in report:
        c = report["comparison_analytic"]
        lines.append(f"mace_refine vs analytic_restarts: time ratio {c['time_ratio']:.2f}, "
                     f"diversity ratio {c['diversity_ratio']:.2f}, K-success "
                     f"{c['mace_k_success']:.2f} vs {c['tracik_k_success']:.2f}")
    if "comparison" in report:
        c = report["comparison"]
        lines.append(f"mace_refine vs tracik_restarts: time ratio {c['time_ratio']:.2f} (median "
                     f"over median), diversity ratio {c['diversity_ratio']:.2f}, K-success "
                     f"{c['mace_k_success']:.2f} vs {c['tracik_k_success']:.2f}")
    lines.append(f"succ: share of targets with >= 1 valid solution (PyBullet exact, within "
                 f"{report['config']['position_tolerance'] * 1e3:g} mm); succK: with K={k}; "
                 f"med/p90 s: time until K valid or give-up; 1st: time to the first valid one "
                 f"(MACE answers all at once); rot: mean orientation error; checks: exact "
                 f"collision checks per target (PyBullet's for the restarts, the service's "
                 f"backend for MACE); proj: median distance (rad, max-norm) from the prior's "
                 f"samples to their closed-form projections (full poses)"
                 + ("; seed d: median joint distance (rad) from the request's seed state to "
                    "the nearest valid answer" if seeded else ""))
    return "\n".join(lines)
