"""Exact refinement of sampled IK candidates (the paper's "MACE + MoveIt", Sec. 4.2 / Table 2).

MACE's samples land within centimetres of the target; an exact solver seeded from them closes
the gap to 0.1 mm in a few steps while staying near the (collision-free) seed. Two solvers ship
in the core: a batched damped least squares in torch, and TRAC-IK (the solver behind MoveIt's
TRAC-IK kinematics plugin) through ``pytracik``. Others (MoveIt's ``/compute_ik``) plug in
through the :class:`Refiner` protocol from outside the core.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from ..array_ops import ArrayOps
from ..deadline import Deadline
from ..errors import InvalidRequestError
from ..robot.closed_form_ik import FREE_JOINT, PandaClosedFormIK
from ..robot.kinematics import RobotKinematics, damped_least_squares
from ..robot.rotations import geodesic_distance, matrix_to_quaternion_xyzw


@dataclass
class RefinementConfig:
    """Settings shared by the refiners."""

    max_iterations: int = 25  #: DLS iterations at most (seeds stuck longer rarely converge)
    damping: float = 1e-2  #: λ of (J Jᵀ + λ² I)⁻¹, m
    max_step: float = 0.3  #: largest joint change per DLS iteration, rad
    position_tolerance: float = 1e-4  #: m, a refined solution must reach the target this closely
    orientation_weight: float = 0.2  #: m per rad when orientation is asked for
    tracik_timeout: float = 0.005  #: s per TRAC-IK call (MoveIt's default attempt time)
    avoidance_gain: float = 0.5  #: β of the null-space step that pushes links out of obstacles
    #: plain DLS steps (no collision term) after each step that has one, and before the first:
    #: the null-space move is first order, and these take the hand back to the target before
    #: the next collision test
    corrections: int = 1
    #: m, summed sphere penetration below which a row on the target is put to the exact check
    #: (``clear``); deeper rows are left to the penalty (in the cabinet every row the exact
    #: check calls clear was below 0.1, and two thirds of the rows above it are not asked)
    exact_check_cost_m: float = 0.1


@dataclass
class IKTarget:
    """Where the end effector must go, in the robot's base frame."""

    position: torch.Tensor  #: (3,) m
    rotation: torch.Tensor | None = None  #: (3, 3) target orientation, or None for position-only
    orientation_tolerance: float = 0.0  #: rad, used when ``rotation`` is given

    @functools.cached_property
    def pose_numpy(self) -> np.ndarray:
        """``(4, 4)`` float64 on the host: the target pose (rotation the identity when none
        is given), made once per target for the host's closed form and answer figures."""
        pose = np.eye(4)
        pose[:3, 3] = self.position.detach().cpu().numpy()
        if self.rotation is not None:
            pose[:3, :3] = self.rotation.detach().cpu().numpy()
        return pose


