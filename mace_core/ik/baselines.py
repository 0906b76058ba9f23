"""The methods the IK benchmark compares MACE with, and what one method answers for one target.

- :class:`TracIKRestarts`: MoveIt's IK protocol with TRAC-IK (random restarts, each answer
  checked exactly), position-only or full pose.
- :class:`AnalyticRestarts`: the Panda's closed form from uniform q7, each answer checked
  exactly (full pose): the floor.

Every method returns a :class:`TargetOutcome`; :mod:`.benchmark` judges and summarizes them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InvalidRequestError
from ..robot.closed_form_ik import PandaClosedFormIK
from ..robot.kinematics import RobotKinematics
from ..robot.pybullet_checker import PyBulletCollisionChecker
from ..robot.rotations import matrix_to_quaternion_xyzw
from .refinement import DLSRefiner, IKTarget, RefinementConfig, pose_errors

#: How :class:`TracIKRestarts` picks the orientation it asks TRAC-IK for.
TRACIK_ORIENTATIONS = ("free", "seed", "jacobian")


class _Kept:
    """The solutions a restart protocol keeps for one target, and its clock: distinct ones
    (``min_joint_distance`` apart, max-norm) until ``wanted`` or ``timeout_s``."""

    def __init__(self, wanted: int, timeout_s: float, min_joint_distance: float):
        self.wanted, self.min_joint_distance = wanted, min_joint_distance
        self.solutions: list[np.ndarray] = []
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + timeout_s
        self.t_first = math.inf

    @property
    def going(self) -> bool:
        """Fewer than ``wanted`` kept and time left."""
        return len(self.solutions) < self.wanted and time.perf_counter() < self.deadline

    def distinct(self, q: np.ndarray) -> bool:
        return all(np.abs(q - other).max() >= self.min_joint_distance
                   for other in self.solutions)

    def offer(self, candidates: np.ndarray, checker: PyBulletCollisionChecker) -> int:
        """Check the distinct rows of ``candidates (n, 7)`` one at a time and keep the valid
        ones, until enough are kept or time is up; returns the checks spent."""
        checks = 0
        for q in candidates:
            if not self.going:
                break
            if self.distinct(q):
                checks += 1
                if bool(checker.valid(q[None])[0]):
                    self.keep(q)
        return checks

    def keep(self, q: np.ndarray) -> None:
        self.solutions.append(q)
        if len(self.solutions) == 1:
            self.t_first = time.perf_counter() - self.t0

    def outcome(self, **counts) -> "TargetOutcome":
        elapsed = time.perf_counter() - self.t0
        empty = np.zeros(0, dtype=bool)
        return TargetOutcome(solutions=np.asarray(self.solutions, dtype=float).reshape(-1, 7),
                             time_s=elapsed, time_first_s=min(self.t_first, elapsed),
                             valid=empty, collision_free=empty, position_error=np.zeros(0),
                             **counts)


@dataclass
class TargetOutcome:
    """One method's answer to one target, judged by the ground truth."""

    solutions: np.ndarray  #: (S, 7) rad, returned configurations, the method's order
    time_s: float  #: s, wall time of the request (K valid solutions, or gave up)
    time_first_s: float  #: s, until the first valid solution (= time_s when answers come at once)
    valid: np.ndarray  #: (S,) bool, collision-free (PyBullet) and within the position tolerance
    collision_free: np.ndarray  #: (S,) bool, PyBullet: within limits, no collision
    position_error: np.ndarray  #: (S,) m
    #: exact collision checks spent: PyBullet's for the restart baselines (inside their loop),
    #: the service's exact checker's for MACE (None: not counted)
    checks: int | None = None
    orientation_error: np.ndarray = field(default_factory=lambda: np.zeros(0))  #: (S,) rad
    #: MACE, full poses: median max-norm joint distance (rad) from the prior's samples to their
    #: closed-form projections (those with one), and the share that has one
    projection_distance: float | None = None
    projectable_fraction: float | None = None
    valid_fraction_prior: float | None = None  #: MACE: share of prior samples valid (spheres)
    valid_fraction_adapted: float | None = None  #: MACE: share of adapted samples valid
    iterations_run: int | None = None  #: MACE iterations (None for TRAC-IK)
    attempts: int | None = None  #: TRAC-IK calls (None for MACE)
    converged: int | None = None  #: TRAC-IK calls that reached the target (valid or not)
    stage_times: dict | None = None  #: MACE: s per stage (sampling, adaptation, refinement, total)
    #: rad, Euclidean joint distance from the request's seed state to the nearest valid
    #: solution (None: no seed state, or none valid)
    seed_distance: float | None = None

    @classmethod
    def at_once(cls, solutions: np.ndarray, elapsed_s: float, **figures) -> "TargetOutcome":
        """A method's answer that comes all at once after ``elapsed_s`` (a MACE request):
        ``solutions (S, 7)``, the judge's fields left empty."""
        empty = np.zeros(0, dtype=bool)
        return cls(solutions=np.asarray(solutions, dtype=float).reshape(-1, 7),
                   time_s=elapsed_s, time_first_s=elapsed_s, valid=empty, collision_free=empty,
                   position_error=np.zeros(0), **figures)


