"""The paper's IK tables beside its figures: Table 2 (IK against MoveIt in the box scene, paper
Sec. 4.2 and Appendix B) run here, and Table 1 (:func:`.benchmark.run_table1`) printed the same
way.

Table 2, per target (a position inside the box scene's target region), three methods, each
answer judged by PyBullet (valid: within the limits, no collision) and float64 forward
kinematics (accuracy: hand-to-target distance):

- ``mace`` (the prior only, "for maximal speed"): ``batches`` batches of ``batch_size`` samples
  of the pretrained prior scored by S (Sec. 4.2: 0 on collision by the sphere model, else
  exp(-distance)); the best-scoring sample is the answer. Time: drawing and scoring.
- ``moveit``: MoveIt's IK with a standard initial position: TRAC-IK (5 ms per attempt) from the
  Panda's ready pose, then from uniform random seeds, each answer checked by PyBullet, until one
  valid solution or ``timeout_s``.
- ``mace_moveit``: the same prior batches, whose ``seeds`` best-scoring samples seed TRAC-IK in
  order of score (then random seeds) until one valid solution. Time: both.

What differs from the paper's set-up: there a GTX 1080 Ti, IsaacGym's collision checks and
MoveIt's own IK service; here this machine's CPU, the project's sphere checker (scores) and
PyBullet (judge), and TRAC-IK through ``pytracik`` with the hand's orientation left free
(:class:`.baselines.TracIKRestarts`, as MoveIt's ``position_only_ik``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..robot.spheres import CollisionWorld
from ..robot.kinematics import panda_urdf_path
from ..robot.scenes import Scene
from .adapter import IKAdapter
from .baselines import TracIKRestarts, TracIKRestartsConfig
from .benchmark import SolutionJudge, sample_targets

#: The paper's Table 2: method -> (time mean, std (s), accuracy mean, std (cm); None: < 1e-5)
PAPER_TABLE2 = {"mace": (0.106, 0.008, 1.92, 3.01), "moveit": (1.553, 1.103, None, None),
                "mace_moveit": (0.641, 0.925, None, None)}
#: The paper's Table 1 (wall scene, 10 targets): method -> (score mean, std, success mean, std)
PAPER_TABLE1 = {"prior": (0.129, 0.015, 0.132, 0.015), "mace": (0.937, 0.079, 0.941, 0.079),
                "is": (0.317, 0.121, 0.339, 0.122)}
TABLE2_METHODS = ("mace", "moveit", "mace_moveit")
#: rad, the Panda's ready pose: MoveIt's usual initial state
READY = np.array([0.0, -np.pi / 4, 0.0, -3 * np.pi / 4, 0.0, np.pi / 2, np.pi / 4])


@dataclass
class Table2Config:
    """Settings of :func:`run_table2` (the paper's: 20 batches of 4,096)."""

    num_targets: int = 20
    seed: int = 0
    batches: int = 20  #: prior batches per target
    batch_size: int = 4096  #: samples per batch
    seeds: int = 64  #: best-scoring samples that seed TRAC-IK (mace_moveit)
    timeout_s: float = 5.0  #: s, TRAC-IK's restarts give up after this
    attempt_s: float = 0.005  #: s, TRAC-IK's own timeout per call


def best_prior_samples(adapter: IKAdapter, position: np.ndarray, world: CollisionWorld,
                       batches: int, batch_size: int, keep: int,
                       generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The ``keep`` best of ``batches`` x ``batch_size`` samples of the pretrained prior at
    ``position`` by S (Sec. 4.2): ``(keep, 7)`` rad, best first, and their scores ``(keep,)``."""
    kin, spec = adapter.kin, adapter.spec
    target = spec.tensor(position)
    model = adapter.prior_at(target)
    best_q, best_s = None, None
    with torch.inference_mode():
        for _ in range(batches):
            q = model.sample(batch_size, generator)
            poses = kin.link_poses(q)
            err = torch.linalg.vector_norm(poses[:, kin.ee_index, :3, 3] - target, dim=-1)
            s = torch.where(adapter.checker.valid(q, world, poses=poses), torch.exp(-err), 0.0)
            if best_q is not None:
                q, s = torch.cat([best_q, q]), torch.cat([best_s, s])
            order = torch.argsort(s, descending=True)[:keep]
            best_q, best_s = q[order], s[order]
    return best_q.double().cpu().numpy(), best_s.double().cpu().numpy()


def run_table2(adapter: IKAdapter, scene: Scene, cfg: Table2Config,
               log: Callable[[str], None] = lambda _s: None) -> dict:
    """The Table 2 protocol of the module docstring: a JSON-ready dict (per method: time and
    accuracy, mean and std over targets, the share of valid answers, per-target records)."""
    targets = sample_targets(scene, cfg.num_targets, cfg.seed)
    judge = SolutionJudge(scene, position_tolerance=1e-4)
    world = CollisionWorld.from_obstacles(scene.obstacles, adapter.spec)
    with open(panda_urdf_path()) as f:
        urdf_text = f.read()
    tracik = TracIKRestarts(adapter.kin, urdf_text, judge.checker, TracIKRestartsConfig(
        num_solutions=1, timeout_s=cfg.timeout_s, attempt_s=cfg.attempt_s))
    rows = {m: [] for m in TABLE2_METHODS}

    def prior(i: int) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        q, _ = best_prior_samples(adapter, targets[i], world, cfg.batches, cfg.batch_size,
                                  cfg.seeds, adapter.spec.generator(cfg.seed * 100003 + i))
        return q, time.perf_counter() - t0

    def record(method: str, i: int, q: np.ndarray | None, elapsed: float) -> None:
        answer = np.zeros((0, 7)) if q is None else q[None]
        valid, free, err, _ = judge.judge(answer, targets[i])
        rows[method].append(dict(time_s=elapsed, found=q is not None,
                                 collision_free=bool(free.all()) and q is not None,
                                 error_m=float(err[0]) if q is not None else None))

    try:
        prior(0)  # warm-up
        for i, target in enumerate(targets):
            q, elapsed = prior(i)
            record("mace", i, q[0], elapsed)
            rng = np.random.default_rng([cfg.seed, i])
            t0 = time.perf_counter()
            out = tracik.solve(target, rng, seeds=READY[None])
            record("moveit", i, out.solutions[0] if len(out.solutions) else None,
                   time.perf_counter() - t0)
            t0 = time.perf_counter()
            q, _ = prior(i)
            out = tracik.solve(target, rng, seeds=q)
            record("mace_moveit", i, out.solutions[0] if len(out.solutions) else None,
                   time.perf_counter() - t0)
        log(f"[{scene.name}] table2: done")
    finally:
        judge.close()
    methods = {}
    for method, r in rows.items():
        times = np.array([x["time_s"] for x in r])
        errors = np.array([x["error_m"] for x in r if x["error_m"] is not None])
        methods[method] = dict(
            time_mean_s=float(times.mean()), time_std_s=float(times.std()),
            accuracy_mean_m=float(errors.mean()) if errors.size else None,
            accuracy_std_m=float(errors.std()) if errors.size else None,
            found=float(np.mean([x["found"] for x in r])),
            collision_free=float(np.mean([x["collision_free"] for x in r])), per_target=r)
    return dict(protocol="table2", scene=scene.name, config=cfg.__dict__,
                targets=targets.round(9).tolist(), methods=methods, paper=PAPER_TABLE2)


def _pm(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 3) -> str:
    """``mean ± std`` (times ``scale``), in scientific notation when below the last digit;
    None: the paper's "< 1e-5"."""
    if mean is None:
        return "< 1e-5"
    form = f".{digits}f" if abs(mean * scale) >= 10 ** -digits else ".1e"
    return f"{mean * scale:{form}} ± {std * scale:{form}}"


def format_table2(report: dict) -> str:
    """Our Table 2 beside the paper's."""
    cfg = report["config"]
    lines = [f"Paper Table 2 (IK against MoveIt, {report['scene']} scene, "
             f"{len(report['targets'])} targets; prior: {cfg['batches']} batches of "
             f"{cfg['batch_size']}, MoveIt: TRAC-IK restarts, {cfg['timeout_s']:g} s timeout)",
             f"{'method':<12} {'time (s), here':>18} {'paper':>15} {'accuracy (cm), here':>20} "
             f"{'paper':>13} {'free':>5}"]
    for method, m in report["methods"].items():
        t, ts, a, s = PAPER_TABLE2[method]
        here_acc = (_pm(m["accuracy_mean_m"], m["accuracy_std_m"], 100.0, 2)
                    if m["accuracy_mean_m"] is not None else "none found")
        lines.append(f"{method:<12} {_pm(m['time_mean_s'], m['time_std_s']):>18} "
                     f"{_pm(t, ts):>15} {here_acc:>20} {_pm(a, s, digits=2):>13} "
                     f"{m['collision_free']:>5.2f}")
    lines.append("free: share of answers PyBullet calls collision-free (none found counts as "
                 "not free). Set-up there: GTX 1080 Ti, IsaacGym, MoveIt; here: this CPU, the "
                 "project's sphere scores, PyBullet, TRAC-IK via pytracik.")
    return "\n".join(lines)


def format_table1_beside_paper(report: dict) -> str:
    """The Table 1 protocol's report (:func:`.benchmark.run_table1`) beside the paper's."""
    lines = [f"Paper Table 1 ({report['scene']} scene, {len(report['targets'])} targets)",
             f"{'method':<8} {'score, here':>16} {'paper':>15} {'success, here':>16} "
             f"{'paper':>15}"]
    for method, m in report["methods"].items():
        s, ss, v, vs = PAPER_TABLE1[method]
        lines.append(f"{method:<8} {_pm(m['score'], m['score_std']):>16} {_pm(s, ss):>15} "
                     f"{_pm(m['valid_fraction'], m['valid_fraction_std']):>16} "
                     f"{_pm(v, vs):>15}")
    return "\n".join(lines)