def pose_errors(kin: RobotKinematics, q: torch.Tensor, target: IKTarget,
                poses: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Position (m) and orientation (rad; 0 if position-only) errors of ``q (B, 7)``: ``(B,)``,
    from its link poses ``(B, L, 4, 4)`` when given."""
    ee = kin.ee_pose(q) if poses is None else poses[:, kin.ee_index]
    pos_err = torch.linalg.vector_norm(ee[:, :3, 3] - target.position, dim=-1)
    if target.rotation is None:
        return pos_err, torch.zeros_like(pos_err)
    return pos_err, geodesic_distance(target.rotation, ee[:, :3, :3])


#: Collision cost of configurations ``(B, 7)`` with their link poses ``(B, L, 4, 4)``: returns the
#: cost ``(B,)`` (0 when clear) and its gradient with respect to the joints ``(B, 7)``.
PenaltyFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
#: An exact verdict on configurations ``(n, 7)``: ``(n,)`` bool, True where clear.
ClearFn = Callable[[torch.Tensor], torch.Tensor]


class Refiner(Protocol):
    """An exact IK solver seeded from candidate configurations."""

    def refine(self, q0: torch.Tensor, target: IKTarget,
               penalty: PenaltyFn | None = None, deadline: Deadline | None = None,
               needed: int | None = None, clear: ClearFn | None = None) -> torch.Tensor:
        """Refine seeds ``(B, 7)`` towards ``target``: ``(B, 7)`` (failed rows unchanged), or
        for a solver that finds several answers per seed (closed form), ``(B', 7)``.

        ``penalty`` gives a collision cost and its gradient (see :data:`PenaltyFn`) that solvers
        able to use it (DLS) descend in the null space of the end-effector task; ``clear``, an
        exact verdict, may end that descent for rows it calls clear (the penalty's model is
        conservative). No work starts after ``deadline`` (nor once it is cancelled). A solver
        may stop once ``needed`` rows are solved (the caller wants no more).
        """


class DLSRefiner:
    """Batched damped least squares on the end-effector pose, clamped to the joint limits.

    With a collision ``penalty`` each step also descends it in the null space of the task,
    dq = J⁺ e − β (I − J⁺ J) ∇q penalty: the Panda's 4 redundant degrees of freedom (position
    only) move links out of obstacles while the hand keeps its course to the target.
    """

    def __init__(self, kin: RobotKinematics, config: RefinementConfig):
        self.kin = kin
        self.config = config

    def _task(self, q: torch.Tensor, target: IKTarget
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Link poses ``(B, L, 4, 4)``, task error ``(B, m)``, task Jacobian ``(B, m, 7)``, error
        norm ``(B,)`` and converged flags ``(B,)`` of ``q (B, 7)`` (m = 3, or 6 with a
        rotation, its rows weighted by ``orientation_weight``)."""
        cfg, kin = self.config, self.kin
        poses = kin.link_poses(q)
        ee = poses[:, kin.ee_index]
        err = target.position - ee[:, :3, 3]  # (B, 3)
        jac = kin.jacobian(q, poses)  # (B, 6, 7)
        norm = torch.linalg.vector_norm(err, dim=-1)  # (Tensor.norm: a Python wrapper)
        done = norm < 0.1 * cfg.position_tolerance
        if target.rotation is None:
            return poses, err, jac[:, :3], norm, done
        rel = target.rotation @ ee[:, :3, :3].transpose(1, 2)
        w = torch.stack([rel[:, 2, 1] - rel[:, 1, 2], rel[:, 0, 2] - rel[:, 2, 0],
                         rel[:, 1, 0] - rel[:, 0, 1]], -1) * 0.5
        err = torch.cat([err, cfg.orientation_weight * w], -1)
        jac = torch.cat([jac[:, :3], cfg.orientation_weight * jac[:, 3:]], 1)
        return (poses, err, jac, torch.linalg.vector_norm(err, dim=-1),
                done & (torch.linalg.vector_norm(w, dim=-1) < 1e-4))

    def _step(self, q: torch.Tensor, dq: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
        """``q + dq`` with the largest joint change cut to ``max_step``, within the joint limits;
        rows flagged ``frozen (B,)`` stay."""
        scale = (self.config.max_step / dq.abs().amax(-1, keepdim=True).clamp_min(1e-12)).clamp(
            max=1.0)
        return torch.where(frozen.unsqueeze(-1), q,
                           (q + dq * scale).clamp(self.kin.lower, self.kin.upper))

    def refine(self, q0: torch.Tensor, target: IKTarget,
               penalty: PenaltyFn | None = None, deadline: Deadline | None = None,
               needed: int | None = None, clear: ClearFn | None = None) -> torch.Tensor:
        """At most ``max_iterations`` DLS steps on ``q0 (B, 7)``; converged rows stop moving.

        With a ``penalty``, each step that descends it is followed (and the first is preceded)
        by ``corrections`` plain DLS steps, so that the next test of convergence and collision
        sees the hand back on the target (Newton's quadratic convergence instead of the drift
        the avoidance adds).
        A row on the target that the penalty still flags is also done when ``clear`` calls it
        clear: the penalty's spheres are conservative (and counted from a margin), and in
        clutter most rows an exact check calls clear never satisfy them.
        No step starts after ``deadline`` (or its cancel); the loop ends once
        ``needed`` rows have converged clear of obstacles."""
        cfg, kin = self.config, self.kin
        q = q0.clone().clamp(kin.lower, kin.upper)
        prev = torch.full(q.shape[:1], math.inf, dtype=q.dtype, device=q.device)
        cleared = torch.zeros(q.shape[:1], dtype=torch.bool, device=q.device)  # by ``clear``
        with torch.no_grad():
            if penalty is not None:  # seeds centimetres off: the first collision test is
                # worth more once they are near the target
                q = self._correct(q, target, torch.zeros_like(prev, dtype=torch.bool))
            for it in range(cfg.max_iterations):
                if deadline is not None and deadline.expired():
                    break
                poses, err, jac, norm, done = self._task(q, target)
                grad = None
                if penalty is not None:
                    cost, grad = penalty(q, poses)
                    blocked = done & (cost > 0) & (cost < cfg.exact_check_cost_m) & ~cleared
                    done = done & ((cost <= 0) | cleared)
                    if clear is not None and bool(blocked.any()):
                        rows = blocked.nonzero().squeeze(1)
                        verdict = clear(q[rows])
                        done[rows] = verdict
                        cleared[rows] = verdict  # frozen from now on: never asked again
                # A row that stopped improving (stuck at a limit or a singularity) is given up.
                stalled = (norm > 0.9 * prev) if it >= 8 else torch.zeros_like(done)
                if bool((done | stalled).all()) or (
                        needed is not None and int(done.sum()) >= needed):
                    break
                prev = norm
                if grad is None:
                    dq = damped_least_squares(jac, err.unsqueeze(-1), cfg.damping).squeeze(-1)
                else:  # plus the null-space projection of the collision gradient
                    rhs = torch.stack([err, (jac @ grad.unsqueeze(-1)).squeeze(-1)], -1)
                    steps = damped_least_squares(jac, rhs, cfg.damping)  # (B, 7, 2)
                    dq = steps[..., 0] - cfg.avoidance_gain * (grad - steps[..., 1])
                q = self._step(q, dq, done)
                if grad is not None:
                    q = self._correct(q, target, done)
        return q

    def _correct(self, q: torch.Tensor, target: IKTarget, frozen: torch.Tensor) -> torch.Tensor:
        """``corrections`` plain DLS steps on ``q (B, 7)`` (rows flagged ``frozen`` stay)."""
        for _ in range(self.config.corrections):
            _, err, jac, _, _ = self._task(q, target)
            dq = damped_least_squares(jac, err.unsqueeze(-1), self.config.damping).squeeze(-1)
            q = self._step(q, dq, frozen)
        return q


#: s, TRAC-IK's clock for its one attempt from a seed state: a converging attempt takes
#: 0.1 ms at the median (p90 0.2-0.6 ms; 0.4-0.9 ms near a joint limit, where it matters), a
#: failing one all of it; in turns on 20 pose targets per scene the attempt added 0.4-0.5 ms
#: to a seeded request, and took the median distance of the wall's near seeds to their
#: nearest solution from 0.731 to 0.657 rad
SEED_STATE_ATTEMPT_S = 0.001


class TracIKRefiner:
    """TRAC-IK seeded from each candidate (the solver behind MoveIt's TRAC-IK plugin).

    The ``pytracik`` wheel solves full poses only, while MoveIt's plugin in position-only mode
    leaves the orientation free (TRAC-IK's rotational bounds at infinity). For a position-only
    target each seed is therefore asked for the target position with an orientation known to be
    reachable near the seed: the hand orientation after a few batched position-only DLS steps
    from it. (The seed's own orientation fails for about a quarter of seeds 10 cm off: it is
    often unreachable at the target position.)
    """

    def __init__(self, kin: RobotKinematics, urdf_text: str, config: RefinementConfig):
        try:
            import pytracik
        except ImportError as exc:  # pragma: no cover - pytracik is a declared dependency
            raise InvalidRequestError("refinement 'tracik' needs the pytracik package") from exc
        self._tracik = pytracik
        self.kin = kin
        self.config = config
        self._orienter = DLSRefiner(kin, RefinementConfig(max_iterations=8))
        # KDL warns on every start about the root link's inertia; the solver does not use it.
        urdf_text = re.sub(r"(<link\s+name=\"%s\"\s*>.*?)<inertial>.*?</inertial>"
                           % re.escape(kin.base_link), r"\1", urdf_text, count=1, flags=re.S)
        self._solver = pytracik.TRAC_IK(kin.base_link, kin.ee_link, urdf_text,
                                        config.tracik_timeout, 1e-5, pytracik.Speed)
        pytracik.set_joint_limits(self._solver, kin.lower.tolist(), kin.upper.tolist())
        #: the one attempt from a seed state, on a short clock (:meth:`solve_from_seed_state`)
        self._seed_solver = pytracik.TRAC_IK(kin.base_link, kin.ee_link, urdf_text,
                                             SEED_STATE_ATTEMPT_S, 1e-5, pytracik.Speed)
        pytracik.set_joint_limits(self._seed_solver, kin.lower.tolist(), kin.upper.tolist())

    def solve(self, seed: np.ndarray, position: np.ndarray,
              quat_xyzw: np.ndarray) -> np.ndarray | None:
        """One TRAC-IK call: seed ``(7,)``, target position ``(3,)``, orientation (x, y, z, w)."""
        out = self._tracik.ik(self._solver, seed, *position, *quat_xyzw)
        return out[1:] if out[0] >= 0 else None

    def solve_from_seed_state(self, seed: np.ndarray, pose: np.ndarray) -> np.ndarray | None:
        """One TRAC-IK attempt at the full ``pose (4, 4)`` from ``seed (7,)`` within
        :data:`SEED_STATE_ATTEMPT_S`: ``(7,)`` or None. Where a branch is within the joint
        limits for a thin band of q7 only (a joint near its limit), the closed form's q7 grid
        around a seed (:meth:`AnalyticRefiner.nearest_to`) may miss it, a local solver started
        near it does not."""
        out = self._tracik.ik(self._seed_solver, seed, *pose[:3, 3],
                              *matrix_to_quaternion_xyzw(pose[:3, :3]))
        return np.asarray(out[1:], dtype=float) if out[0] >= 0 else None

    def refine(self, q0: torch.Tensor, target: IKTarget,
               penalty: PenaltyFn | None = None, deadline: Deadline | None = None,
               needed: int | None = None, clear: ClearFn | None = None) -> torch.Tensor:
        """Refine each row of ``q0 (B, 7)``; rows TRAC-IK fails on come back unchanged.

        TRAC-IK knows no collision cost: ``penalty`` is ignored (results are re-checked), and so
        is ``needed`` (a solved row may still collide, so every seed is tried)."""
        seeds = q0.detach().cpu().double().numpy()
        if target.rotation is None:
            reachable = self._orienter.refine(q0, target, deadline=deadline)
            rots = self.kin.ee_pose(reachable)[:, :3, :3].detach().cpu().double().numpy()
        else:
            rots = np.broadcast_to(target.rotation.cpu().double().numpy(), (len(seeds), 3, 3))
        position = target.position.cpu().double().numpy()
        out = seeds.copy()
        for b in range(len(seeds)):  # TRAC-IK is a per-seed C++ call; B is small (seeds only)
            if deadline is not None and deadline.expired():
                break
            sol = self.solve(seeds[b], position, matrix_to_quaternion_xyzw(rots[b]))
            if sol is not None:
                out[b] = sol
        return torch.as_tensor(out, dtype=q0.dtype, device=q0.device)


#: rad, the offsets from a seed state's q7 at which :meth:`AnalyticRefiner.nearest_to` solves:
#: 0.05 apart within 0.4 of it, wider beyond (27 values, one batched solve)
NEAREST_Q7_OFFSETS_RAD = tuple(np.concatenate([
    np.linspace(-0.4, 0.4, 17), np.array([0.6, 0.8, 1.0, 1.3, 1.6]),
    -np.array([0.6, 0.8, 1.0, 1.3, 1.6])]).round(3).tolist())
#: rad, the offsets from the nearest of those at which :meth:`AnalyticRefiner.nearest_to` solves
#: again (between the grid's values, where a local solver from the seed converges)
NEAREST_Q7_POLISH_RAD = (-0.025, -0.0125, -0.00625, 0.00625, 0.0125, 0.025)


class AnalyticRefiner:
    """Full-pose solutions of the Panda in closed form (:mod:`mace_core.robot.closed_form_ik`).

    Each seed is projected: the pose asked for (the target orientation, or for a position-only
    target the seed's own hand orientation) is solved with the seed's q7, and every branch that
    exists within the joint limits is an answer (up to 8 per seed, exact to float64 precision):
    one batched solve gives the rounds several distinct candidates per seed, and the checks
    after it pick the collision-free ones. When the seeds give fewer than ``grid_below`` times
    the ``needed`` candidates, the answers at ``q7_grid`` values spread over joint 7's range
    (shifted from call to call by the seeds), all branches, come after the seeds': a reachable
    pose is not missed for the prior's sake. The grid is solved in the seeds' batch (one call:
    0.1-0.6 ms less per pose request than a second call when needed, measured in turns on box,
    wall and cabinet); its answers join the seeds' only when these are few (always joining
    measured 10-20 % slower, with the same answers found), else they are checked only once the
    seeds' run out (:meth:`candidate_lists`). No iteration: ``penalty`` and ``clear`` are
    unused.
    """

    def __init__(self, kin: RobotKinematics, closed_form: PandaClosedFormIK,
                 q7_grid: int = 16, grid_below: int = 4):
        self.kin, self.closed_form, self.grid_below = kin, closed_form, grid_below
        self._upper7 = float(closed_form.upper[6])
        # by array library, float64: the (G,) q7 values to fall back on
        grid = np.linspace(float(closed_form.lower[6]), self._upper7, q7_grid)
        self._grids = {"numpy": grid, "torch": torch.as_tensor(grid, device=kin.spec.device)}
        offsets, polish = np.asarray(NEAREST_Q7_OFFSETS_RAD), np.asarray(NEAREST_Q7_POLISH_RAD)
        self._offsets = {"numpy": offsets,
                         "torch": torch.as_tensor(offsets, device=kin.spec.device)}
        self._polish = {"numpy": polish, "torch": torch.as_tensor(polish, device=kin.spec.device)}
        self._lower7 = float(closed_form.lower[6])

    def _grid_for(self, seeds, ops: ArrayOps):
        """``(G,)`` q7 values spread over joint 7's range, shifted by ``seeds (B, 7)``."""
        grid = self._grids[ops.name]
        step = float(grid[1] - grid[0]) if grid.shape[0] > 1 else 0.0
        spin = float(seeds[:, 6].sum()) * 0.6180339887
        return ops.clip(grid + step * abs(spin - math.trunc(spin)), None, self._upper7)

    def project(self, q0: torch.Tensor, target: IKTarget
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every branch of the target pose at each seed's q7, branch by branch over the seeds
        (for a position target each seed's branches nearest first, the seed's own posture),
        and every branch at the q7 grid: ``(A, 7)`` and ``(G', 7)`` float64 tensors on
        ``q0``'s device (either may be empty).

        A full pose reads only each seed's q7: the order of the branches by their distance
        to the seed's other joints measured no better (20 pose targets x 2 per scene, in
        turns, median ms / mean exact checks: box 2.35 / 11 against 2.24 / 11, wall 2.28 / 15
        against 2.18 / 14, window 2.90 / 473 against 2.72 / 382, cabinet 3.46 / 24 against
        3.24 / 22; the same targets with all 8, the same diversity), so the prior need only
        draw q7 (:meth:`~.conditioned._ConditionedPrior.closed_form_seeds`). Its q7 does
        matter: uniform ones took 164 checks a cabinet target and 200 ms at the window's p90,
        against 24 and 13 ms."""
        ops = self.closed_form.ops_for(q0)
        return tuple(ops.tensor(a, q0) for a in self.project_arrays(q0, target))

    def project_arrays(self, q0: torch.Tensor, target: IKTarget):
        """:meth:`project` in the closed form's array library (NumPy on the CPU: a third of
        torch's time for a request's 16 seeds), float64."""
        cf = self.closed_form
        ops = cf.ops_for(q0)
        seeds = ops.asarray(q0)  # (B, 7)
        b = seeds.shape[0]
        grid = self._grid_for(seeds, ops)  # solved with the seeds, in one batch
        if target.rotation is not None:
            pose = (target.pose_numpy if ops.name == "numpy"
                    else torch.as_tensor(target.pose_numpy, device=q0.device))
            poses = ops.broadcast_to(pose, (b + grid.shape[0], 4, 4))
        else:  # the seed's own hand orientation
            pose = cf.forward(seeds, ops)  # a fresh array
            pose[:, :3, 3] = ops.asarray(target.position)
            poses = ops.concat([pose, ops.broadcast_to(pose[:1], (grid.shape[0], 4, 4))])
        sols, ok = cf.solve_arrays(poses, ops.concat([seeds[:, FREE_JOINT], grid]),
                                   ops)  # (B + G, 8, 7), (B + G, 8)
        more, more_ok = sols[b:], ok[b:]
        sols, ok = sols[:b], ok[:b]
        if target.rotation is None:  # each seed's branches, nearest first: the seed's own
            dist = ops.where(ok, ops.amax(ops.abs(sols - seeds[:, None]), -1), math.inf)
            order = dist.argsort(-1)
            sols, ok = ops.take_along(sols, order[..., None], 1), ops.take_along(ok, order, 1)
        # branch by branch over the seeds (each seed's first, then each one's second...):
        # checks taken in this order meet many q7 before many branches of one
        return sols.swapaxes(0, 1)[ok.T], more[more_ok]

    def nearest_to(self, seed: torch.Tensor, target: IKTarget):
        """The full pose's solutions nearest ``seed (7,)``, ordered by Euclidean joint distance
        from it, ``(A, 7)`` float64 in the closed form's array library: every branch at q7
        values around the seed's (:data:`NEAREST_Q7_OFFSETS_RAD`), then around the nearest of
        those (:data:`NEAREST_Q7_POLISH_RAD`). The nearest point of the pose's self-motion lies
        at some q7 near the seed's when the hand is near the pose (a local solver started at
        the seed finds it); far from it, the offsets widen the search (two batched solves: 27
        q7 values, up to 216 candidates, then 6)."""
        cf = self.closed_form
        ops = cf.ops_for(seed)
        start = ops.asarray(seed).reshape(-1)
        pose = (target.pose_numpy if ops.name == "numpy"
                else torch.as_tensor(target.pose_numpy, device=seed.device))
        found = self._solve_at(pose, self._offsets[ops.name] + float(start[FREE_JOINT]), ops)
        if found.shape[0]:
            nearest = found[int(ops.norm(found - start).argmin())]
            found = ops.concat([found, self._solve_at(
                pose, self._polish[ops.name] + float(nearest[FREE_JOINT]), ops)])
        return found[ops.norm(found - start).argsort()]

    def _solve_at(self, pose, q7, ops: ArrayOps):
        """Every solution of ``pose (4, 4)`` at the values ``q7 (G,)`` (clipped onto joint 7's
        limits): ``(A, 7)``."""
        q7 = ops.clip(q7, self._lower7, self._upper7)
        sols, ok = self.closed_form.solve_arrays(ops.broadcast_to(pose, (q7.shape[0], 4, 4)), q7,
                                                 ops)
        return sols[ok]

    def candidate_lists(self, q0: torch.Tensor, target: IKTarget, needed: int | None = None):
        """:meth:`project`'s answers in the order checks should take them, each ``(A, 7)``
        float64 in the closed form's array library (NumPy on the CPU: the exact checker's, no
        conversion): one list, the seeds' then the grid's, when the seeds give fewer than
        ``grid_below`` times ``needed`` (the checks' first chunk is spread over both); else the
        seeds' list, then the grid's to fall back on where those run out before ``needed``."""
        found, grid = self.project_arrays(q0, target)
        if found.shape[0] < self.grid_below * (needed or 1):
            return [self.closed_form.ops_for(q0).concat([found, grid])]
        return [found, grid]

    def refine(self, q0: torch.Tensor, target: IKTarget,
               penalty: PenaltyFn | None = None, deadline: Deadline | None = None,
               needed: int | None = None, clear: ClearFn | None = None) -> torch.Tensor:
        """The first of :meth:`candidate_lists` (``(B', 7)``); ``q0`` itself when it is
        empty."""
        if q0.shape[0] == 0 or (deadline is not None and deadline.expired()):
            return q0
        found = self.candidate_lists(q0, target, needed)[0]
        if found.shape[0] == 0:
            return q0
        return self.closed_form.ops_for(q0).tensor(found, q0).to(q0.dtype)