# ----------------------------------------------------------------------------------------------
# TRAC-IK restarts (MoveIt's protocol)
# ----------------------------------------------------------------------------------------------

class _NumpyChain:
    """Forward kinematics and position Jacobian of one configuration in numpy (float64).

    Used by the TRAC-IK baseline for its per-attempt position-only steps, where torch's per-call
    overhead on a batch of one would dominate.
    """

    def __init__(self, kin: RobotKinematics):
        self.steps = []  # (origin (4, 4), axis (3,) or None, column of q or -1)
        for joint in kin.urdf.path_to_root(kin.ee_link):
            col = kin.joint_names.index(joint.name) if joint.name in kin.joint_names else -1
            self.steps.append((joint.origin, joint.axis, col))
        # The URDF's own (double) limits: kin.lower may be float32-rounded past them.
        self.lower = np.array([kin.urdf.joints[n].lower for n in kin.joint_names])
        self.upper = np.array([kin.urdf.joints[n].upper for n in kin.joint_names])

    @staticmethod
    def _rot(axis: np.ndarray, angle: float) -> np.ndarray:
        x, y, z = axis
        c, s = math.cos(angle), math.sin(angle)
        t = 1.0 - c
        return np.array([[t * x * x + c, t * x * y - s * z, t * x * z + s * y],
                         [t * x * y + s * z, t * y * y + c, t * y * z - s * x],
                         [t * x * z - s * y, t * y * z + s * x, t * z * z + c]])

    def fk(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """End-effector pose ``(4, 4)`` and position Jacobian ``(3, 7)`` of ``q (7,)``."""
        pose = np.eye(4)
        axes, origins = np.zeros((len(q), 3)), np.zeros((len(q), 3))
        for origin, axis, col in self.steps:
            pose = pose @ origin
            if col >= 0:
                axes[col] = pose[:3, :3] @ axis
                origins[col] = pose[:3, 3]
                rot = np.eye(4)
                rot[:3, :3] = self._rot(axis, float(q[col]))
                pose = pose @ rot
        jac = np.cross(axes, pose[:3, 3] - origins).T
        return pose, jac

    def position_steps(self, q: np.ndarray, target: np.ndarray, steps: int,
                       damping: float = 1e-2, max_step: float = 0.3) -> tuple[np.ndarray, ...]:
        """``steps`` damped least-squares steps on the position only; returns (q, pose)."""
        pose, jac = self.fk(q)
        for _ in range(steps):
            err = target - pose[:3, 3]
            dq = jac.T @ np.linalg.solve(jac @ jac.T + damping ** 2 * np.eye(3), err)
            dq *= min(1.0, max_step / max(np.abs(dq).max(), 1e-12))
            q = np.clip(q + dq, self.lower, self.upper)
            pose, jac = self.fk(q)
        return q, pose


#: Links and joints :func:`with_free_wrist` appends after the end effector.
FREE_WRIST_LINKS = ("mace_free_rx", "mace_free_ry", "mace_free_tip")


def with_free_wrist(urdf_text: str, ee_link: str) -> str:
    """URDF text with a virtual ball joint at the end effector's origin.

    Three zero-length revolute joints (x, y, z axes, limits ±π) lead from ``ee_link`` to
    ``mace_free_tip``. A full-pose target for the tip then constrains the end effector's position
    only: the virtual joints absorb any orientation. This is how a position-only target is posed
    to a solver that takes full poses only.
    """
    parents = (ee_link,) + FREE_WRIST_LINKS[:-1]
    xml = [f'<link name="{name}"/>' for name in FREE_WRIST_LINKS]
    for k, (axis, parent, child) in enumerate(zip(("1 0 0", "0 1 0", "0 0 1"), parents,
                                                  FREE_WRIST_LINKS)):
        xml.append(f'<joint name="mace_free_joint{k}" type="revolute"><parent link="{parent}"/>'
                   f'<child link="{child}"/><origin xyz="0 0 0" rpy="0 0 0"/>'
                   f'<axis xyz="{axis}"/><limit lower="{-math.pi:.6f}" upper="{math.pi:.6f}" '
                   f'effort="0" velocity="0"/></joint>')
    head, sep, tail = urdf_text.rpartition("</robot>")
    if not sep:
        raise InvalidRequestError("URDF text has no closing </robot> tag")
    return head + "\n".join(xml) + "\n" + sep + tail


@dataclass
class TracIKRestartsConfig:
    """Settings of :class:`TracIKRestarts`."""

    num_solutions: int = 8  #: K distinct valid solutions wanted
    timeout_s: float = 1.0  #: s, give up after this
    attempt_s: float = 0.005  #: s, TRAC-IK's own timeout per call
    epsilon: float = 1e-5  #: TRAC-IK convergence tolerance
    orientation: str = "free"  #: "free", "seed" or "jacobian" (see TracIKRestarts)
    jacobian_steps: int = 2  #: position-only steps before reading the orientation ("jacobian")
    min_joint_distance: float = 0.1  #: rad (max-norm); closer answers count once


class TracIKRestarts:
    """MoveIt's IK protocol with TRAC-IK: random restarts, each answer checked exactly.

    Per attempt: a seed q0 uniform in the joint limits; TRAC-IK (``Speed``, ``attempt_s``) from it;
    the answer is checked with the exact PyBullet checker inside the timed loop; valid answers
    that differ from the ones kept by at least ``min_joint_distance`` are kept; stop at K or at
    ``timeout_s``.

    Position-only targets: MoveIt's TRAC-IK plugin in ``position_only_ik`` mode leaves the
    orientation free through TRAC-IK's tolerance bounds (rotational bounds at infinity). The
    ``pytracik`` wheel binds ``TRAC_IK::CartToJnt`` with bounds only for KDL types it does not
    expose to Python, so every call is a full pose. Three ways to pose the target:

    - ``"free"`` (default): TRAC-IK solves for a chain extended by a virtual ball joint at the
      end effector (:func:`with_free_wrist`), asked for the target position with the hand
      orientation of FK(q0), seeded at (q0, 0, 0, 0). The virtual joints absorb any orientation,
      so the first seven joints solve the position-only problem, as with infinite rotational
      bounds (zero orientation error at the seed; the pseudo-inverse spreads the orientation
      correction over the arm's joints and the virtual ones alike).
    - ``"seed"``: the 7-joint chain asked for the hand orientation of FK(q0), seeded at q0.
    - ``"jacobian"``: ``jacobian_steps`` damped least-squares steps on the position only from q0
      give q1; the 7-joint chain is asked for FK(q1)'s orientation, seeded at q1 (the time of the
      steps counts).
    """

    def __init__(self, kin: RobotKinematics, urdf_text: str, checker: PyBulletCollisionChecker,
                 config: TracIKRestartsConfig):
        import pytracik

        if config.orientation not in TRACIK_ORIENTATIONS:
            raise InvalidRequestError(f"orientation must be one of {TRACIK_ORIENTATIONS}, "
                                      f"got '{config.orientation}'")
        self._tracik = pytracik
        self.config = config
        self.checker = checker
        self.chain = _NumpyChain(kin)
        lower, upper = self.chain.lower.tolist(), self.chain.upper.tolist()
        tip = kin.ee_link
        self._extra = 0
        if config.orientation == "free":
            urdf_text = with_free_wrist(urdf_text, kin.ee_link)
            tip = FREE_WRIST_LINKS[-1]
            self._extra = len(FREE_WRIST_LINKS)
            lower += [-math.pi] * self._extra
            upper += [math.pi] * self._extra
        self.solver = pytracik.TRAC_IK(kin.base_link, tip, urdf_text, config.attempt_s,
                                       config.epsilon, pytracik.Speed)
        # Without this call the wheel reads every joint limit as zero.
        pytracik.set_joint_limits(self.solver, lower, upper)

    def _pose_attempt(self, q0: np.ndarray, position: np.ndarray) -> tuple[np.ndarray, ...]:
        """TRAC-IK seed and target quaternion (x, y, z, w) for one attempt from ``q0 (7,)``."""
        cfg = self.config
        if cfg.orientation == "free":
            seed = np.concatenate([q0, np.zeros(self._extra)])
            rot = self._tracik.fk(self.solver, seed)[:3, :3]
        elif cfg.orientation == "seed":
            seed, rot = q0, self._tracik.fk(self.solver, q0)[:3, :3]
        else:
            seed, pose = self.chain.position_steps(q0, position, cfg.jacobian_steps)
            rot = pose[:3, :3]
        return seed, matrix_to_quaternion_xyzw(rot)

    def solve(self, position: np.ndarray, rng: np.random.Generator,
              quat: np.ndarray | None = None,
              seeds: np.ndarray | None = None) -> TargetOutcome:
        """Run the protocol for one target ``(3,)``, or with ``quat`` (x, y, z, w) for that
        full pose (build it with ``orientation="seed"``: the 7-joint chain, seeded at q0);
        ``seeds (S, 7)``: the first attempts' q0, in order, before the random ones;
        ``valid`` etc. are left for the judge."""
        cfg, chain, ik = self.config, self.chain, self._tracik.ik
        position = np.asarray(position, dtype=float)
        kept = _Kept(cfg.num_solutions, cfg.timeout_s, cfg.min_joint_distance)
        attempts = converged = 0
        while kept.going:
            q0 = (np.asarray(seeds[attempts], dtype=float)
                  if seeds is not None and attempts < len(seeds)
                  else rng.uniform(chain.lower, chain.upper))
            seed, asked = (q0, quat) if quat is not None else self._pose_attempt(q0, position)
            out = ik(self.solver, seed, *position, *asked)
            attempts += 1
            if out[0] < 0:
                continue
            converged += 1
            q = np.asarray(out[1:8], dtype=float)
            if bool(self.checker.valid(q[None])[0]) and kept.distinct(q):
                kept.keep(q)
        return kept.outcome(attempts=attempts, converged=converged, checks=converged)


# ----------------------------------------------------------------------------------------------
# Closed-form restarts (the floor for full-pose targets)
# ----------------------------------------------------------------------------------------------

class AnalyticRestarts:
    """The Panda's closed form from uniform q7: the floor of full-pose IK on this robot.

    Per batch: ``batch`` values of q7 uniform in joint 7's limits, every branch of the target
    pose for each (:class:`~mace_core.robot.closed_form_ik.PandaClosedFormIK`); the candidates
    are checked with the exact PyBullet checker one at a time, inside the timed loop, and kept
    when they differ from the kept ones by ``min_joint_distance``; stop at K or ``timeout_s``.
    """

    def __init__(self, kin: RobotKinematics, checker: PyBulletCollisionChecker,
                 num_solutions: int = 8, timeout_s: float = 1.0, batch: int = 64,
                 min_joint_distance: float = 0.1):
        self.closed_form = PandaClosedFormIK(kin)
        self.checker = checker
        self.num_solutions, self.timeout_s, self.batch = num_solutions, timeout_s, batch
        self.min_joint_distance = min_joint_distance

    def solve(self, pose: np.ndarray, rng: np.random.Generator) -> TargetOutcome:
        """Run the protocol for one target ``pose (4, 4)`` (end-effector link, base frame)."""
        cf = self.closed_form
        lo, hi = float(cf.lower[6]), float(cf.upper[6])
        target = torch.as_tensor(pose, dtype=torch.float64)
        kept = _Kept(self.num_solutions, self.timeout_s, self.min_joint_distance)
        attempts = checks = 0
        while kept.going:
            q7 = torch.as_tensor(rng.uniform(lo, hi, self.batch), dtype=torch.float64)
            sols, ok = cf.solve(target.expand(self.batch, 4, 4), q7)
            attempts += self.batch
            checks += kept.offer(sols[ok].numpy(), self.checker)
        return kept.outcome(attempts=attempts, converged=checks, checks=checks)


# ----------------------------------------------------------------------------------------------
# Batched damped least squares from random restarts
# ----------------------------------------------------------------------------------------------

class BatchedRestarts:
    """Batched pseudo-inverse IK from random restarts: what a GPU IK library does (cuRobo's
    and pytorch_kinematics' seeds), on the project's own kinematics.

    Per batch: ``batch`` seeds uniform in the joint limits, at most ``iterations`` damped
    least-squares steps on the full pose (:class:`~mace_core.ik.refinement.DLSRefiner`, the
    service's own step: damping, step cap, orientation weight); the rows within the position
    and orientation tolerances are checked with the exact PyBullet checker one at a time, inside
    the timed loop, and kept when they differ from the kept ones by ``min_joint_distance``; stop
    at K or ``timeout_s``. Tuned on this 2-core CPU (one thread; box and cabinet, 12 pose
    targets each, variants in turns on each target), median time to K = 8: batch 32 / 64 / 128
    x 20 / 30 / 50 iterations gave 29-65 ms except 128 x 20 (15-18 ms); then 128 x 15 gave
    11-15 ms against 128 x 20 15-20, 256 x 15 16-20, 512 x 15 26-31; 128 x 12 and x 10, 96 x
    12 and 192 x 12 were no better across two runs. Fewer steps fail more seeds, more cost
    more per batch: 128 x 15 is the default.
    """

    def __init__(self, kin: RobotKinematics, checker: PyBulletCollisionChecker,
                 num_solutions: int = 8, timeout_s: float = 1.0, batch: int = 128,
                 iterations: int = 15, min_joint_distance: float = 0.1,
                 position_tolerance: float = 1e-4, orientation_tolerance: float = 1e-3):
        self.kin, self.checker = kin, checker
        self.refiner = DLSRefiner(kin, RefinementConfig(max_iterations=iterations))
        self.num_solutions, self.timeout_s, self.batch = num_solutions, timeout_s, batch
        self.min_joint_distance = min_joint_distance
        self.position_tolerance = position_tolerance
        self.orientation_tolerance = orientation_tolerance

    def solve(self, pose: np.ndarray, generator) -> TargetOutcome:
        """Run the protocol for one target ``pose (4, 4)`` (end-effector link, base frame);
        ``generator``: a torch generator (the seeds are drawn on the kinematics' device)."""
        kin = self.kin
        target = IKTarget(position=kin.spec.tensor(pose[:3, 3]),
                          rotation=kin.spec.tensor(pose[:3, :3]),
                          orientation_tolerance=self.orientation_tolerance)
        kept = _Kept(self.num_solutions, self.timeout_s, self.min_joint_distance)
        attempts = checks = 0
        while kept.going:
            q = self.refiner.refine(kin.sample_uniform(self.batch, generator), target)
            attempts += self.batch
            pos_err, rot_err = pose_errors(kin, q, target)
            on = (pos_err <= self.position_tolerance) & (rot_err <= self.orientation_tolerance)
            checks += kept.offer(q[on].detach().cpu().double().numpy(), self.checker)
        return kept.outcome(attempts=attempts, converged=checks, checks=checks)
