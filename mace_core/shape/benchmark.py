"""Benchmark of shape completion: MACE-VAE against the prior on held-out shapes (paper Sec. 4.1,
App. A and App. C), ``mace-bench shape --prior boxes|objects``.

Every case is one held-out shape (the truth) and, per mode, one observation of it:

- ``random_cut``: the points on one side of a random plane (App. C's simulator; the plane keeps
  between 30 % and 70 % of the points);
- ``top_cut`` (boxes): a horizontal plane at half the height hides the top half, so the height
  is unobserved (an ambiguous observation: the posterior should stay diverse);
- ``view`` (objects): what a depth camera at a random viewpoint sees (z-buffer), sent with the
  viewpoint;
- ``grasp``: the contacts of 5 fingers closing on a point inside the object (App. A; Sec. 4.1:
  four along the diagonals of the xy plane and one along +x); ``grasp_ood``: the fifth finger
  along -x instead (the paper's out-of-distribution pattern). The point is the origin for
  objects (centred on it) and 0.05 m above it for boxes (which stand on the xy plane, at least
  0.1 m tall), see :data:`GRASP_CENTERS`.

Boxes are drawn afresh from a seed that training never uses; objects are the meshes held out of
training (every 10th ``random_urdfs`` mesh, :func:`mace_core.shape.data.held_out_object_names`).

Methods, each answering K completions through :class:`ShapeCompleter`:

- ``prior``: K plain draws of the prior p(x; θ_0) (the paper's comparison, Fig. 1 and 16);
- ``prior_best``: the K best-scoring of N prior draws (``iterations = 0``, the service's answer
  without adaptation: a rejection-sampling baseline);
- ``mace``: MACE-VAE with the service's settings and the time budget.

Reported per method: ``mean_score`` (S of the completions against the observation),
``mean_chamfer_to_truth`` and ``mean_pairwise_chamfer`` (diversity), both as the symmetric
Chamfer distance in the cloud's units² (mean squared nearest-neighbour distance, summed over both
directions: m² for boxes), and ``median_time_s`` (wall time of one request).

For boxes, each mode also reports ``box_posterior``, a reference that knows the truth's footprint
(:func:`box_posterior_reference`): K boxes of that footprint whose heights are drawn from the
posterior the observation leaves. Where a cut or the contacts hide the height, it shows how
close to the truth an answer can come while staying as diverse as the posterior.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..errors import InvalidRequestError
from ..tensor import TensorSpec
from .completion import ShapeCompleter, ShapeCompletionConfig, ShapeCompletionRequest
from .data import (BOX_EDGE_RANGE_M, held_out_object_names, normalised_mesh_samples,
                   pybullet_object_meshes, random_box_edges, rotate_z, sample_box_clouds)
from .observations import simulate_contacts, visible_mask
from .vae import ShapePrior

#: Observation modes per data set, in table order.
MODES = {"boxes": ("random_cut", "top_cut", "grasp", "grasp_ood"),
         "objects": ("random_cut", "view", "grasp", "grasp_ood")}
#: Modes whose observation leaves a whole dimension unobserved (diversity expected).
AMBIGUOUS_MODES = ("top_cut", "grasp", "grasp_ood")
#: Methods, in table order.
METHODS = ("prior", "prior_best", "mace")
#: Offset of the seed of the test boxes: training draws from seed + 1000, 2000 and 3000.
BOX_TEST_SEED_OFFSET = 50_000
#: Finger motion directions of the 5-finger grasp (Sec. 4.1): the xy diagonals and +x.
_S = math.sqrt(0.5)
GRASP_DIRECTIONS = ((_S, _S, 0.0), (_S, -_S, 0.0), (-_S, _S, 0.0), (-_S, -_S, 0.0),
                    (1.0, 0.0, 0.0))
#: The out-of-distribution pattern: the fifth finger along -x.
GRASP_OOD_DIRECTIONS = GRASP_DIRECTIONS[:4] + ((-1.0, 0.0, 0.0),)
#: Point the fingers close on, per prior, in the cloud's units: inside every shape of the data
#: set (App. A). Boxes stand on the xy plane and are 0.1 to 0.5 m tall; objects are centred.
GRASP_CENTERS = {"boxes": (0.0, 0.0, 0.05), "objects": (0.0, 0.0, 0.0)}


# ----------------------------------------------------------------------------------------------
# Observations (the simulators of App. A and C)
# ----------------------------------------------------------------------------------------------

def plane_cut(cloud: torch.Tensor, normal: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """The points of ``cloud`` ``(P, 3)`` below a plane of normal ``normal`` ``(3,)``, placed so
    that ``keep_fraction`` of them are kept: ``(P', 3)``."""
    height = cloud @ (normal / normal.norm())
    return cloud[height <= torch.quantile(height, keep_fraction)]


def random_plane_cut(cloud: torch.Tensor, generator: torch.Generator,
                     keep_range: tuple[float, float] = (0.3, 0.7)) -> torch.Tensor:
    """A cut by a random plane (uniform normal) keeping a fraction in ``keep_range``."""
    normal = torch.randn(3, generator=generator, device=cloud.device, dtype=cloud.dtype)
    lo, hi = keep_range
    keep = lo + (hi - lo) * float(torch.rand(1, generator=generator, device=cloud.device))
    return plane_cut(cloud, normal, keep)


def top_cut(cloud: torch.Tensor, keep_height: float = 0.5) -> torch.Tensor:
    """Hide everything above ``keep_height`` of the cloud's height (z from its lowest point):
    the observation does not tell the height."""
    z = cloud[:, 2]
    return cloud[z <= z.min() + keep_height * (z.max() - z.min())]


def side_cut(cloud: torch.Tensor, angle: float) -> torch.Tensor:
    """Hide the side of a vertical plane through the z axis (normal at ``angle`` rad from x)."""
    normal = torch.tensor([math.cos(angle), math.sin(angle), 0.0], dtype=cloud.dtype,
                          device=cloud.device)
    return cloud[cloud @ normal <= 0.0]


def random_viewpoint(generator: torch.Generator, distance: float,
                     elevation_deg: tuple[float, float] = (10.0, 50.0),
                     target: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """A camera position ``distance`` from ``target``, random azimuth and elevation: ``(3,)``."""
    u = torch.rand(2, generator=generator, device=generator.device, dtype=torch.float64)
    azimuth = 2.0 * math.pi * float(u[0])
    elevation = math.radians(elevation_deg[0] + (elevation_deg[1] - elevation_deg[0])
                             * float(u[1]))
    offset = [distance * math.cos(elevation) * math.cos(azimuth),
              distance * math.cos(elevation) * math.sin(azimuth), distance * math.sin(elevation)]
    return torch.tensor([t + o for t, o in zip(target, offset)])


def camera_view(dense: torch.Tensor, viewpoint: torch.Tensor, pixel: float,
                depth_tolerance: float) -> torch.Tensor:
    """The points of a dense cloud ``(P, 3)`` a depth camera at ``viewpoint`` sees: ``(P', 3)``.

    ``pixel`` and ``depth_tolerance`` are in cloud units; the pixel must be a few times the point
    spacing (see :func:`mace_core.shape.observations.visible_mask`)."""
    vis = visible_mask(dense[None], viewpoint.to(dense), dense.mean(dim=0), pixel,
                       depth_tolerance)[0]
    return dense[vis]


def grasp_contacts(cloud: torch.Tensor, directions, finger_radius: float,
                   center=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """Fingertip contacts ``(k, 3)`` of fingers moving along ``directions`` ``(k, 3)`` toward
    ``center`` (App. A's simulator); a finger that misses touches the centre."""
    d = torch.as_tensor(directions, dtype=cloud.dtype, device=cloud.device)
    c = torch.as_tensor(center, dtype=cloud.dtype, device=cloud.device)
    contacts, _ = simulate_contacts(cloud[None] - c, d, finger_radius)
    return contacts[0] + c


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def symmetric_chamfer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Symmetric Chamfer distance of cloud pairs ``(B, P, 3)`` and ``(B, Q, 3)``: mean squared
    nearest-neighbour distance of both directions, summed, cloud units²: ``(B,)``.

    Equal to ``chamfer_k(a, b, k=1) / REFERENCE_POINTS``, from one distance matrix per pair
    (read along both axes) instead of two: half the work.
    """
    sq_a, sq_b = (a * a).sum(-1), (b * b).sum(-1)
    d2 = torch.baddbmm(sq_a[:, :, None] + sq_b[:, None, :], a, b.transpose(1, 2), alpha=-2.0)
    return d2.amin(dim=-1).clamp_min(0.0).mean(-1) + d2.amin(dim=-2).clamp_min(0.0).mean(-1)


def chamfer_to(clouds: torch.Tensor, truth: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """Symmetric Chamfer distance (:func:`symmetric_chamfer`) of each cloud ``(K, P, 3)`` to
    ``truth`` ``(Q, 3)``: ``(K,)`` cloud units²."""
    return torch.cat([symmetric_chamfer(c, truth.expand(c.shape[0], -1, -1))
                      for c in clouds.split(chunk)])


def mean_pairwise_chamfer(clouds: torch.Tensor, chunk: int = 4) -> float:
    """Mean symmetric Chamfer distance (:func:`symmetric_chamfer`) over all pairs of
    ``(K, P, 3)`` clouds; 0 for a single cloud."""
    pairs = torch.combinations(torch.arange(clouds.shape[0], device=clouds.device), 2)
    if pairs.numel() == 0:
        return 0.0
    total = 0.0
    for start in range(0, pairs.shape[0], chunk):
        i, j = pairs[start:start + chunk].unbind(-1)
        total += float(symmetric_chamfer(clouds[i], clouds[j]).sum())
    return total / pairs.shape[0]


# ----------------------------------------------------------------------------------------------
# Configuration and cases
# ----------------------------------------------------------------------------------------------

@dataclass
class ShapeBenchmarkConfig:
    """What ``mace-bench shape`` runs."""

    prior: str = "boxes"  #: "boxes" or "objects": the prior and its data set
    num_cases: int = 20  #: held-out shapes; each is observed once per mode
    seed: int = 0  #: seeds the shapes, the observations and every request
    modes: tuple[str, ...] = ()  #: subset of MODES[prior]; empty: all of them
    methods: tuple[str, ...] = METHODS  #: subset of METHODS
    num_completions: int = 8  #: K per request
    time_budget_s: float = 5.0  #: s, budget of one MACE request
    iterations: int = -1  #: MACE iterations T per request; -1: the completer's default
    sensor_points: int = 4096  #: points of the sensed cloud before a cut (boxes)
    object_points: int = 8192  #: points sampled on an object mesh (its views and cuts)
    view_distance: float = 1.5  #: camera distance, units of the prior's length scale
    view_pixel: float = 0.03  #: z-buffer pixel of the simulated camera, units of ℓ
    finger_radius: float = 0.0  #: finger radius, cloud units; 0: the completer's default
    warmup: bool = True  #: warm the completer up before timing

    def validate(self, modes: tuple[str, ...]) -> None:
        """Raise InvalidRequestError on values the benchmark cannot run with."""
        if self.prior not in MODES:
            raise InvalidRequestError(f"prior must be one of {sorted(MODES)}, got "
                                      f"'{self.prior}'")
        unknown = sorted(set(modes) - set(MODES[self.prior]))
        if unknown:
            raise InvalidRequestError(f"modes {unknown} unknown for '{self.prior}' (known: "
                                      f"{list(MODES[self.prior])})")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise InvalidRequestError(f"methods must be a non-empty subset of {list(METHODS)}")
        if self.num_cases < 1 or self.num_completions < 2:
            raise InvalidRequestError("num_cases must be >= 1 and num_completions >= 2 (the "
                                      "diversity needs pairs)")
        if not self.time_budget_s > 0:
            raise InvalidRequestError(f"time_budget_s must be > 0, got {self.time_budget_s}")


@dataclass
class ShapeCase:
    """One held-out shape and its dense samples."""

    name: str  #: "box 3" or the mesh path
    truth: torch.Tensor  #: (num_points, 3) the full cloud completions are compared with
    dense: torch.Tensor  #: (S, 3) a denser independent sample of the same shape (the sensor)
    info: dict  #: what the case is (box edges, rotation; object name)


def box_cases(n: int, seed: int, num_points: int, sensor_points: int,
              spec: TensorSpec) -> list[ShapeCase]:
    """``n`` fresh boxes (seed offset so training never saw the draw), random z rotation."""
    gen = spec.generator(seed + BOX_TEST_SEED_OFFSET)
    edges = random_box_edges(n, gen).to(spec.dtype)
    angles = (torch.rand(n, generator=gen, device=spec.device, dtype=spec.dtype) * 2 - 1) * math.pi
    truth = sample_box_clouds(edges, num_points, gen, angle=angles)
    dense = sample_box_clouds(edges, sensor_points, gen, angle=angles)
    return [ShapeCase(f"box {i}", truth[i], dense[i],
                      dict(edges_m=[round(e, 4) for e in edges[i].tolist()],
                           angle_rad=round(float(angles[i]), 4)))
            for i in range(n)]


def object_cases(n: int, seed: int, num_points: int, object_points: int, spec: TensorSpec,
                 data_path: str | None = None) -> list[ShapeCase]:
    """``n`` of the held-out pybullet_data meshes (spread evenly over the list), normalised as
    in training, random z rotation."""
    if data_path is None:
        import pybullet_data

        data_path = pybullet_data.getDataPath()
    names = held_out_object_names(pybullet_object_meshes(data_path))
    if not names:
        raise InvalidRequestError(f"no held-out object meshes under {data_path}")
    picks = [names[(i * len(names)) // n % len(names)] for i in range(n)] if n <= len(names) \
        else [names[i % len(names)] for i in range(n)]
    gen = spec.generator(seed + BOX_TEST_SEED_OFFSET)
    cases = []
    for i, name in enumerate(picks):
        dense = torch.as_tensor(normalised_mesh_samples(Path(data_path) / name, object_points,
                                                        seed + i), dtype=spec.dtype,
                                device=spec.device)
        angle = (torch.rand(1, generator=gen, device=spec.device, dtype=spec.dtype) * 2 - 1) \
            * math.pi
        dense = rotate_z(dense[None], angle)[0]
        pick = torch.randperm(dense.shape[0], generator=gen, device=spec.device)[:num_points]
        cases.append(ShapeCase(name, dense[pick], dense,
                               dict(mesh=name, angle_rad=round(float(angle), 4))))
    return cases


#: Cuts of :func:`partial_box`.
BOX_CUTS = ("top", "side", "random")


def partial_box(cut: str, seed: int, spec: TensorSpec,
                edges: tuple[float, float, float] | None = None, num_points: int = 2048,
                sensor_points: int = 4096) -> tuple[ShapeCase, torch.Tensor]:
    """A test box (as :func:`box_cases`, or with the given ``edges``, m) and a partial cloud of
    it: the lower half (``top``: the top half hidden), one side of a vertical plane through the
    z axis (``side``) or a random plane cut (``random``).

    Returns:
        The case (truth ``(num_points, 3)``, info) and the observed points ``(P, 3)``, m.
    """
    if cut not in BOX_CUTS:
        raise InvalidRequestError(f"cut must be one of {BOX_CUTS}, got '{cut}'")
    case = box_cases(1, seed, num_points, sensor_points, spec)[0]
    if edges is not None:
        e = torch.as_tensor([edges], dtype=spec.dtype, device=spec.device)
        if e.shape != (1, 3) or not bool((e > 0).all()):
            raise InvalidRequestError(f"edges must be three lengths > 0, got {edges}")
        gen = spec.generator(seed)
        angle = torch.full((1,), case.info["angle_rad"], dtype=spec.dtype, device=spec.device)
        case = ShapeCase(case.name, sample_box_clouds(e, num_points, gen, angle=angle)[0],
                         sample_box_clouds(e, sensor_points, gen, angle=angle)[0],
                         dict(case.info, edges_m=[float(v) for v in edges]))
    gen = spec.generator(seed + 1)
    if cut == "top":
        observed = top_cut(case.dense)
    elif cut == "side":
        observed = side_cut(case.dense, 2.0 * math.pi * float(torch.rand(1, generator=gen)))
    else:
        observed = random_plane_cut(case.dense, gen)
    return case, observed


def observe(case: ShapeCase, mode: str, generator: torch.Generator, length_scale: float,
            cfg: ShapeBenchmarkConfig, finger_radius: float) -> dict:
    """The request fields of ``mode``'s observation of ``case``: points (and viewpoint), or
    contacts, directions and grasp_center."""
    if mode == "random_cut":
        return dict(points=random_plane_cut(case.dense, generator))
    if mode == "top_cut":
        return dict(points=top_cut(case.dense))
    if mode == "view":
        view = random_viewpoint(generator, cfg.view_distance * length_scale).to(case.dense)
        pixel = cfg.view_pixel * length_scale
        return dict(points=camera_view(case.dense, view, pixel, pixel), viewpoint=view)
    directions = GRASP_DIRECTIONS if mode == "grasp" else GRASP_OOD_DIRECTIONS
    d = torch.as_tensor(directions, dtype=case.dense.dtype, device=case.dense.device)
    center = torch.as_tensor(GRASP_CENTERS.get(cfg.prior, (0.0, 0.0, 0.0)),
                             dtype=case.dense.dtype, device=case.dense.device)
    return dict(contacts=grasp_contacts(case.dense, d, finger_radius, center), directions=d,
                grasp_center=center)


def box_posterior_reference(case: ShapeCase, obs: dict, k: int, generator: torch.Generator,
                            edge_range: tuple[float, float] = BOX_EDGE_RANGE_M) -> torch.Tensor:
    """K draws of the exact posterior over a test box's height given its true footprint:
    ``(k, P, 3)`` clouds, P as the truth.

    A reference for the benchmark, not a method: it knows the truth's edges and rotation. The
    observation (``observe``'s dict) says only that the box reaches the highest observed point
    (or contact), unless it shows the top face; the height prior is uniform in ``edge_range``,
    so the posterior height is uniform from that point (at least the smallest edge) to the
    largest edge. Where the height is unobserved, no answer that stays diverse as this
    posterior does can be much closer to the truth than these draws.
    """
    edges = torch.as_tensor(case.info["edges_m"], dtype=case.truth.dtype,
                            device=case.truth.device)
    height = float(edges[2])
    seen = obs["points"] if "points" in obs else obs["contacts"]
    top = float(seen[:, 2].max())
    shown = top >= height - 1e-3  # the top face is in the observation: the height is known
    lo, hi = (height, height) if shown else (max(top, edge_range[0]), edge_range[1])
    draws = edges.repeat(k, 1)
    draws[:, 2] = lo + (hi - lo) * torch.rand(k, generator=generator, device=generator.device,
                                              dtype=draws.dtype)
    angle = torch.full((k,), case.info["angle_rad"], dtype=draws.dtype, device=draws.device)
    return sample_box_clouds(draws, case.truth.shape[0], generator, angle=angle)


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

def warm_up(completer: ShapeCompleter) -> None:
    """Warm ``completer`` up (its own warm-up drops the cold first pass's timings)."""
    completer.warmup()


def _completers(priors: dict[str, ShapePrior], config: ShapeCompletionConfig, k: int,
                spec: TensorSpec) -> dict[str, tuple[ShapeCompleter, dict]]:
    """Method -> (completer, request overrides). ``prior`` draws exactly K samples (N = K)."""
    main = ShapeCompleter(priors, config, spec)
    plain = ShapeCompleter(priors, replace(config, num_samples=k, contact_num_samples=k,
                                           pool_size=k), spec)
    return {"prior": (plain, dict(iterations=0)), "prior_best": (main, dict(iterations=0)),
            "mace": (main, {})}


def _summary(rows: list[dict]) -> dict:
    """Aggregate per-request rows of one method."""
    def mean(key):
        return statistics.fmean(r[key] for r in rows) if rows else math.nan
    return dict(mean_score=mean("mean_score"), mean_chamfer_to_truth=mean("chamfer_to_truth"),
                mean_best_chamfer_to_truth=mean("best_chamfer_to_truth"),
                mean_pairwise_chamfer=mean("pairwise_chamfer"),
                median_time_s=statistics.median(r["time_s"] for r in rows) if rows else math.nan,
                max_time_s=max((r["time_s"] for r in rows), default=math.nan),
                mean_iterations=mean("iterations"), requests=len(rows))


def run_shape_benchmark(priors: dict[str, ShapePrior], config: ShapeCompletionConfig,
                        cfg: ShapeBenchmarkConfig, spec: TensorSpec,
                        log: Callable[[str], None] = lambda s: None,
                        data_path: str | None = None) -> dict:
    """Run every (case, mode, method) and return the report (see the module docstring).

    Raises:
        InvalidRequestError: a bad benchmark configuration, or ``cfg.prior`` not in ``priors``.
    """
    modes = tuple(cfg.modes) or MODES[cfg.prior]
    cfg.validate(modes)
    if cfg.prior not in priors:
        raise InvalidRequestError(f"prior '{cfg.prior}' is not loaded (loaded: {sorted(priors)})")
    vae = priors[cfg.prior].vae
    scale, num_points = vae.config.length_scale, vae.config.num_points
    completers = _completers({cfg.prior: priors[cfg.prior]}, config, cfg.num_completions, spec)
    if cfg.warmup:
        t0 = time.perf_counter()
        warm_up(completers["mace"][0])
        if "prior" in cfg.methods:
            completers["prior"][0].warmup()
        log(f"[shape] warm-up {time.perf_counter() - t0:.1f} s")
    if cfg.prior == "boxes":
        cases = box_cases(cfg.num_cases, cfg.seed, num_points, cfg.sensor_points, spec)
    else:
        cases = object_cases(cfg.num_cases, cfg.seed, num_points, cfg.object_points, spec,
                             data_path)
    radius = cfg.finger_radius or config.finger_radius * scale
    rows: list[dict] = []
    for c, case in enumerate(cases):
        for mode in modes:
            # seeded by the mode's place among all of the prior's modes, so that a run of a
            # subset (--modes) sees the same observations and draws as a full run
            m = MODES[cfg.prior].index(mode)
            gen = spec.generator(cfg.seed * 7919 + 101 * c + m)
            obs = observe(case, mode, gen, scale, cfg, radius)
            row = dict(case=c, shape=case.name, mode=mode, **case.info,
                       observed_points=int(obs["points"].shape[0]) if "points" in obs else 0,
                       methods={})
            for method in cfg.methods:
                completer, extra = completers[method]
                request = ShapeCompletionRequest(
                    prior=cfg.prior, num_completions=cfg.num_completions,
                    time_budget_s=cfg.time_budget_s,
                    iterations=None if cfg.iterations < 0 else cfg.iterations,
                    seed=cfg.seed * 7919 + 101 * c + m,
                    finger_radius=radius if "contacts" in obs else None, **obs)
                request.iterations = extra.get("iterations", request.iterations)
                t0 = time.perf_counter()
                result = completer.complete(request)
                wall = time.perf_counter() - t0
                cd = chamfer_to(result.completions, case.truth)
                row["methods"][method] = dict(
                    mean_score=float(result.scores.mean()), best_score=float(result.scores[0]),
                    chamfer_to_truth=float(cd.mean()), best_chamfer_to_truth=float(cd[0]),
                    pairwise_chamfer=mean_pairwise_chamfer(result.completions), time_s=wall,
                    iterations=result.iterations_run,
                    stopped_by_deadline=result.stopped_by_deadline)
            if cfg.prior == "boxes":
                ref = box_posterior_reference(case, obs, cfg.num_completions, gen)
                row["box_posterior"] = dict(chamfer_to_truth=float(chamfer_to(ref, case.truth)
                                                                   .mean()),
                                            pairwise_chamfer=mean_pairwise_chamfer(ref))
            rows.append(row)
            log(_case_line(row))
    per_mode = {mode: {"methods": {meth: _summary([r["methods"][meth] for r in rows
                                                   if r["mode"] == mode])
                                   for meth in cfg.methods}} for mode in modes}
    if cfg.prior == "boxes":
        for mode in modes:
            refs = [r["box_posterior"] for r in rows if r["mode"] == mode]
            per_mode[mode]["box_posterior"] = {
                key: statistics.fmean(r[key] for r in refs)
                for key in ("chamfer_to_truth", "pairwise_chamfer")}
    overall = {meth: _summary([r["methods"][meth] for r in rows]) for meth in cfg.methods}
    report = dict(prior=cfg.prior, units=_units(cfg.prior), config=asdict(cfg),
                  completion_config=asdict(config), environment=environment(),
                  methods=overall, modes=per_mode, cases=rows)
    report["targets"] = _targets(report, modes)
    return report


def _units(prior: str) -> str:
    return "m² (boxes: metres)" if prior == "boxes" else "normalised units² (diameter-1 objects)"


def _targets(report: dict, modes: tuple[str, ...]) -> dict:
    """The goals of the benchmark, as measured: Chamfer ratio MACE / prior <= 0.5 per mode,
    diversity > 0 where the observation is ambiguous, every MACE request <= its budget."""
    out: dict = {}
    for mode in modes:
        methods = report["modes"][mode]["methods"]
        entry: dict = {}
        if "mace" in methods and "prior" in methods:
            ratio = (methods["mace"]["mean_chamfer_to_truth"]
                     / max(methods["prior"]["mean_chamfer_to_truth"], 1e-30))
            entry["chamfer_ratio_mace_to_prior"] = ratio
            entry["chamfer_ratio_ok"] = ratio <= 0.5
            if "box_posterior" in report["modes"][mode]:
                entry["chamfer_ratio_box_posterior_to_prior"] = (
                    report["modes"][mode]["box_posterior"]["chamfer_to_truth"]
                    / max(methods["prior"]["mean_chamfer_to_truth"], 1e-30))
        if "mace" in methods:
            entry["mace_diversity"] = methods["mace"]["mean_pairwise_chamfer"]
            if mode in AMBIGUOUS_MODES:
                entry["diversity_ok"] = methods["mace"]["mean_pairwise_chamfer"] > 0.0
            entry["mace_max_time_s"] = methods["mace"]["max_time_s"]
            entry["time_ok"] = methods["mace"]["max_time_s"] <= report["config"][
                "time_budget_s"]
        out[mode] = entry
    return out


def environment() -> dict:
    """Where the timings were taken (for the JSON report)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return dict(cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch_version=torch.__version__, load_average_1m=load[0])


# ----------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------

def _case_line(row: dict) -> str:
    parts = [f"[shape] {row['shape']:<28} {row['mode']:<10} obs {row['observed_points']:>4} pts"]
    for name, m in row["methods"].items():
        parts.append(f"{name} CD {m['chamfer_to_truth']:.2e} S {m['mean_score']:.3f} "
                     f"{m['time_s']:.2f}s T={m['iterations']}")
    return " | ".join(parts)


def format_shape_table(report: dict) -> str:
    """The report as text: one block of rows (methods) per mode, then all modes together."""
    cfg = report["config"]
    lines = [f"shape completion, prior '{report['prior']}', {cfg['num_cases']} cases, K = "
             f"{cfg['num_completions']}, budget {cfg['time_budget_s']:g} s, load "
             f"{report['environment']['load_average_1m']:.1f}; Chamfer in {report['units']}"]
    header = (f"{'mode':<11} {'method':<11} {'score':>6} {'CD truth':>9} {'best CD':>9} "
              f"{'diversity':>9} {'med s':>6} {'max s':>6} {'iters':>5}")
    lines.append(header)
    blocks = list(report["modes"].items()) + [("all", {"methods": report["methods"]})]
    for mode, body in blocks:
        for name, m in body["methods"].items():
            lines.append(f"{mode:<11} {name:<11} {m['mean_score']:>6.3f} "
                         f"{m['mean_chamfer_to_truth']:>9.2e} "
                         f"{m['mean_best_chamfer_to_truth']:>9.2e} "
                         f"{m['mean_pairwise_chamfer']:>9.2e} {m['median_time_s']:>6.2f} "
                         f"{m['max_time_s']:>6.2f} {m['mean_iterations']:>5.1f}")
        target = report["targets"].get(mode)
        if target and "chamfer_ratio_mace_to_prior" in target:
            ratio, ok = target["chamfer_ratio_mace_to_prior"], target["chamfer_ratio_ok"]
            lines.append(f"{'':<11} MACE / prior Chamfer {ratio:.3f} (target <= 0.5: "
                         f"{'met' if ok else 'MISSED'})")
        if target and "chamfer_ratio_box_posterior_to_prior" in target:
            ref = body["box_posterior"]
            lines.append(f"{'':<11} reference, the true footprint with posterior heights: CD "
                         f"{ref['chamfer_to_truth']:.2e}, diversity "
                         f"{ref['pairwise_chamfer']:.2e}, / prior "
                         f"{target['chamfer_ratio_box_posterior_to_prior']:.3f}")
    lines.append("score: mean S of the K completions against the observation; CD truth: mean "
                 "Chamfer to the full shape; best CD: of the best-scoring completion; diversity: "
                 "mean pairwise Chamfer of the K completions")
    return "\n".join(lines)


__all__ = [
    "AMBIGUOUS_MODES", "BOX_CUTS", "GRASP_DIRECTIONS", "GRASP_OOD_DIRECTIONS", "METHODS",
    "MODES", "ShapeBenchmarkConfig", "ShapeCase", "box_cases", "box_posterior_reference",
    "camera_view", "chamfer_to",
    "format_shape_table", "grasp_contacts", "mean_pairwise_chamfer", "object_cases", "observe",
    "partial_box", "plane_cut", "random_plane_cut", "random_viewpoint", "run_shape_benchmark",
    "side_cut", "symmetric_chamfer", "top_cut", "warm_up",
]
