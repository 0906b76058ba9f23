"""What an IK request asks and what it gets back: the service's settings and limits
(:class:`IKAdaptConfig`, :class:`IKLimits`), one query (:class:`IKRequest`) and its answer
(:class:`IKAdaptResult` of :class:`IKSolution`). Served by :class:`.adapter.IKAdapter`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidRequestError, quote
from ..mace import MACEConfig
from ..robot.collision import CollisionConfig
from ..robot.scenes import Obstacle
from .refinement import RefinementConfig

REFINEMENTS = ("none", "dls", "tracik", "moveit", "analytic")
#: m, the farthest a solution's clearance is measured: where no obstacle is nearer, this
CLEARANCE_REACH_M = 1.0


@dataclass
class IKLimits:
    """Hard limits on what one request may ask for (the node's safety net)."""

    max_solutions: int = 64  #: K at most
    max_samples: int = 16384  #: N at most (also the largest pool_size)
    max_iterations: int = 2000  #: T at most
    max_gradient_steps: int = 256  #: M at most
    max_learning_rate: float = 0.1  #: largest Adam step size (larger ones turn weights to NaN)
    max_time_budget_s: float = 30.0  #: s
    max_obstacles: int = 512  #: primitives per request
    max_batch_targets: int = 1000  #: targets in one batch (``/mace/adapt_ik_batch``)
    #: m, largest obstacle size and distance of an obstacle's centre from the base along any
    #: axis (float32 geometry stays exact to well below a millimetre within it)
    max_coordinate_m: float = 100.0
    reach_m: float = 1.0  #: farthest target from the shoulder (joint 2), m


@dataclass
class IKAdaptConfig:
    """Defaults of the IK service; a request's fields (:class:`IKRequest`) override some."""

    mace: MACEConfig = field(default_factory=lambda: MACEConfig(
        num_samples=256, quantile=1.0 / 16.0, gradient_steps=16, iterations=40,
        learning_rate=1e-4, objective="cem", pool_size=512))  #: Algorithm 1 settings
    refinement: RefinementConfig = field(default_factory=RefinementConfig)  #: exact solvers
    #: which checker accepts answers, and their clearance (fixed when the adapter is built)
    collision: CollisionConfig = field(default_factory=CollisionConfig)
    num_solutions: int = 8  #: K, solutions returned
    time_budget_s: float = 1.0  #: s for the whole request
    refinement_mode: str = "dls"  #: one of ``REFINEMENTS``
    #: refinement of requests with an orientation that name none: "analytic" (the Panda's
    #: closed form, exact) where the robot is a Panda, else ``refinement_mode``
    pose_refinement_mode: str = "analytic"
    #: prior samples of the first refinement round (the fast path); with no more than
    #: ``refine_seeds`` of them every one is a seed, with no selection to pay for
    first_samples: int = 48
    #: ``first_samples`` of a full-pose request answered in closed form: each sample gives up
    #: to 8 exact solutions, so fewer do (box / cabinet pose targets, 20 each, in turns: 16
    #: samples 7.0 / 8.4 ms median against 48's 8.4 / 9.7 ms, the same targets with K)
    pose_first_samples: int = 16
    #: registry name of a pose-conditioned IK prior (``mace-train ik --conditioning pose``)
    #: that full poses answered in closed form draw from; empty: they draw from the position
    #: prior (``ik_model``). A change rebuilds the adapter. ``panda_ik_pose_q7``: its q7
    #: values fit the orientation, so one round usually finds K, and, q7 first in its
    #: factorization, it draws them with one network of seven (pose targets, in turns with
    #: ``panda_ik_pose_small``: median 0.90-0.96x, more diverse; models/panda_ik_pose_q7.md)
    pose_prior: str = "panda_ik_pose_q7"
    #: configurations uniform in the joint limits added to the seeds of a round of a full pose
    #: answered in closed form when the round before added nothing: every branch at q7 values
    #: the prior does not draw (window pose targets, 20, in turns: 64 gave all 8 on 18 against
    #: 16 without, p90 0.58 against 1.00 s; 192 with ``pose_gradient_steps`` 4: see there)
    pose_explore_seeds: int = 192
    #: M of the MACE iterations of a full pose answered in closed form (a request's own
    #: ``gradient_steps`` wins): an iteration costs the gradient steps on the 7 networks most
    #: (about 5 ms each here), while explore rounds (a closed form and exact checks) are cheap.
    #: The window's two hardest pose targets, 8 seeds each, in turns: median 59 ms against
    #: 520 ms with M = 16 and 64 explore seeds, all 8 on 16 of 16 against 15 (the floor,
    #: closed-form restarts: 72 and 277 ms); the cabinet's two: 25 against 24 ms
    pose_gradient_steps: int = 4
    refine_seeds: int = 48  #: candidates refined per round (fewer second rounds than 32)
    #: a request is in clutter when fewer than this share of the first batch is valid; its
    #: rounds then draw ``clutter_samples`` and refine ``clutter_seeds``: the nearest of a
    #: larger batch are better seeds, and more seeds per DLS step cost little more (cabinet:
    #: 3x the solutions per round)
    #: (0.05: 2 of 48 is clutter too; 128 samples instead of 512: cabinet median 0.70x for
    #: the MuJoCo backend, 0.88x for the spheres, 40 targets in turns; box, wall and window
    #: unchanged, 0.97-1.06x)
    clutter_valid_fraction: float = 0.05
    clutter_samples: int = 128  #: prior samples per refinement round in clutter
    clutter_seeds: int = 64  #: candidates refined per round in clutter
    #: share of a round's seeds drawn around solutions already accepted, moved along the arm's
    #: self-motion: where the free space is a narrow passage, more solutions lie there
    neighbour_share: float = 0.5
    neighbour_std_rad: float = 2.0  #: rad, std of that noise (before the null-space projection)
    seed_radius_m: float = 0.05  #: a valid sample this close to the target counts as a good seed
    early_stop: bool = True  #: stop adapting once ``refine_seeds`` good seeds are pooled
    min_joint_distance: float = 0.1  #: rad (max-norm); closer solutions are duplicates
    refine_reserve_s: float = 0.4  #: s of the budget kept for refinement after adaptation
    limits: IKLimits = field(default_factory=IKLimits)  #: hard limits per request

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first field that is out of range."""
        lim, ref = self.limits, self.refinement

        def check(ok: bool, name: str, want: str, value, hint: str = "") -> None:
            if not ok:
                shown = quote(value) if isinstance(value, str) else repr(value)
                raise InvalidRequestError(f"{name} must be {want}, got {shown}"
                                          + (f" ({hint})" if hint else ""))

        for name in ("max_solutions", "max_samples", "max_iterations", "max_gradient_steps",
                     "max_obstacles", "max_batch_targets"):
            check(getattr(lim, name) >= 1, f"limits.{name}", ">= 1", getattr(lim, name))
        for name in ("max_time_budget_s", "max_learning_rate", "max_coordinate_m", "reach_m"):
            value = getattr(lim, name)
            check(math.isfinite(value) and value > 0, f"limits.{name}", "> 0", value)
        check(1 <= self.num_solutions <= lim.max_solutions, "num_solutions",
              f"in [1, {lim.max_solutions}]", self.num_solutions,
              f"limits.max_solutions = {lim.max_solutions}")
        check(math.isfinite(self.time_budget_s) and 0 < self.time_budget_s
              <= lim.max_time_budget_s, "time_budget_s", f"in (0, {lim.max_time_budget_s}] s",
              self.time_budget_s)
        check(self.refinement_mode in REFINEMENTS, "refinement_mode", f"one of {REFINEMENTS}",
              self.refinement_mode)
        check(self.pose_refinement_mode in REFINEMENTS, "pose_refinement_mode",
              f"one of {REFINEMENTS}", self.pose_refinement_mode)
        check(self.refine_seeds >= 1, "refine_seeds", ">= 1", self.refine_seeds)
        check(self.clutter_seeds >= 1, "clutter_seeds", ">= 1", self.clutter_seeds)
        check(1 <= self.pose_gradient_steps <= lim.max_gradient_steps, "pose_gradient_steps",
              f"in [1, limits.max_gradient_steps = {lim.max_gradient_steps}]",
              self.pose_gradient_steps)
        check(0 <= self.pose_explore_seeds <= lim.max_samples, "pose_explore_seeds",
              f"in [0, limits.max_samples = {lim.max_samples}]", self.pose_explore_seeds)
        for name in ("first_samples", "pose_first_samples", "clutter_samples"):
            value = getattr(self, name)
            check(1 <= value <= lim.max_samples, name,
                  f"in [1, limits.max_samples = {lim.max_samples}]", value)
        check(0.0 <= self.clutter_valid_fraction <= 1.0, "clutter_valid_fraction", "in [0, 1]",
              self.clutter_valid_fraction)
        check(0.0 <= self.neighbour_share <= 1.0, "neighbour_share", "in [0, 1]",
              self.neighbour_share)
        for name in ("seed_radius_m", "min_joint_distance", "refine_reserve_s",
                     "neighbour_std_rad"):
            value = getattr(self, name)
            check(math.isfinite(value) and value >= 0, name, ">= 0", value)
        check(self.mace.num_samples <= lim.max_samples, "mace.num_samples",
              f"at most limits.max_samples = {lim.max_samples}", self.mace.num_samples)
        check(self.mace.iterations <= lim.max_iterations, "mace.iterations",
              f"at most limits.max_iterations = {lim.max_iterations}", self.mace.iterations)
        check(self.mace.gradient_steps <= lim.max_gradient_steps, "mace.gradient_steps",
              f"at most limits.max_gradient_steps = {lim.max_gradient_steps}",
              self.mace.gradient_steps)
        check(self.mace.learning_rate <= lim.max_learning_rate, "mace.learning_rate",
              f"at most limits.max_learning_rate = {lim.max_learning_rate}",
              self.mace.learning_rate)
        check(self.mace.pool_size <= lim.max_samples, "mace.pool_size",
              f"at most limits.max_samples = {lim.max_samples}", self.mace.pool_size)
        try:
            self.mace.validate()
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"mace.{exc}") from exc
        self.collision.validate()
        check(ref.max_iterations >= 1, "refinement.max_iterations", ">= 1", ref.max_iterations)
        check(ref.corrections >= 0, "refinement.corrections", ">= 0", ref.corrections)
        check(math.isfinite(ref.exact_check_cost_m) and ref.exact_check_cost_m >= 0,
              "refinement.exact_check_cost_m", ">= 0", ref.exact_check_cost_m)
        for name in ("damping", "max_step", "position_tolerance", "orientation_weight",
                     "tracik_timeout"):
            value = getattr(ref, name)
            check(math.isfinite(value) and value > 0, f"refinement.{name}", "> 0", value)


@dataclass
class IKRequest:
    """One IK query in the robot's base frame. ``None`` fields take the config's defaults."""

    position: np.ndarray  #: (3,) target of the end effector (or of ``ik_link``), m
    obstacles: list[Obstacle] = field(default_factory=list)  #: obstacles, base frame
    rotation: np.ndarray | None = None  #: (3, 3) target orientation, or None: position-only
    orientation_tolerance: float = 0.0  #: rad, used with ``rotation``
    num_solutions: int | None = None  #: K
    time_budget_s: float | None = None  #: s
    iterations: int | None = None  #: T (0: prior samples only)
    refinement: str | None = None  #: one of ``REFINEMENTS``
    objective: str | None = None  #: "cem" or "is"
    num_samples: int | None = None  #: N
    quantile: float | None = None  #: q
    gradient_steps: int | None = None  #: M
    learning_rate: float | None = None  #: Adam step size
    seed: int | None = None  #: random seed; None draws a fresh one
    #: (7,) rad, e.g. the robot's current joints (MoveIt's ``robot_state``): the solution
    #: nearest it joins the answer, which is ranked by joint distance from it (None: by
    #: clearance)
    seed_state: np.ndarray | None = None
    #: the link whose pose ``position`` and ``rotation`` give (MoveIt's ``ik_link_name``): the
    #: end effector ("" or its name) or a link rigidly attached to it (the Panda's flange
    #: ``panda_link8``, ``panda_hand``); tolerances and errors are the end effector's
    ik_link: str = ""


@dataclass
class IKSolution:
    """One returned configuration."""

    q: np.ndarray  #: (7,) joint positions, rad, order of ``IKAdaptResult.joint_names``
    score: float  #: S in [0, 1]: 0 on collision, else exp(−position error)
    position_error: float  #: m
    orientation_error: float  #: rad (0 for position-only requests)
    collision_free: bool  #: free of self-collision and obstacles, within joint limits
    #: m, smallest distance from the arm's links to an obstacle as given (the exact checker's
    #: meshes, or a lower bound by the spheres); :data:`CLEARANCE_REACH_M` where none is nearer
    clearance: float


@dataclass
class IKTimings:
    """Seconds spent in each stage of a request."""

    sampling: float = 0.0  #: drawing and scoring prior samples (and later batches)
    adaptation: float = 0.0  #: MACE iterations
    refinement: float = 0.0  #: exact solvers and re-checks
    total: float = 0.0  #: the whole request


@dataclass
class IKAdaptResult:
    """What :meth:`IKAdapter.solve` returns."""

    solutions: list[IKSolution]  #: at most K, best first
    joint_names: list[str]  #: names of the 7 joints
    num_requested: int  #: K asked for
    #: solutions that are collision-free and, when refined, reach the target within tolerance
    num_found: int
    #: share of the first prior batch that is valid (``first_samples`` of them when refining,
    #: else N; a full pose answered in closed form: of the first round's candidates, the
    #: prior's samples projected onto the pose, that the exact checker was asked about)
    valid_fraction_prior: float
    valid_fraction_adapted: float  #: share of samples of the adapted model that are valid
    iterations_run: int  #: MACE iterations actually run
    timings: IKTimings  #: stage times
    message: str = ""  #: what happened, for humans
    #: configurations put to the exact checker (``ik.collision.backend``) for this request
    exact_checks: int = 0

    @property
    def success(self) -> bool:
        """True when at least one solution was found (see ``num_found``)."""
        return self.num_found > 0
