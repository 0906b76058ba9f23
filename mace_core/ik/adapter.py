"""Collision-aware IK by MACE: adapt the IK prior to a scene at query time, then refine exactly.

The product's pipeline for one request (Algorithm 1 with the IK score of paper Sec. 4.2), each
stage a method of :class:`_RequestPipeline` that :meth:`IKAdapter.solve` calls in turn:

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
   only); then rounds on batches of the adapted model (``refine_adapted_batches``) until K
   solutions or the deadline;
4. the answer (``answer``): the accepted solutions spread out, or the best samples, ranked.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import replace

import numpy as np
import torch

from ..deadline import Deadline
from ..errors import InvalidRequestError, ModelLoadError, format_numbers, quote
from ..mace import adapt, draw
from ..robot.backends import exact_checker
from ..robot.closed_form_ik import PandaClosedFormIK
from ..robot.collision import SceneCollisionChecker
from ..robot.kinematics import RobotKinematics, panda_urdf_path
from ..robot.rotations import geodesic_distance_numpy
from ..robot.scenes import Obstacle, padded
from ..robot.spheres import CollisionWorld, SphereCollisionChecker
from ..tensor import TensorSpec
from .conditioning import context_of
from .conditioned import _ConditionedPrior, _ProjectedPrior
from .prior import ARGMMPrior
from .refinement import (AnalyticRefiner, DLSRefiner, IKTarget, PenaltyFn, Refiner, TracIKRefiner,
                         pose_errors)
from .refinement_rounds import RefinementRounds, farthest_point_indices, farthest_point_order
from .registry import IK_KINDS, load_ik_prior, load_registry
from .request import IKAdaptConfig, IKAdaptResult, IKRequest, IKSolution, IKTimings

#: The request fields that override the config's ``mace`` (Algorithm 1's settings), and all
#: the fields that override the config (see :meth:`IKAdapter.effective_config`).
_MACE_OVERRIDES = ("iterations", "objective", "num_samples", "quantile", "gradient_steps",
                   "learning_rate")
_OVERRIDES = ("num_solutions", "time_budget_s", "refinement") + _MACE_OVERRIDES
#: Validated configs kept at most (by their overrides; then the cache starts afresh).
_CONFIGS_KEPT = 64

#: Origin of joint 2 (the shoulder) in the base frame, m; reach is measured from there.
_SHOULDER = (0.0, 0.0, 0.333)


class _RequestPipeline:
    """One request, as the named stages of the module docstring, with the state they share.

    Built by :meth:`IKAdapter.solve`, which calls the stages in order: :meth:`draw_first_batch`,
    :meth:`refine_while_adding`, :meth:`adapt_with_rounds`, :meth:`refine_adapted_batches`,
    :meth:`answer`. Every stage checks the deadline and does nothing once K solutions are found.
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

    def draw_first_batch(self) -> None:
        """Stage 1: sample the prior, a small batch when refining (often enough), N otherwise.

        When less than ``clutter_valid_fraction`` of it is valid the request is in clutter: the
        batch is topped up to ``clutter_samples`` and rounds refine ``clutter_seeds``; not with
        the closed form, which makes every seed exact whatever its distance (the cabinet's pose
        targets: 12.8 ms median without the top-up, 38 ms with it, same answers found).
        """
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
        self.rounds = RefinementRounds(self.adapter, cfg, self.target, self.world,
                                       self.deadline, self.timings, self.generator, clutter,
                                       explore=cfg.pose_explore_seeds if self.analytic_pose
                                       else 0, exact_first=self.exact_first)

    def refine_while_adding(self) -> None:
        """Stage 2: a refinement round on the first batch, then rounds on fresh prior batches
        while each adds solutions: cheaper than adapting (a fresh batch plus seeds around the
        solutions found). Without refinement, nothing."""
        if not self.refining:
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

    def select_solutions(self) -> list[IKSolution]:
        """At most K solutions, best first: the accepted ones spread out (the last round may
        overshoot K); when none was accepted (or without refinement), the best samples."""
        cfg, k = self.cfg, self.cfg.num_solutions
        describe = self.adapter._describe
        with torch.inference_mode():
            accepted = self.rounds.accepted
            if self.refining and accepted.shape[0] > 0:
                if accepted.shape[0] > k:  # all of them otherwise: _describe ranks them
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
        """Stage 5: the selected solutions, what was found, and a message for humans."""
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
        message += f" ({self.iterations} MACE iterations, {self.timings.total * 1e3:.0f} ms)"
        return IKAdaptResult(solutions=solutions, joint_names=list(self.adapter.kin.joint_names),
                             num_requested=k, num_found=found,
                             valid_fraction_prior=self.valid_prior,
                             valid_fraction_adapted=self.valid_adapted,
                             iterations_run=self.iterations, timings=self.timings,
                             message=message, exact_checks=self.adapter.exact_checks)


