"""Collision-aware IK by MACE: adapt the IK prior to a scene at query time, then refine exactly.

:class:`IKAdapter` holds what every request shares (the priors, the checkers, the refiners, the
validated configs); one request runs as the named stages of
:class:`~mace_core.ik.pipeline.RequestPipeline` (Algorithm 1 with the IK score of paper
Sec. 4.2).
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import replace

import numpy as np
import torch

from ..deadline import Deadline
from ..errors import InvalidRequestError, ModelLoadError, format_numbers, quote
from ..robot.backends import exact_checker
from ..robot.closed_form_ik import PandaClosedFormIK
from ..robot.collision import SceneCollisionChecker
from ..robot.kinematics import PANDA_READY, RobotKinematics, panda_urdf_path
from ..robot.rotations import geodesic_distance_numpy
from ..robot.scenes import Obstacle, padded, validate_obstacles
from ..robot.spheres import CollisionWorld, SphereCollisionChecker
from ..tensor import TensorSpec
from .conditioning import context_of
from .conditioned import _ConditionedPrior
from .pipeline import RequestPipeline
from .prior import ARGMMPrior
from .refinement import (AnalyticRefiner, DLSRefiner, IKTarget, PenaltyFn, Refiner, TracIKRefiner,
                         pose_errors)
from .refinement_rounds import farthest_point_indices, farthest_point_order
from .registry import IK_KINDS, load_ik_prior, load_registry
from .request import CLEARANCE_REACH_M, IKAdaptConfig, IKAdaptResult, IKRequest, IKSolution

#: The request fields that override the config's ``mace`` (Algorithm 1's settings), and all
#: the fields that override the config (see :meth:`IKAdapter.effective_config`).
_MACE_OVERRIDES = ("iterations", "objective", "num_samples", "quantile", "gradient_steps",
                   "learning_rate")
_OVERRIDES = ("num_solutions", "time_budget_s", "refinement") + _MACE_OVERRIDES
#: Validated configs kept at most (by their overrides; then the cache starts afresh).
_CONFIGS_KEPT = 64

#: rad a seed state may lie beyond a joint limit (it is clamped onto it)
SEED_STATE_SLACK_RAD = 0.05

#: Origin of joint 2 (the shoulder) in the base frame, m; reach is measured from there.
_SHOULDER = (0.0, 0.0, 0.333)


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
        if request.seed_state is not None:
            self._validate_seed_state(request.seed_state)
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

    def _at_end_effector(self, request: IKRequest) -> IKRequest:
        """``request`` with its target moved from ``ik_link`` onto the end effector: ``T_ee =
        T_link · T_link_ee`` for a link rigidly attached to it (``kin.ee_in_link``), as MoveIt's
        ``ik_link_name``; unchanged where it names none or the end effector itself.

        Raises:
            InvalidRequestError: a link not rigidly attached to the end effector, or a
                position-only target for a link whose origin is not the end effector's (where
                the end effector lies depends on the orientation, which is not given).
        """
        link, ee = request.ik_link, self.kin.ee_link
        if link in ("", ee):
            return request
        offset = self.kin.ee_in_link.get(link) if isinstance(link, str) else None
        if offset is None:
            raise InvalidRequestError(
                f"ik_link {quote(link)} is not a link rigidly attached to the end effector "
                f"{quote(ee)} (these are: {', '.join(sorted(self.kin.ee_in_link))})")
        if request.rotation is None:
            away = float(np.linalg.norm(offset[:3, 3]))
            if away > 1e-9:
                raise InvalidRequestError(
                    f"a position target for ik_link {quote(link)} needs its orientation "
                    f"(use_orientation): the end effector {quote(ee)} is {away * 1e3:.1f} mm "
                    f"from it, in a direction that turns with it")
            return replace(request, ik_link="")
        pose = np.eye(4)
        pose[:3, :3] = np.asarray(request.rotation, dtype=float)
        pose[:3, 3] = np.asarray(request.position, dtype=float)
        at_ee = pose @ offset
        return replace(request, position=at_ee[:3, 3], rotation=at_ee[:3, :3], ik_link="")

    def _validate_seed_state(self, seed_state) -> None:
        """Raise InvalidRequestError unless ``seed_state`` is the arm's joints, finite and
        within their limits up to :data:`SEED_STATE_SLACK_RAD` (a robot at a stop may read a
        hair beyond it; a value far beyond is a unit mistake, degrees for radians)."""
        kin = self.kin
        seed = np.asarray(seed_state, dtype=float)
        if seed.shape != (kin.num_joints,) or not np.isfinite(seed).all():
            raise InvalidRequestError(f"seed_state must be {kin.num_joints} finite joint "
                                      f"positions (rad), got {format_numbers(seed.reshape(-1))}")
        lower, upper = kin.limits_numpy
        outside = (seed < lower - SEED_STATE_SLACK_RAD) | (seed > upper + SEED_STATE_SLACK_RAD)
        if outside.any():
            j = int(np.argmax(outside))
            raise InvalidRequestError(
                f"seed_state: {kin.joint_names[j]} = {seed[j]:.4g} rad is outside its limits "
                f"[{lower[j]:.4g}, {upper[j]:.4g}] (radians expected)")

    def _world_of(self, obstacles: list[Obstacle]) -> CollisionWorld:
        """The obstacles validated, grown by the padding and tensorized; the last request's
        world when they are the same (a planning pipeline asks for many targets in one scene;
        0.4 to 0.6 ms a request in the benchmark scenes)."""
        key = tuple(obstacles)
        if self._world_of_last(key) is None:
            pad = self.config.collision.padding_m
            if pad > 0.0:  # as given: the grown ones are checked where they are tensorized
                validate_obstacles(key)
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
        link poses when known); :data:`CLEARANCE_REACH_M` where none is nearer."""
        pad = self.config.collision.padding_m
        if self.exact is None:
            near = self.checker.clearance(q, world, poses=poses).cpu().double().numpy() + pad
            return np.minimum(near, CLEARANCE_REACH_M)
        self.exact.set_obstacles(world.obstacles)
        return np.minimum(self.exact.clearance(x, reach_m=CLEARANCE_REACH_M) + pad,
                          CLEARANCE_REACH_M)

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

        The stages of :class:`~mace_core.ik.pipeline.RequestPipeline`, in turn.

        Args:
            request: the query.
            start: ``time.perf_counter()`` value the budget counts from (e.g. when a service
                received the request); None: now.
            cancel: an event that, once set, ends the request within one step of its current
                loop (the answer is then whatever was found).
        """
        self.exact_checks = 0
        run = RequestPipeline(self, self._at_end_effector(request), start, cancel)
        run.answer_one_from_seed_state()
        run.draw_first_batch()
        run.refine_while_adding()
        run.adapt_with_rounds()
        run.refine_adapted_batches()
        run.add_nearest_to_seed_state()
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
        if "tracik" in self.refiners:  # its first call from a seed state takes twice as long
            ready = np.array(PANDA_READY)
            pose = self.kin.ee_pose(self.spec.tensor(ready)[None])[0].detach().cpu().double()
            self.refiners["tracik"].solve_from_seed_state(ready, pose.numpy())
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
                  known_valid: bool = False,
                  seed_state: torch.Tensor | None = None) -> list[IKSolution]:
        """Solutions for rows of ``q``, diverse first choice kept, ranked best first
        (``known_valid``: every row passed :meth:`_acceptable` already).

        Rank: collision-free first, then by Euclidean joint distance from ``seed_state (7,)``
        when given (the robot's state: the nearest is the least motion), else by clearance
        from the obstacles (all accepted solutions reach the target within tolerance, so their
        scores differ only in the fifth decimal).
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
        if seed_state is None:
            order = np.argsort(-(valid * 1e3 + clearance.clip(-1.0, 1.0)), kind="stable")
        else:
            away = np.linalg.norm(x - seed_state.detach().cpu().double().numpy(), axis=-1)
            order = np.lexsort((away, ~valid))
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
