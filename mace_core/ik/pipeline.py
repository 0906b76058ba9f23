"""One IK request as named stages: sample, refine, adapt (MACE), refine, answer.

The product's pipeline for one request (Algorithm 1 with the IK score of paper Sec. 4.2), each
stage a method of :class:`RequestPipeline` that :meth:`~mace_core.ik.adapter.IKAdapter.solve`
calls in turn:

0. one solution wanted (K = 1) and a seed state, MoveIt's question: the solution nearest the
   seed alone, found as in stage 5 (``answer_one_from_seed_state``); the stages after it run
   only where there is none;
1. sampling (``draw_first_batch``): configurations from the prior p(q | p_target); score 0 on
   collision (or outside the joint limits), else exp(−‖p_target − p_ee(q)‖);
2. refinement rounds (``refine_while_adding``): diverse candidates near the target seed an exact
   solver (DLS, TRAC-IK, or an external one such as MoveIt) that reaches the target within the
   tolerance; results are re-checked for collision. Once solutions exist, half of a round's
   seeds are drawn around them: where the free space is a narrow passage, the arm's self-motion
   near a solution holds more. A small prior batch (``first_samples``) often gives all K at
   once; rounds on fresh small batches go on while they add solutions. In clutter (few valid
   samples in the first batch) rounds draw and refine more (``clutter_samples``,
   ``clutter_seeds``). A full pose on the Panda is refined in closed form: every candidate is
   exact, so the samples are drawn unscored and the candidates go straight to the exact
   checker, a few at a time (``_accept_exact``);
3. adaptation (``adapt_with_rounds``): when a round adds none, MACE iterations on all the prior's
   weights (N samples each), with a refinement round on the best pooled samples after each,
   stopped by T, by the time budget, or once K solutions are accepted (T = 0: prior samples
   only);
4. rounds on batches of the adapted model (``refine_adapted_batches``) until K solutions or
   the deadline;
5. with a seed state (the robot's joints now), the solution nearest it joins the answer
   (``add_nearest_to_seed_state``): the pose's closed-form solutions around the seed's q7,
   nearest first, or the request's refiner from the seed, as a local solver started there
   would; it takes the place of the solutions it is too near, never of more than it adds;
6. the answer (``answer``): the accepted solutions spread out, or the best samples, ranked
   (by the distance from the seed state when one is given, else by clearance).
"""

from __future__ import annotations

import functools
import math
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..deadline import Deadline
from ..mace import adapt, draw
from .conditioned import _ConditionedPrior, _ProjectedPrior
from .refinement import IKTarget, pose_errors
from .refinement_rounds import RefinementRounds, farthest_point_order
from .request import IKAdaptResult, IKRequest, IKSolution, IKTimings

if TYPE_CHECKING:
    from .adapter import IKAdapter