class IKAdapter:
    """Serves IK requests with one pretrained prior (built once, reused for every request).

    Not thread-safe: a request adapts the prior's weights in place and restores them at the next
    request's start, so requests must be served one at a time.
    """

    def __init__(self, prior: ARGMMPrior, initial_prior: ARGMMPrior, kin: RobotKinematics,
                 checker: SphereCollisionChecker, config: IKAdaptConfig, spec: TensorSpec,
                 urdf_text: str | None = None, refiners: dict[str, Refiner] | None = None,
                 pose_priors: tuple[ARGMMPrior, ARGMMPrior] | None = None):
        config.collision.validate()
        self.prior = prior.requires_grad_(True)
        self.initial_prior = initial_prior.requires_grad_(False)
        #: the pose-conditioned prior full poses answered in closed form draw from, and its
        #: frozen copy (``ik.pose_prior``; None: they draw from ``prior``)
        self.pose_prior = self.pose_initial = None
        if pose_priors is not None:
            self.pose_prior = pose_priors[0].requires_grad_(True)
            self.pose_initial = pose_priors[1].requires_grad_(False)
        #: pretrained weights of each prior, restored after a request adapted them
        self._pristine = {id(p): {k: v.detach().clone() for k, v in p.state_dict().items()}
                          for p in (self.prior, self.pose_prior) if p is not None}
        self.kin, self.checker, self.config, self.spec = kin, checker, config, spec
        #: the exact checker that accepts and describes answers (None: the spheres do)
        self.exact: SceneCollisionChecker | None = exact_checker(config.collision.backend,
                                                                 str(spec.device))
        self.refiners: dict[str, Refiner] = {"dls": DLSRefiner(kin, config.refinement)}
        if urdf_text is not None:
            self.refiners["tracik"] = TracIKRefiner(kin, urdf_text, config.refinement)
        #: the Panda's closed form when the chain is the Panda's (pose requests solved exactly)
        self.closed_form: PandaClosedFormIK | None = PandaClosedFormIK(kin)
        if self.closed_form.matches():
            self.refiners["analytic"] = AnalyticRefiner(kin, self.closed_form)
        else:
            self.closed_form = None
        self.refiners.update(refiners or {})
        self._last_position: torch.Tensor | None = None  # (3,) target of the last solve()
        self._adapted: ARGMMPrior | None = None  # the prior whose weights a request changed
        self._world: tuple[tuple[Obstacle, ...], CollisionWorld] | None = None  # the last scene
        self.exact_checks = 0  #: configurations put to the exact checker by the current request

    @property
    def config(self) -> IKAdaptConfig:
        """The request defaults; setting it (a warm-up's variant) drops the configs that
        :meth:`effective_config` validated from the last one."""
        return self._config

    @config.setter
    def config(self, config: IKAdaptConfig) -> None:
        self._config = config
        #: validated configs by the requests' overrides (:meth:`effective_config`)
        self._configs: dict[tuple, IKAdaptConfig] = {}

    @classmethod
    def from_models(cls, models_dir: str, model_name: str, config: IKAdaptConfig,
                    spec: TensorSpec, refiners: dict[str, Refiner] | None = None) -> "IKAdapter":
        """Build the adapter from the model registry in ``models_dir`` (done once, at start).

        Raises:
            ModelLoadError: the registry, the weights or the sphere model is missing or corrupt.
        """
        entries = load_registry(os.path.join(models_dir, "registry.yaml"))
        entry = entries.get(model_name)
        if entry is None or entry.kind != "ik_argmm":
            raise ModelLoadError(f"no IK prior named '{model_name}' in {models_dir}/registry.yaml"
                                 f" (known: {sorted(entries)})")
        weights = os.path.join(models_dir, entry.file)
        kin = RobotKinematics.panda(spec)
        checker = SphereCollisionChecker.from_file(
            kin, spec, os.path.join(models_dir, "panda_spheres.yaml"))
        with open(panda_urdf_path()) as f:
            urdf_text = f.read()
        prior = load_ik_prior(weights, spec)
        if prior.config.conditioning != "position":
            raise ModelLoadError(f"IK prior '{model_name}' is conditioned on the "
                                 f"{prior.config.conditioning}; the service adapts a "
                                 "position-conditioned one (e.g. panda_ik), and a pose-"
                                 "conditioned one as ik.pose_prior")
        pose_priors = None
        if config.pose_prior:
            entry = entries.get(config.pose_prior)
            if entry is None or entry.kind not in IK_KINDS:
                raise ModelLoadError(f"ik.pose_prior: no IK prior named '{config.pose_prior}' "
                                     f"in {models_dir}/registry.yaml (known: {sorted(entries)}; "
                                     "'' draws full poses from ik_model)")
            pose_weights = os.path.join(models_dir, entry.file)
            pose_priors = (load_ik_prior(pose_weights, spec), load_ik_prior(pose_weights, spec))
            if pose_priors[0].config.conditioning != "pose":
                raise ModelLoadError(f"ik.pose_prior '{config.pose_prior}' is conditioned on "
                                     f"the {pose_priors[0].config.conditioning}, not the pose")
        return cls(prior, load_ik_prior(weights, spec), kin, checker,
                   config, spec, urdf_text=urdf_text, refiners=refiners,
                   pose_priors=pose_priors)

    # -- request handling ------------------------------------------------------------------------

    def effective_config(self, request: IKRequest) -> IKAdaptConfig:
        """The config with the request's overrides applied, validated.

        Raises:
            InvalidRequestError: an override out of its limits, or a bad target or obstacle.
        """
        key = (tuple(getattr(request, name) for name in _OVERRIDES), request.rotation is None)
        try:
            cfg = self._configs.get(key)
        except TypeError:  # an unhashable field: validated below, not kept
            key, cfg = None, None
        if cfg is None:  # validated once per set of overrides (a pipeline repeats its own)
            cfg = self._overridden_config(request)
            if key is not None:
                if len(self._configs) >= _CONFIGS_KEPT:
                    self._configs.clear()
                self._configs[key] = cfg
        self._validate_request(cfg, request)
        return cfg

    def _overridden_config(self, request: IKRequest) -> IKAdaptConfig:
        """The config with the request's overrides applied, its fields validated."""
        cfg = self.config
        mace_over = {name: getattr(request, name) for name in _MACE_OVERRIDES
                     if getattr(request, name) is not None}
        refinement = request.refinement
        if (refinement is None and request.rotation is not None
                and cfg.pose_refinement_mode in self.refiners):
            refinement = cfg.pose_refinement_mode
        if (request.rotation is not None and (refinement or cfg.refinement_mode) == "analytic"
                and request.gradient_steps is None):  # a full pose in closed form
            mace_over["gradient_steps"] = cfg.pose_gradient_steps
        # one copy of each config, and none of MACE's without overrides
        cfg = replace(cfg, **{k: v for k, v in (
            ("num_solutions", request.num_solutions), ("time_budget_s", request.time_budget_s),
            ("refinement_mode", refinement),
            ("mace", replace(cfg.mace, **mace_over) if mace_over else None)) if v is not None})
        cfg.validate()
        if cfg.refinement_mode != "none" and cfg.refinement_mode not in self.refiners:
            hint = (" (MoveIt's /compute_ik needs moveit_msgs, which is not installed)"
                    if cfg.refinement_mode == "moveit" else "")
            raise InvalidRequestError(
                f"refinement {quote(cfg.refinement_mode)} is not available{hint}")
        return cfg

    def _validate_request(self, cfg: IKAdaptConfig, request: IKRequest) -> None:
        """Raise InvalidRequestError for a bad target or obstacle."""
        lim = cfg.limits
        # on Python floats: a handful of numbers, checked in every request
        pos = np.asarray(request.position, dtype=float)
        if pos.shape != (3,) or not all(map(math.isfinite, pos.tolist())):
            raise InvalidRequestError(f"target position must be 3 finite numbers, got "
                                      f"{format_numbers(pos)}")
        if request.rotation is not None:
            rot = np.asarray(request.rotation, dtype=float)
            if rot.shape != (3, 3) or not all(map(math.isfinite, rot.reshape(-1).tolist())):
                raise InvalidRequestError("target orientation must be a finite rotation")
            if not _is_rotation(rot.tolist()):
                raise InvalidRequestError("target orientation is not a rotation (normalize the "
                                          "quaternion)")
            tol = request.orientation_tolerance
            if not (math.isfinite(tol) and 0.0 <= tol <= math.pi):
                raise InvalidRequestError(
                    f"orientation tolerance must be in [0, pi] rad, got {tol:.6g}")
        reach = math.dist(pos.tolist(), _SHOULDER)
        if reach > lim.reach_m:
            raise InvalidRequestError(
                f"target {format_numbers(pos)} is unreachable: {reach:.4g} m from the shoulder, "
                f"the Panda reaches {lim.reach_m:.2f} m")
        if len(request.obstacles) > lim.max_obstacles:
            raise InvalidRequestError(f"at most {lim.max_obstacles} obstacles per request, "
                                      f"got {len(request.obstacles)}")
        if self._world_of_last(request.obstacles) is not None:  # checked when it was built
            return
        for o in request.obstacles:  # the rest is checked where they are tensorized
            extent = max(np.abs(np.asarray(o.position, dtype=float)).max(initial=0.0),
                         np.asarray(o.size, dtype=float).max(initial=0.0))
            if not extent <= lim.max_coordinate_m:  # NaN fails too
                raise InvalidRequestError(
                    f"obstacle {quote(o.name)}: position {format_numbers(o.position)} and size "
                    f"{format_numbers(o.size)} m must be within limits.max_coordinate_m = "
                    f"{lim.max_coordinate_m:g} m")

    def _world_of(self, obstacles: list[Obstacle]) -> CollisionWorld:
        """The obstacles validated, grown by the padding and tensorized; the last request's
        world when they are the same (a planning pipeline asks for many targets in one scene;
        0.4 to 0.6 ms a request in the benchmark scenes)."""
        key = tuple(obstacles)
        if self._world_of_last(key) is None:
            pad = self.config.collision.padding_m
            if pad > 0.0:
                for o in key:  # as given: the grown ones are checked where they are tensorized
                    o.validate()
            world = CollisionWorld.from_obstacles([padded(o, pad) for o in key], self.spec)
            self._world = (key, world)
        return self._world[1]

    def _world_of_last(self, obstacles) -> CollisionWorld | None:
        """The last request's world when ``obstacles`` are the same as its (validated then),
        else None."""
        try:
            same = self._world is not None and self._world[0] == tuple(obstacles)
        except (TypeError, ValueError):  # fields given as arrays: no cheap comparison
            same = False
        return self._world[1] if same else None

    def _clearance(self, x: np.ndarray, world: CollisionWorld, q: torch.Tensor,
                   poses: torch.Tensor | None = None) -> np.ndarray:
        """``(B,)`` m, float64: each row of ``q (B, 7)`` (``x``: the same in float64 NumPy) from
        the obstacles as given (the world is grown by the padding): the exact checker's when
        configured (PyBullet's measure), else the spheres' (a lower bound; ``poses``: their
        link poses when known)."""
        pad = self.config.collision.padding_m
        if self.exact is None:
            return self.checker.clearance(q, world, poses=poses).cpu().double().numpy() + pad
        self.exact.set_obstacles(world.obstacles)
        return self.exact.clearance(x) + pad

    def _valid(self, q: torch.Tensor, world: CollisionWorld,
               poses: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` bool: ``q (B, 7)`` within the joint limits and clear of ``world``'s (padded)
        obstacles for the checker that accepts answers: the exact one when configured."""
        if self.exact is None:
            return self.checker.valid(q, world, poses=poses)
        return torch.from_numpy(self._exact_valid(q.detach().cpu().numpy(), world)).to(q.device)

    def _exact_valid(self, q: np.ndarray, world: CollisionWorld) -> np.ndarray:
        """``(B,)`` bool: the exact checker's verdict on ``q (B, 7)``, counted."""
        self.exact.set_obstacles(world.obstacles)  # nothing to do when they are the last ones
        self.exact_checks += q.shape[0]
        return self.exact.valid(q)

    def solve(self, request: IKRequest, start: float | None = None,
              cancel: threading.Event | None = None) -> IKAdaptResult:
        """Answer one request within its time budget; raises InvalidRequestError on bad input.

        The stages of the module docstring, each a method of :class:`_RequestPipeline`.

        Args:
            request: the query.
            start: ``time.perf_counter()`` value the budget counts from (e.g. when a service
                received the request); None: now.
            cancel: an event that, once set, ends the request within one step of its current
                loop (the answer is then whatever was found).
        """
        self.exact_checks = 0
        run = _RequestPipeline(self, request, start, cancel)
        run.draw_first_batch()
        run.refine_while_adding()
        run.adapt_with_rounds()
        run.refine_adapted_batches()
        return run.answer()

    def _pretrained_model(self, position: torch.Tensor,
                          pose: torch.Tensor | None = None) -> _ConditionedPrior:
        """The prior at ``position (3,)`` with its pretrained weights (restored when the last
        request adapted them); remembered for :meth:`sample_adapted`. With a full ``pose``
        ``(4, 4)`` and a pose prior loaded, the pose prior at that pose."""
        if self._adapted is not None:
            self._adapted.load_state_dict(self._pristine[id(self._adapted)])
            self._adapted = None
        self._last_position = position
        if pose is not None and self.pose_prior is not None:
            context = context_of("pose", pose[None].to(self.spec.dtype))[0]
            return _ConditionedPrior(self.pose_prior, self.pose_initial, context,
                                     self.kin.lower, self.kin.upper)
        return _ConditionedPrior(self.prior, self.initial_prior, position, self.kin.lower,
                                 self.kin.upper)

    def prior_at(self, position: torch.Tensor) -> _ConditionedPrior:
        """The pretrained prior p(q | position) at ``position (3,)``: what a request samples
        first (paper Table 2's "prior only" draws from it)."""
        return self._pretrained_model(position)

    def projection_distances(self, pose: torch.Tensor, n: int = 256,
                             seed: int = 0) -> torch.Tensor:
        """rad, max-norm joint distance from each of ``n`` samples of the pretrained prior a
        full-pose request at ``pose (4, 4)`` draws from (the pose prior when loaded) to its
        closed-form projection: ``(n,)``, inf where no branch exists at the sample's q7. How
        well a prior knows the pose (a benchmark figure; needs the closed form)."""
        if self.closed_form is None:
            raise InvalidRequestError("projection distances need the Panda's closed form")
        pose = torch.as_tensor(pose, dtype=torch.float64, device=self.spec.device)
        model = self._pretrained_model(pose[:3, 3].to(self.spec.dtype), pose)
        with torch.no_grad():
            q = model.sample(n, self.spec.generator(seed)).to(torch.float64)
        projected, found = self.closed_form.project(pose, q)
        return torch.where(found, (projected - q).abs().amax(-1), torch.inf)

    def sample_adapted(self, n: int, seed: int | None = None) -> torch.Tensor:
        """``n`` samples ``(n, 7)`` of the model as the last :meth:`solve` left it, at its target.

        This is what the paper's Table 1 evaluates (1,000 samples after adaptation).
        """
        if self._last_position is None:
            raise InvalidRequestError("sample_adapted needs a solve() first")
        model = _ConditionedPrior(self.prior, self.initial_prior, self._last_position,
                                  self.kin.lower, self.kin.upper)
        with torch.no_grad():
            return model.sample(n, self.spec.generator(seed))

    def warm_up(self) -> None:
        """Run one small request so the first real one pays no one-time costs (the optimizer's
        first construction imports torch's compiler stack: seconds)."""
        self.solve(IKRequest(position=np.array([0.5, 0.0, 0.4]), num_solutions=1,
                             iterations=1, num_samples=16, refinement="none",
                             time_budget_s=self.config.limits.max_time_budget_s, seed=0))
        self.solve(IKRequest(position=np.array([0.5, 0.0, 0.4]), num_solutions=1,
                             iterations=0, num_samples=16, seed=0, obstacles=[Obstacle(
                                 name="warm_up", kind="box", size=(0.1, 0.1, 0.1),
                                 position=(0.5, 0.3, 0.4))]))
        self._last_position = None

    # -- refinement ------------------------------------------------------------------------------

    def _select_seeds(self, cfg: IKAdaptConfig, cand_q: torch.Tensor, target: IKTarget,
                      world: CollisionWorld, scores: torch.Tensor | None = None) -> torch.Tensor:
        """Diverse seeds among the candidates nearest a solution: ``(<= refine_seeds, 7)``.

        Candidates are ranked by end-effector distance plus obstacle penetration (both m): far
        seeds drag the arm into obstacles on their way to the target, while near ones that graze
        an obstacle are pushed out by the refiner's null-space step. The penetration is computed
        for the 4 x refine_seeds nearest only, where a candidate known to collide
        (``scores <= 0``) ranks as if 0.1 m farther; the best 2 x refine_seeds are then spread
        out greedily (max-min joint distance), from the best. With at most 2 x refine_seeds
        candidates the spreading keeps all of them in play, so the penetration ranking, which
        would only pick the first, is skipped; with at most refine_seeds (the fast path's first
        batch) every candidate is a seed.
        """
        if cand_q.shape[0] <= cfg.refine_seeds:  # every candidate is a seed
            return cand_q
        with torch.no_grad():
            poses = self.kin.link_poses(cand_q)
            dist = torch.linalg.vector_norm(poses[:, self.kin.ee_index, :3, 3] - target.position,
                                            dim=-1)
            rank = dist if scores is None else dist + 0.1 * (scores <= 0).to(dist.dtype)
            pre = torch.argsort(rank)[:4 * cfg.refine_seeds]
            cand_q = cand_q[pre]
            if cand_q.shape[0] > 2 * cfg.refine_seeds:  # else every candidate is spread out
                poses = poses[pre]
                cost = dist[pre] + self._penalty(world)(cand_q, poses)[0]
                cost = cost + 1.0 * self.checker.self_collision(cand_q, poses=poses)
                cand_q = cand_q[torch.argsort(cost)[:2 * cfg.refine_seeds]]
        return cand_q[farthest_point_order(cand_q, cfg.refine_seeds)]

    def _penalty(self, world: CollisionWorld, margin: float = 0.005) -> PenaltyFn:
        """Obstacle cost for the refiner: the summed penetration (m) of the robot's spheres into
        every obstacle, counted from ``margin`` outside it, and its analytic joint gradient
        (:meth:`SphereCollisionChecker.penetration_gradient`)."""
        def penalty(q: torch.Tensor, poses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.checker.penetration_gradient(q, world, margin, poses)
        return penalty

    def _refine(self, cfg: IKAdaptConfig, seeds: torch.Tensor, target: IKTarget,
                world: CollisionWorld, deadline: Deadline, needed: int | None = None,
                exact_clear: bool = False) -> torch.Tensor:
        """Refine ``seeds (B, 7)`` with the request's refiner; with ``exact_clear`` (and an
        exact checker) a row on the target that it calls clear needs no more pushing."""
        if cfg.refinement_mode == "none":
            return seeds
        clear = ((lambda q: self._valid(q, world))
                 if exact_clear and self.exact is not None else None)
        return self.refiners[cfg.refinement_mode].refine(seeds, target, self._penalty(world),
                                                         deadline=deadline, needed=needed,
                                                         clear=clear)

    def _acceptable(self, cfg: IKAdaptConfig, q: torch.Tensor, target: IKTarget,
                    world: CollisionWorld, needed: int | None = None) -> torch.Tensor:
        """``(B,)`` bool: valid, and within tolerance when refinement is on.

        Valid: the sphere model calls the row free (it never calls free what the exact
        checkers call colliding, and it is cheap), or else the exact checker does. Only rows
        on the target are put to the exact check, and none when the spheres already accept
        ``needed`` rows (the fast path in open scenes)."""
        poses = self.kin.link_poses(q)
        ok = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
        if cfg.refinement_mode != "none":
            pos_err, rot_err = pose_errors(self.kin, q, target, poses)
            ok &= pos_err <= cfg.refinement.position_tolerance
            if target.rotation is not None:
                ok &= rot_err <= max(target.orientation_tolerance, 1e-3)
        free = self.checker.valid(q, world, poses=poses)
        if self.exact is not None and (needed is None or int((ok & free).sum()) < needed):
            ask = ok & ~free
            if bool(ask.any()):
                rows = ask.nonzero().squeeze(1)
                free[rows] = self._valid(q[rows], world)
        return ok & free

    def _accept_exact(self, cfg: IKAdaptConfig, accepted: torch.Tensor,
                      candidates: torch.Tensor | np.ndarray, world: CollisionWorld, needed: int,
                      deadline: Deadline) -> tuple[torch.Tensor, int, int]:
        """Rows of ``candidates (B, 7)`` (NumPy or a tensor), all on the target (the closed
        form's), put to the exact checker in their order, the first ``2 x needed`` spread out
        (farthest point: the answer's diversity), until ``needed`` are added, the candidates
        run out or the deadline passes. Each chunk is what is still needed, grown by the share
        found valid so far (up to 4x): where nearly all are free, K checks usually do, and the
        answer is the one twice as many checks would give (the first K of the spread order);
        where few are, chunks stay large. Rows within ``min_joint_distance`` of an accepted one
        are skipped. No sphere check first: on the Panda's collision meshes MuJoCo checks a
        configuration in 15-75 µs, and the spheres refuse most free ones near the target.

        Returns: the accepted rows ``(A', 7)``, and how many rows were checked and found valid.
        """
        spread = max(2 * needed, 8)
        checked = valid = start = 0
        # in NumPy throughout: a few small arrays per chunk, and the checker takes NumPy
        x = (candidates if isinstance(candidates, np.ndarray)
             else candidates.detach().cpu().numpy())
        kept = accepted.detach().cpu().numpy()
        if x.shape[0] > spread:
            first = farthest_point_indices(x, spread)
            rest = np.ones(x.shape[0], dtype=bool)
            rest[first] = False
            x = np.concatenate([x[first], x[rest]])
        while start < x.shape[0] and needed > 0 and not deadline.expired():
            size = math.ceil(needed / max(valid / checked if checked else 1.0, 0.25))
            chunk = x[start:start + size]
            start += size
            fresh = chunk[_distinct_rows(kept, chunk, cfg.min_joint_distance)]
            if fresh.shape[0] == 0:
                continue
            ok = self._exact_valid(fresh, world)
            checked += fresh.shape[0]
            valid += int(ok.sum())
            kept = np.concatenate([kept, fresh[ok]])
            needed -= int(ok.sum())
        added = torch.from_numpy(kept[accepted.shape[0]:]).to(accepted.device, accepted.dtype)
        return torch.cat([accepted, added]), checked, valid

    def _merge(self, cfg: IKAdaptConfig, accepted: torch.Tensor,
               new: torch.Tensor) -> torch.Tensor:
        """Append rows of ``new`` that are not duplicates of accepted ones (or of each other)."""
        if new.shape[0] == 0:
            return accepted
        fresh = _distinct_rows(accepted.detach().cpu().numpy(), new.detach().cpu().numpy(),
                               cfg.min_joint_distance)
        return torch.cat([accepted, new[fresh]]) if fresh else accepted

    def _describe(self, q: torch.Tensor, target: IKTarget, world: CollisionWorld,
                  known_valid: bool = False) -> list[IKSolution]:
        """Solutions for rows of ``q``, diverse first choice kept, ranked best first
        (``known_valid``: every row passed :meth:`_acceptable` already).

        Rank: collision-free first, then by clearance from the obstacles (all accepted solutions
        reach the target within tolerance, so their scores differ only in the fifth decimal).
        """
        # on the host in float64 (a few rows: NumPy's per-call cost is a third of torch's), the
        # configurations as returned
        x = q.detach().cpu().double().numpy()
        finite = np.isfinite(x).all(1)
        if not finite.all():  # never answer NaN joints, whatever went wrong upstream
            x, q = x[finite], q[torch.from_numpy(finite).to(q.device)]
        if x.shape[0] == 0:  # no sample was valid and nothing was refined
            return []
        # the link poses serve the sphere model only: the exact checker poses its own model
        poses = self.kin.link_poses(q) if self.exact is None else None
        valid = (np.ones(x.shape[0], dtype=bool) if known_valid
                 else self._valid(q, world, poses).cpu().numpy())
        clearance = self._clearance(x, world, q, poses)
        ee = self.kin.ee_pose_numpy(x)  # (B, 4, 4)
        pose = target.pose_numpy
        pos_err = np.linalg.norm(ee[:, :3, 3] - pose[:3, 3], axis=-1)
        rot_err = (np.zeros_like(pos_err) if target.rotation is None else
                   geodesic_distance_numpy(pose[:3, :3], ee[:, :3, :3]))
        score = np.where(valid, np.exp(-pos_err), 0.0)
        order = np.argsort(-(valid * 1e3 + clearance.clip(-1.0, 1.0)), kind="stable")
        return [IKSolution(q=x[i].copy(), score=float(score[i]),
                           position_error=float(pos_err[i]), orientation_error=float(rot_err[i]),
                           collision_free=bool(valid[i]), clearance=float(clearance[i]))
                for i in order.tolist()]


def _is_rotation(r: list[list[float]], tolerance: float = 1e-3) -> bool:
    """Whether the 3 x 3 matrix ``r`` is a rotation: R Rᵀ within ``tolerance`` of the
    identity, entry by entry, and det R > 0."""
    for i in range(3):
        for j in range(i, 3):
            dot = r[i][0] * r[j][0] + r[i][1] * r[j][1] + r[i][2] * r[j][2]
            if abs(dot - (i == j)) > tolerance:
                return False
    (a, b, c), (d, e, f), (g, h, k) = r
    return a * (e * k - f * h) - b * (d * k - f * g) + c * (d * h - e * g) > 0.0


def _distinct_rows(old: np.ndarray, new: np.ndarray, apart: float) -> list[int]:
    """Indices of the rows of ``new (N, 7)`` at least ``apart`` (max-norm) from every row of
    ``old (A, 7)`` and from the ones taken before them (greedy, in order)."""
    new_ok = (np.abs(new[:, None] - old[None]).max(-1) >= apart).all(1)  # (N,)
    far = np.abs(new[:, None] - new[None]).max(-1) >= apart  # (N, N)
    fresh: list[int] = []
    for i in np.flatnonzero(new_ok).tolist():  # booleans only
        if far[i, fresh].all():
            fresh.append(i)
    return fresh
