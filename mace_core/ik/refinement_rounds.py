"""Refinement rounds of one IK request: seeds -> exact solver -> exact check -> accepted set.

A round (:meth:`RefinementRounds.run`) picks diverse seeds among candidates (the prior's samples,
the adapted model's, MACE's pooled elites), adds seeds around the solutions found so far and,
for full poses in closed form, uniform ones when the last round added nothing; the request's
refiner moves them onto the target, and the rows the checker accepts join the answer
(:class:`~mace_core.ik.adapter.IKAdapter` holds the refiners and checkers).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..deadline import Deadline
from ..robot.kinematics import damped_least_squares
from ..robot.spheres import CollisionWorld
from .refinement import IKTarget
from .request import IKAdaptConfig, IKTimings

#: rad, the Euclidean joint distance from a seed state beyond which the closed form's nearest
#: free solution is put against TRAC-IK's one attempt from the seed (:meth:`_nearest_projection`)
LOCAL_ATTEMPT_BEYOND_RAD = 1.0

if TYPE_CHECKING:
    from .adapter import IKAdapter


class RefinementRounds:
    """Refinement rounds of one request: seeds -> exact solver -> re-check -> accepted set."""

    def __init__(self, adapter: IKAdapter, cfg: IKAdaptConfig, target: IKTarget,
                 world: CollisionWorld, deadline: Deadline, timings: IKTimings,
                 generator: torch.Generator, clutter: bool = False, explore: int = 0,
                 exact_first: bool = False):
        self.adapter, self.cfg, self.target, self.world = adapter, cfg, target, world
        self.deadline, self.timings, self.generator = deadline, timings, generator
        #: in clutter the exact checker may end the penalty's push on rows it calls clear
        #: (most rows there never satisfy the spheres); in the open that costs more than it
        #: saves (box, window, wall: 5 % slower with it)
        self.clutter = clutter
        spec = adapter.spec
        self.accepted = torch.empty(0, adapter.kin.num_joints, device=spec.device,
                                    dtype=spec.dtype)  #: (A, 7) accepted solutions
        self.last_round_s = 0.0
        self.last_added = 0  #: solutions the last round added
        self.rounds_run = 0
        #: uniform seeds added to a round after one that added nothing (full poses in closed
        #: form: each is every branch at a q7 the prior may never draw)
        self.explore = explore
        #: the refiner's rows are on the target by construction (the closed form): they go to
        #: the exact checker in chunks, with no sphere check first (IKAdapter._accept_exact)
        self.exact_first = exact_first
        self.checked = self.checked_valid = 0  #: rows put to the exact check, and found valid
        self.explored = False  #: the last round had uniform seeds

    @property
    def done(self) -> bool:
        return self.accepted.shape[0] >= self.cfg.num_solutions

    def _with_neighbours(self, seeds: torch.Tensor) -> torch.Tensor:
        """Replace the last ``round(neighbour_share * S)`` of ``seeds (S, 7)`` by accepted
        solutions moved along their self-motion (none while nothing is accepted): ``(S, 7)``.

        The move is Gaussian joint noise projected onto the null space of the task Jacobian
        (position, plus the weighted orientation rows for a pose target), (I − J⁺J) ξ: to first
        order it leaves the hand on the target. At the default size (2 rad) the posture changes
        widely and the hand drifts off, and the refiner brings it back.
        """
        count = self.accepted.shape[0]
        n = int(round(self.cfg.neighbour_share * seeds.shape[0]))
        if count == 0 or n == 0:
            return seeds
        spec, kin = self.adapter.spec, self.adapter.kin
        pick = torch.randint(count, (n,), generator=self.generator, device=spec.device)
        base = self.accepted[pick]
        noise = self.cfg.neighbour_std_rad * torch.randn(
            n, seeds.shape[1], generator=self.generator, device=spec.device, dtype=spec.dtype)
        jac = kin.jacobian(base)  # (n, 6, 7)
        if self.target.rotation is None:
            jac = jac[:, :3]
        else:
            jac = torch.cat([jac[:, :3], self.cfg.refinement.orientation_weight * jac[:, 3:]], 1)
        # damped: a solution may be singular
        task = damped_least_squares(jac, jac @ noise.unsqueeze(-1), self.cfg.refinement.damping)
        near = (base + noise - task.squeeze(-1)).clamp(kin.lower, kin.upper)
        return torch.cat([seeds[:seeds.shape[0] - n], near])

    def _with_explorers(self, seeds: torch.Tensor) -> torch.Tensor:
        """``seeds (S, 7)`` plus ``explore`` configurations uniform within the joint limits when
        the last round added nothing (the solutions near the prior's samples are exhausted,
        and where the free ones are rare they may lie at other q7): ``(S [+ E], 7)``."""
        self.explored = not (self.explore == 0 or self.rounds_run == 0 or self.last_added > 0)
        if not self.explored:
            return seeds
        return torch.cat([seeds, self.adapter.kin.sample_uniform(self.explore, self.generator)])

    @property
    def worth_another(self) -> bool:
        """Whether a round on a fresh batch may add solutions: the last one did, or it added
        none without uniform seeds and the next one would have them (cheaper than adapting:
        where the prior's q7 values run dry, others often hold the rest)."""
        return self.last_added > 0 or (self.explore > 0 and not self.explored)

    def time_for_another(self) -> bool:
        """Whether a round (sampling a batch and refining it) still fits the budget."""
        return self.deadline.allows(self.last_round_s)

    def _accept_projections(self, seeds: torch.Tensor) -> None:
        """Project ``seeds (S, 7)`` onto the full pose in closed form and put the answers to the
        exact checker, list after list of :meth:`AnalyticRefiner.candidate_lists` while
        solutions are missing: where the seeds' answers run out (the window's colliding
        branches), the q7 grid's, solved in the same batch, cost less than a round on a fresh
        batch (window pose targets, in turns: median 7.2 against 8.3 ms)."""
        ad, cfg = self.adapter, self.cfg
        if self.deadline.expired():
            return
        lists = ad.refiners["analytic"].candidate_lists(
            seeds, self.target, cfg.num_solutions - self.accepted.shape[0])
        for candidates in lists:
            needed = cfg.num_solutions - self.accepted.shape[0]
            if needed <= 0 or self.deadline.expired():
                break
            self.accepted, checked, valid = ad._accept_exact(
                cfg, self.accepted, candidates, self.world, needed, self.deadline)
            self.checked += checked
            self.checked_valid += valid

    def nearest_solution(self, seed: torch.Tensor) -> torch.Tensor | None:
        """The valid solution ``(7,)`` nearest ``seed (7,)`` that a local search from it finds
        (None: none found): what a local solver started at the robot's state gives (MoveIt's
        IK from its ``robot_state``; README "The robot's joints" has how often it is as near
        or nearer). A full pose in closed form: :meth:`_nearest_projection`; otherwise the
        request's refiner from the seed. Counts as refinement time; accepts nothing."""
        t = time.perf_counter()
        ad, cfg = self.adapter, self.cfg
        found = None
        with torch.inference_mode():
            if cfg.refinement_mode == "none" or self.deadline.expired():
                pass
            elif self.target.rotation is not None and cfg.refinement_mode == "analytic":
                found = self._nearest_projection(seed)
            else:
                refined = ad._refine(cfg, seed[None], self.target, self.world, self.deadline, 1)
                if bool(ad._acceptable(cfg, refined, self.target, self.world, 1)[0]):
                    found = refined[0]
        self.timings.refinement += time.perf_counter() - t
        return found

    def _nearest_projection(self, seed: torch.Tensor) -> torch.Tensor | None:
        """The first free one of :meth:`AnalyticRefiner.nearest_to`'s candidates (the pose's
        solutions nearest the seed first), put to the exact checker in chunks of 1, 2, 4...
        (the nearest is usually free; without an exact checker, all judged at once by the
        spheres). Where that is farther than :data:`LOCAL_ATTEMPT_BEYOND_RAD` from the seed, or
        none is free, TRAC-IK's one attempt from the seed
        (:meth:`TracIKRefiner.solve_from_seed_state`, where the service has TRAC-IK) is taken
        when it is free and nearer: a branch within the limits for a sliver of q7 only (joints
        at their limits) escapes the closed form's grid, not a local solver started near it.
        Only there: the attempt took 0.1-0.2 ms from near seeds but up to 8 ms on this 2-core
        machine (its two threads, past its 1 ms clock), and elsewhere it was at most 0.14 rad
        nearer than the closed form's answer (80 targets of the four scenes, seeds 0.3 rad from
        a solution)."""
        ad = self.adapter
        found = ad.refiners["analytic"].nearest_to(seed, self.target)
        best = self._first_free(found, seed)
        tracik = ad.refiners.get("tracik")
        start = seed.detach().cpu().double()
        away = math.inf if best is None else float(torch.linalg.vector_norm(
            best.detach().cpu().double() - start))
        if tracik is None or away <= LOCAL_ATTEMPT_BEYOND_RAD or self.deadline.expired():
            return best
        local = tracik.solve_from_seed_state(start.numpy(), self.target.pose_numpy)
        if local is None or float(np.linalg.norm(local - start.numpy())) >= away:
            return best
        free = self._first_free(torch.as_tensor(local, device=seed.device)[None], seed)
        return best if free is None else free

    def _first_free(self, found, seed: torch.Tensor) -> torch.Tensor | None:
        """The first row of ``found (A, 7)`` (NumPy or a tensor, nearest the seed first) that
        is free: by the exact checker in chunks of 1, 2, 4..., or by the spheres all at once
        where the service has no exact checker; None where none is (or the deadline came)."""
        ad = self.adapter
        if not self.exact_first:
            rows = torch.as_tensor(found, device=seed.device, dtype=self.accepted.dtype)
            ok = ad._acceptable(self.cfg, rows, self.target, self.world).nonzero()
            return rows[int(ok[0, 0])] if ok.numel() else None
        found = found if isinstance(found, np.ndarray) else found.cpu().numpy()
        start, size = 0, 1
        while start < found.shape[0] and not self.deadline.expired():
            chunk = found[start:start + size]
            ok = ad._exact_valid(chunk, self.world)
            if ok.any():
                return torch.from_numpy(chunk[int(np.argmax(ok))]).to(self.accepted)
            start, size = start + size, 2 * size
        return None

    def run(self, candidates: torch.Tensor, scores: torch.Tensor | None = None) -> bool:
        """Refine seeds chosen among ``candidates (B, 7)`` (with their scores ``(B,)`` when known:
        0 marks a colliding one); True once K solutions are accepted."""
        t = time.perf_counter()
        ad, cfg = self.adapter, self.cfg
        with torch.inference_mode():  # nothing here is differentiated: less overhead per op
            seeds = ad._select_seeds(cfg, candidates, self.target, self.world, scores)
            seeds = self._with_explorers(self._with_neighbours(seeds))
            before = self.accepted.shape[0]
            if self.exact_first:
                self._accept_projections(seeds)
            else:
                needed = cfg.num_solutions - before
                refined = ad._refine(cfg, seeds, self.target, self.world, self.deadline, needed,
                                     exact_clear=self.clutter)
                ok = ad._acceptable(cfg, refined, self.target, self.world, needed)
                self.accepted = ad._merge(cfg, self.accepted, refined[ok])
        self.last_added = self.accepted.shape[0] - before
        self.rounds_run += 1
        self.last_round_s = time.perf_counter() - t
        self.timings.refinement += self.last_round_s
        return self.done


def farthest_point_order(q: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min selection of ``k`` rows of ``q (B, 7)`` from row 0: indices ``(k,)``
    (:func:`farthest_point_indices` on the host)."""
    return torch.as_tensor(farthest_point_indices(q.detach().cpu().numpy(), k),
                           device=q.device)


def farthest_point_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Greedy max-min selection of ``k`` rows of ``x (B, 7)`` from row 0: indices ``(k,)``.

    Distances are Euclidean in joint space, the measure of the benchmark's diversity. The loop
    is sequential and B small (hundreds at most), so it runs in NumPy (a third of the time of
    the same loop in torch) on the squared distances of every pair, one matrix product:
    two operations a step instead of five, where B is at most ``_PAIRS_UP_TO`` (50 rows, 16
    picks: 0.03 against 0.07 ms; 128 and 48: 0.09 against 0.32 ms; 512 and 48: 3.1 against
    0.8 ms, the matrix costs more than it saves)."""
    k = min(k, x.shape[0])
    chosen = np.zeros(k, dtype=np.int64)
    pairs = None  # (B, B) squared distances, for small B
    if x.shape[0] <= _PAIRS_UP_TO:
        x = x.astype(np.float64)
        norms = (x * x).sum(-1)
        pairs = norms[:, None] + norms[None] - 2.0 * (x @ x.T)
    dist = ((x - x[0]) ** 2).sum(-1)
    for i in range(1, k):
        chosen[i] = int(dist.argmax())
        c = chosen[i]
        np.minimum(dist, pairs[c] if pairs is not None else ((x - x[c]) ** 2).sum(-1),
                   out=dist)
    return chosen


#: rows up to which :func:`farthest_point_indices` forms every pair's distance at once
_PAIRS_UP_TO = 192