class RequestPipeline:
    """One request, as the named stages of the module docstring, with the state they share.

    Built by :meth:`IKAdapter.solve`, which calls the stages in order:
    :meth:`answer_one_from_seed_state`, :meth:`draw_first_batch`, :meth:`refine_while_adding`,
    :meth:`adapt_with_rounds`, :meth:`refine_adapted_batches`, :meth:`add_nearest_to_seed_state`,
    :meth:`answer`. Every stage checks the deadline and does
    nothing once K solutions are found.
    """

    def __init__(self, adapter: "IKAdapter", request: IKRequest, start: float | None,
                 cancel: threading.Event | None):
        """Resolve the request's settings (raises InvalidRequestError), its target, world,
        deadline and random source, and start from the pretrained prior."""
        self.t0 = time.perf_counter()
        self.adapter = adapter
        self.cfg = adapter.effective_config(request)  #: the clutter stage may replace it
        spec = adapter.spec
        self.deadline = Deadline.after(self.cfg.time_budget_s, start, cancel)
        self.world = adapter._world_of(request.obstacles)
        self.target = IKTarget(
            position=spec.tensor(request.position),
            rotation=None if request.rotation is None else spec.tensor(request.rotation),
            orientation_tolerance=request.orientation_tolerance)
        self.generator = spec.generator(request.seed)
        #: ``(7,)`` the request's seed state clamped onto the joint limits, or None
        self.seed_state = None if request.seed_state is None else torch.as_tensor(
            request.seed_state, device=spec.device, dtype=spec.dtype).clamp(
                adapter.kin.lower, adapter.kin.upper)
        #: a full pose answered in closed form (the Panda's)
        self.analytic_pose = (self.target.rotation is not None
                              and self.cfg.refinement_mode == "analytic"
                              and adapter.closed_form is not None)
        #: such a pose's candidates go straight to the exact checker (none without one)
        self.exact_first = self.analytic_pose and adapter.exact is not None
        self.model = adapter._pretrained_model(
            self.target.position, self.target_pose() if self.analytic_pose else None)
        self.timings = IKTimings()
        self.refining = self.cfg.refinement_mode != "none"
        self.rounds: RefinementRounds | None = None  #: built once the clutter stage decided
        self.done = False  #: K solutions accepted
        # candidates to answer with when no refinement round accepted anything: ``(B, 7)`` and
        # their scores ``(B,)``, the first batch's until adaptation pools better ones
        self.cand_q = self.cand_s = None
        self.valid_prior = self.valid_adapted = 0.0
        self.iterations = 0  #: MACE iterations run
        self.nearest_sought = False  #: the seed state's nearest solution was sought already

    # -- helpers of the stages ------------------------------------------------------------------

    def target_pose(self) -> torch.Tensor:
        """``(4, 4)`` float64: the target pose (a full-pose request)."""
        return torch.from_numpy(self.target.pose_numpy).to(self.target.position.device)

    def adapted_model(self) -> _ConditionedPrior:
        """What MACE adapts: the prior, or, when the closed form answers this request (a full
        pose, refinement ``analytic``), the prior with its samples projected onto the pose, so
        that the elites are exact solutions (the refinement rounds project their seeds
        themselves, every branch: they sample the prior as it is)."""
        if not self.analytic_pose:
            return self.model
        pose, closed_form = self.target_pose(), self.adapter.closed_form
        m = self.model
        return _ProjectedPrior(m.prior, m.initial, m.context, m.lower, m.upper, closed_form,
                               pose)

    def score(self, q: torch.Tensor) -> torch.Tensor:
        """S of paper Sec. 4.2 for ``q (N, 7)``: ``(N,)``, 0 on collision or outside the joint
        limits, else exp(−(position error + w_rot · orientation error)).

        Collisions are the sphere model's, except where the closed form answers a full pose:
        there the rows on the pose that the spheres refuse go to the exact checker, so that
        MACE's elites are the exact solutions free by the exact geometry (where the free
        solutions are rare, the spheres refuse most of them: the window's hardest targets)."""
        kin = self.adapter.kin
        poses = kin.link_poses(q)
        pos_err, rot_err = pose_errors(kin, q, self.target, poses)
        valid = self.adapter.checker.valid(q, self.world, poses=poses)  # batched spheres
        if self.analytic_pose and self.adapter.exact is not None:
            on_pose = ((pos_err <= self.cfg.refinement.position_tolerance)
                       & (rot_err <= max(self.target.orientation_tolerance, 1e-3)))
            ask = (on_pose & ~valid).nonzero().squeeze(1)
            if ask.numel():
                valid[ask] = self.adapter._valid(q[ask], self.world)
        w_rot = self.cfg.refinement.orientation_weight
        return torch.where(valid, torch.exp(-(pos_err + w_rot * rot_err)), 0.0)

    def fresh_batch(self, n: int, scored: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Up to ``n`` new samples ``(n, 7)`` of the model as it is now (fewer when the deadline
        comes first), with their scores ``(n,)`` if asked. For the exact checker's rounds of a
        full pose in closed form, seeds that carry only their q7
        (:meth:`~.conditioned._ConditionedPrior.closed_form_seeds`)."""
        t = time.perf_counter()
        with torch.inference_mode():  # cheaper than no_grad with the weights' views
            if self.exact_first and not scored:
                batch, scores = self.model.closed_form_seeds(n, self.generator), None
            else:
                batch, scores = draw(self.model, self.score if scored else None, n,
                                     self.generator, self.cfg.mace.chunk_size, self.deadline)
        self.timings.sampling += time.perf_counter() - t
        return batch, scores

    # -- stages ---------------------------------------------------------------------------------

    def _new_rounds(self, cfg, clutter: bool = False) -> RefinementRounds:
        return RefinementRounds(self.adapter, cfg, self.target, self.world, self.deadline,
                                self.timings, self.generator, clutter,
                                explore=cfg.pose_explore_seeds if self.analytic_pose else 0,
                                exact_first=self.exact_first)

    def answer_one_from_seed_state(self) -> None:
        """Stage 0: one solution wanted (K = 1) and a seed state, MoveIt's question (the
        solution near the robot): the nearest solution alone
        (:meth:`RefinementRounds.nearest_solution`), before any draw; the stages after it run
        only where there is none."""
        if self.seed_state is None or not self.refining or self.cfg.num_solutions != 1:
            return
        self.rounds = self._new_rounds(self.cfg)
        near = self.rounds.nearest_solution(self.seed_state)
        self.nearest_sought = True
        if near is not None:
            self.rounds.accepted = near[None]
            self.done = True

    def draw_first_batch(self) -> None:
        """Stage 1: sample the prior, a small batch when refining (often enough), N otherwise.

        When less than ``clutter_valid_fraction`` of it is valid the request is in clutter: the
        batch is topped up to ``clutter_samples`` and rounds refine ``clutter_seeds``; not with
        the closed form, which makes every seed exact whatever its distance (the cabinet's pose
        targets: 12.8 ms median without the top-up, 38 ms with it, same answers found).
        """
        if self.done:
            return
        cfg = self.cfg
        if self.analytic_pose:
            cfg = self.cfg = replace(cfg, first_samples=cfg.pose_first_samples)
        q, s = self.fresh_batch(cfg.first_samples if self.refining else cfg.mace.num_samples,
                                scored=not self.exact_first)
        if s is not None:
            self.valid_prior = float((s > 0).float().mean())
        clutter = (self.refining and cfg.refinement_mode != "analytic"
                   and self.valid_prior < cfg.clutter_valid_fraction)
        if clutter:
            cfg = self.cfg = replace(cfg, first_samples=cfg.clutter_samples,
                                     refine_seeds=cfg.clutter_seeds)
            if cfg.first_samples > q.shape[0]:
                more_q, more_s = self.fresh_batch(cfg.first_samples - q.shape[0], scored=True)
                q, s = torch.cat([q, more_q]), torch.cat([s, more_s])
        self.cand_q, self.cand_s, self.valid_adapted = q, s, self.valid_prior
        self.rounds = self._new_rounds(cfg, clutter)

    def refine_while_adding(self) -> None:
        """Stage 2: a refinement round on the first batch, then rounds on fresh prior batches
        while each adds solutions: cheaper than adapting (a fresh batch plus seeds around the
        solutions found). Without refinement, nothing."""
        if not self.refining or self.done:
            return
        rounds = self.rounds
        self.done = rounds.run(self.cand_q, self.cand_s)
        if self.exact_first:  # the prior's samples, projected: the share the exact check passed
            self.valid_prior = self.valid_adapted = rounds.checked_valid / max(rounds.checked, 1)
        while not self.done and rounds.worth_another and rounds.time_for_another():
            self.cand_q, self.cand_s = self.fresh_batch(self.cfg.first_samples,
                                                        scored=not self.exact_first)
            self.done = rounds.run(self.cand_q, self.cand_s)

    def _stop_adapting(self, pool_x: torch.Tensor, pool_s: torch.Tensor) -> bool:
        """After each MACE iteration: a refinement round on the pool (True once K solutions are
        accepted); without refinement, True once ``refine_seeds`` pooled samples score above
        exp(−seed_radius_m) (with ``early_stop``)."""
        if self.refining:
            return self.rounds.run(pool_x, pool_s)
        good = math.exp(-self.cfg.seed_radius_m)
        return self.cfg.early_stop and int((pool_s >= good).sum()) >= self.cfg.refine_seeds

    def adapt_with_rounds(self) -> None:
        """Stage 3: MACE iterations on all the prior's weights (Algorithm 1) with a refinement
        round after each, until T, K solutions, or the deadline less ``refine_reserve_s``
        (at most half the budget). The pool of the best samples replaces the candidates."""
        cfg, timings = self.cfg, self.timings
        t1 = time.perf_counter()
        refine_before = timings.refinement
        adapt_deadline = self.deadline.earlier(min(cfg.refine_reserve_s,
                                                   0.5 * cfg.time_budget_s))
        if cfg.mace.iterations > 0 and not self.done:
            q, s = self.cand_q, self.cand_s
            # without refinement the first batch was drawn with N (fewer when the deadline cut
            # its draw short): it is the first iteration's batch
            first = (q, s) if not self.refining or q.shape[0] == cfg.mace.num_samples else None
            self.adapter._adapted = self.model.prior
            trace = adapt(self.adapted_model(), self.score, cfg.mace, self.generator,
                          deadline=adapt_deadline, first_batch=first,
                          stop_when=self._stop_adapting)
            self.cand_q, self.cand_s = trace.pool_x, trace.pool_scores
            self.iterations = trace.iterations_run
            if self.iterations:
                self.valid_adapted = trace.iterations[trace.kept_iteration].positive_fraction
            self.done = self.refining and self.rounds.done
        timings.adaptation = time.perf_counter() - t1 - (timings.refinement - refine_before)

    def refine_adapted_batches(self) -> None:
        """Stage 4: refinement rounds on fresh batches of the (adapted) model until K solutions
        or the deadline."""
        while self.refining and not self.done and self.rounds.time_for_another():
            self.done = self.rounds.run(*self.fresh_batch(self.cfg.mace.num_samples,
                                                          scored=False))

    def add_nearest_to_seed_state(self) -> None:
        """Stage 5: with a seed state, the solution nearest it
        (:meth:`RefinementRounds.nearest_solution`) joins the accepted ones, first, in place of
        those within ``min_joint_distance`` of it, unless that leaves fewer for the answer
        (where the free solutions are few, the ones found are kept). Sought last, so that it
        never costs the answer a solution: sought first, a cabinet target whose free
        solutions barely hold K apart found 7 in the whole budget (9,578 checks, against 168
        without the seed)."""
        if self.seed_state is None or not self.refining or self.nearest_sought:
            return
        near = self.rounds.nearest_solution(self.seed_state)
        if near is None:
            return
        accepted, k = self.rounds.accepted, self.cfg.num_solutions
        apart = (accepted - near).abs().amax(-1) >= self.cfg.min_joint_distance
        if int(apart.sum()) + 1 >= min(k, accepted.shape[0]):
            self.rounds.accepted = torch.cat([near[None], accepted[apart]])

    def select_solutions(self) -> list[IKSolution]:
        """At most K solutions, best first: the accepted ones spread out (the last round may
        overshoot K); when none was accepted (or without refinement), the best samples."""
        cfg, k, seed = self.cfg, self.cfg.num_solutions, self.seed_state
        describe = functools.partial(self.adapter._describe, seed_state=seed)
        with torch.inference_mode():
            accepted = self.rounds.accepted
            if self.refining and accepted.shape[0] > 0:
                if accepted.shape[0] > k:  # all of them otherwise: _describe ranks them
                    if seed is not None:  # spread out from the one nearest the seed state
                        first = int(torch.linalg.vector_norm(accepted - seed, dim=-1).argmin())
                        accepted = torch.cat([accepted[first:first + 1], accepted[:first],
                                              accepted[first + 1:]])
                    accepted = accepted[farthest_point_order(accepted, k)]
                return describe(accepted, self.target, self.world, known_valid=True)
            cand_q, cand_s = self.cand_q, self.cand_s
            if cand_s is None:  # seeds for the exact checker: on the pose where a branch exists
                cand_q = self.adapter.closed_form.project(self.target_pose(), cand_q)[0].to(
                    cand_q.dtype)
                cand_s = self.score(cand_q)
            order = torch.argsort(cand_s, descending=True)
            if not self.refining:  # the valid samples, spread out
                cand_q = cand_q[order][cand_s[order] > 0]
                if cand_q.shape[0]:
                    cand_q = cand_q[farthest_point_order(cand_q, k)]
            else:
                cand_q = cand_q[order]
            return describe(cand_q[:cfg.num_solutions], self.target, self.world)[:k]

    def answer(self) -> IKAdaptResult:
        """Stage 6: the selected solutions, what was found, and a message for humans."""
        solutions = self.select_solutions()
        self.timings.total = time.perf_counter() - self.t0
        cfg, refining = self.cfg, self.refining
        k, tol = cfg.num_solutions, cfg.refinement.position_tolerance
        found = sum(1 for sol in solutions if sol.collision_free
                    and (not refining or sol.position_error <= tol))
        message = f"found {found} of {k} solutions" + (
            f" within {tol * 1e3:.2f} mm" if refining else "")
        if refining and found < len(solutions):
            message += (f"; {len(solutions) - found} more returned as best effort, not "
                        "solutions (off the target or colliding)")
        if self.seed_state is not None and solutions:
            away = np.linalg.norm(solutions[0].q - self.seed_state.cpu().double().numpy())
            message += f"; the first {away:.3f} rad from the seed state"
        message += f" ({self.iterations} MACE iterations, {self.timings.total * 1e3:.0f} ms)"
        return IKAdaptResult(solutions=solutions, joint_names=list(self.adapter.kin.joint_names),
                             num_requested=k, num_found=found,
                             valid_fraction_prior=self.valid_prior,
                             valid_fraction_adapted=self.valid_adapted,
                             iterations_run=self.iterations, timings=self.timings,
                             message=message, exact_checks=self.adapter.exact_checks)
