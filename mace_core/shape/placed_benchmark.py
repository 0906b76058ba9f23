"""The shape benchmark with the object placed on a table: ``mace-bench shape --placement random``.

Each held-out shape of :mod:`.benchmark` (the same cases) is put at a random x, y within
±``xy_range_m`` of the support frame's origin, turned by a random angle about z, and, for
``objects``, given a random size between ``size_range_m`` across (the canonical diameter-1 ball
scaled to it), set down on the surface (z = 0). It is observed there (the canonical
observation moved with it: plane cuts, camera views with their viewpoint, the fingers' contacts
with their directions and grasp centre) and the observation is sent in the support frame.
Completions are scored against the placed truth; Chamfer distances are reported in the prior's
canonical units (divided by the scale squared), so that they compare with ``--placement
canonical`` on the same cases.

Methods:

- ``prior``: K draws of the prior placed at the observed points' (or contacts') centroid (and,
  for ``objects``, scaled by the observation's estimate, :func:`.placement.initial_placement`);
- ``align_then_complete``: the observation centred (and scaled) by its own bounding box into
  the prior's canonical frame, completed there as today, and moved back: the baseline a user
  would write;
- ``mace_rule``: the completer in the support frame with its placement started by rule (the
  observation's bounding box and extent: ``placement_estimator`` off);
- ``mace``: the completer in the support frame (shape and placement together), its placement
  started by the prior's learned estimator where it ships one (:mod:`.placement_estimator`).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

from ..errors import InvalidRequestError
from ..tensor import TensorSpec
from .benchmark import (METHODS, MODES, ShapeBenchmarkConfig, ShapeCase, _completers, _units,
                        box_cases, chamfer_to, environment, mean_pairwise_chamfer, object_cases,
                        observe)
from .completion import ShapeCompleter, ShapeCompletionConfig, ShapeCompletionRequest
from .data import BOX_EDGE_RANGE_M, rotate_z, sample_box_clouds
from .placement import initial_placement, place
from .vae import ShapePrior

#: Methods of the placed benchmark, in table order.
PLACED_METHODS = ("prior", "align_then_complete", "mace_rule", "mace")
#: Modes of a placed box whose exact posterior :func:`placed_box_posterior` gives (the points
#: alone are observed: no viewpoint, no fingers' free paths)
REFERENCE_MODES = ("random_cut", "top_cut")
#: m: a box face counts as observed where this many points lie within :data:`FACE_TOLERANCE_M`
#: of the observation's extreme along its normal (sampled on the face they lie on it exactly;
#: points of other faces come that close about once in 10⁴ observations)
FACE_TOLERANCE_M = 1e-5
MIN_POINTS_ON_FACE = 3


@dataclass
class Placement:
    """Where one case stands: canonical -> support frame."""

    x: float
    y: float
    yaw: float  #: rad, about z
    scale: float  #: the canonical shape's factor (1 for a metric prior)
    lift: float  #: m, the z shift that sets it on the surface

    def turn(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(P, 3)`` canonical directions in the support frame (turned only)."""
        return rotate_z(vectors[None], torch.tensor([self.yaw], dtype=vectors.dtype,
                                                    device=vectors.device))[0]

    def apply(self, points: torch.Tensor) -> torch.Tensor:
        """``(P, 3)`` canonical points in the support frame."""
        return self.turn(points * self.scale) + torch.tensor(
            [self.x, self.y, self.lift], dtype=points.dtype, device=points.device)

    def observation(self, obs: dict, radius: float) -> dict:
        """A canonical observation's request fields in the support frame."""
        if "points" in obs:
            out = {"points": self.apply(obs["points"])}
            if "viewpoint" in obs:
                out["viewpoint"] = self.apply(obs["viewpoint"][None])[0]
            return out
        return dict(contacts=self.apply(obs["contacts"]), directions=self.turn(obs["directions"]),
                    grasp_center=self.apply(obs["grasp_center"][None])[0],
                    finger_radius=radius * self.scale)


def draw_placement(dense: torch.Tensor, metric: bool, standing: bool, xy_range_m: float,
                   size_range_m: tuple[float, float], generator: torch.Generator) -> Placement:
    """A random placement of a case whose dense canonical cloud is ``dense (S, 3)``."""
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    scale = 1.0 if metric else size_range_m[0] + u[3] * (size_range_m[1] - size_range_m[0])
    lift = 0.0 if standing else -float(dense[:, 2].min()) * scale
    return Placement(x=(2 * u[0] - 1) * xy_range_m, y=(2 * u[1] - 1) * xy_range_m,
                     yaw=(2 * u[2] - 1) * math.pi, scale=scale, lift=lift)


def _aligned(points: torch.Tensor, metric: bool, standing: bool, length_scale: float
             ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The observation centred (and scaled) by its own bounding box into the canonical frame:
    (points ``(P, 3)``, the shift ``(3,)`` and factor that map canonical back to support)."""
    lo, hi = points.amin(dim=0), points.amax(dim=0)
    centre = 0.5 * (lo + hi)
    if standing:
        centre[2] = 0.0  # a standing prior's shapes stand on z = 0 already
    moved = points - centre
    factor = 1.0 if metric else 2.0 * float(moved.norm(dim=1).max()) / length_scale
    return moved / factor, centre, factor


def _axis_posterior(u: torch.Tensor, r: torch.Tensor, floor: float | None,
                    edge_range: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A box's edge along one of its axes and where its lower face lies, ``(k,)`` each, at the
    posterior quantiles ``r (k, 2)`` (edge, then the lower face given the edge) given the
    observed points' coordinates ``u (P,)`` along that axis and, if known, the lower face
    (``floor``: the table under a standing box). The edge's prior is uniform in ``edge_range``
    and the placement's flat: a face with points on it is where they are; an unseen one lies
    beyond every point, so with one face known the edge is uniform from the points' span on,
    and with neither its density grows as (edge - span) (the placements that keep every point
    inside)."""
    lo, hi = edge_range
    u_min, u_max = float(u.min()), float(u.max())
    low_seen = int((u <= u_min + FACE_TOLERANCE_M).sum()) >= MIN_POINTS_ON_FACE
    if floor is not None:
        u_min, low_seen = floor, True
    high_seen = int((u >= u_max - FACE_TOLERANCE_M).sum()) >= MIN_POINTS_ON_FACE
    span = u_max - u_min
    if low_seen and high_seen:
        return torch.full_like(r[:, 0], span), torch.full_like(r[:, 0], u_min)
    start = max(span, lo)
    if low_seen or high_seen:
        edge = start + (hi - start) * r[:, 0]
        return edge, (torch.full_like(edge, u_min) if low_seen else u_max - edge)
    a, b = start - span, hi - span
    edge = span + torch.sqrt(a * a + r[:, 0] * (b * b - a * a))
    return edge, u_max - edge + r[:, 1] * (u_min - u_max + edge)


def placed_box_posterior(case: ShapeCase, where: Placement, seen: torch.Tensor, k: int,
                         generator: torch.Generator, median: bool = False,
                         edge_range: tuple[float, float] = BOX_EDGE_RANGE_M) -> torch.Tensor:
    """K draws of the exact posterior over a placed test box given observed points ``seen
    (P, 3)`` in the support frame: ``(k, S, 3)``, S as the truth.

    A reference, not a method: it knows the box's rotation about z (the truth's), nothing else.
    The box stands on z = 0; along each of its three axes :func:`_axis_posterior` gives the
    edge and where the box starts, independently (the edge prior is a product of uniforms and
    the placement's x, y are flat; the benchmark's ±0.2 m bound on them is ignored, which only
    widens the posterior). With ``median`` every draw is at the posterior's medians instead
    (the same box K times): the point answer that the mean Chamfer to the truth rewards, at no
    diversity.
    """
    yaw = case.info["angle_rad"] + where.yaw
    turn = torch.tensor([yaw], dtype=torch.float64, device=seen.device)
    local = rotate_z(seen.to(torch.float64)[None], -turn)[0]
    edges, lows = [], []
    for axis in range(3):
        r = (torch.full((k, 2), 0.5, dtype=torch.float64, device=seen.device) if median else
             torch.rand(k, 2, generator=generator, device=seen.device, dtype=torch.float64))
        edge, low = _axis_posterior(local[:, axis], r, 0.0 if axis == 2 else None, edge_range)
        edges.append(edge)
        lows.append(low)
    edge = torch.stack(edges, dim=-1)
    centre = torch.stack([lows[0] + 0.5 * edge[:, 0], lows[1] + 0.5 * edge[:, 1],
                          torch.zeros_like(edge[:, 0])], dim=-1)
    clouds = sample_box_clouds(edge, case.truth.shape[0], generator,
                               angle=torch.zeros(k, dtype=torch.float64, device=seen.device))
    return rotate_z(clouds + centre[:, None], turn.expand(k)).to(seen.dtype)


def run_placed_benchmark(priors: dict[str, ShapePrior], config: ShapeCompletionConfig,
                         cfg: ShapeBenchmarkConfig, spec: TensorSpec,
                         log: Callable[[str], None] = lambda s: None,
                         data_path: str | None = None, xy_range_m: float = 0.2,
                         size_range_m: tuple[float, float] = (0.05, 0.3)) -> dict:
    """Run every (case, cloud mode, method) with the object placed (module docstring)."""
    modes = tuple(cfg.modes) or MODES[cfg.prior]
    unknown = sorted(set(cfg.methods) - set(PLACED_METHODS) - set(METHODS))
    if unknown:
        raise InvalidRequestError(f"methods {unknown} unknown (placed: {list(PLACED_METHODS)})")
    methods = tuple(m for m in cfg.methods if m in PLACED_METHODS)
    methods = PLACED_METHODS if cfg.methods == METHODS or not methods else methods
    replace(cfg, methods=("mace",)).validate(modes)
    if cfg.prior not in priors:
        raise InvalidRequestError(f"prior '{cfg.prior}' is not loaded (loaded: {sorted(priors)})")
    prior = priors[cfg.prior]
    metric, standing = prior.entry.metric, prior.entry.standing
    scale, num_points = prior.vae.config.length_scale, prior.vae.config.num_points
    completers = _completers({cfg.prior: prior}, config, cfg.num_completions, spec)
    main, plain = completers["mace"][0], completers["prior"][0]
    rule = (ShapeCompleter({cfg.prior: prior}, replace(config, placement_estimator=False), spec)
            if "mace_rule" in methods else None)
    if cfg.warmup:
        for completer in (main, plain, rule):
            if completer is not None:
                completer.warmup()
    cases = (box_cases(cfg.num_cases, cfg.seed, num_points, cfg.sensor_points, spec)
             if cfg.prior == "boxes" else
             object_cases(cfg.num_cases, cfg.seed, num_points, cfg.object_points, spec,
                          data_path))
    radius = cfg.finger_radius or config.finger_radius * scale
    rows = []
    for c, case in enumerate(cases):
        where = draw_placement(case.dense, metric, standing, xy_range_m, size_range_m,
                               spec.generator(cfg.seed * 7919 + 101 * c + 97))
        truth = where.apply(case.truth)
        for mode in modes:
            m = MODES[cfg.prior].index(mode)
            seed = cfg.seed * 7919 + 101 * c + m
            obs = observe(case, mode, spec.generator(seed), scale, cfg, radius)
            placed = where.observation(obs, radius)
            row = dict(case=c, shape=case.name, mode=mode, placement=asdict(where), methods={})
            for method in methods:
                t0 = time.perf_counter()
                completions = _answer(method, rule if method == "mace_rule" else main, plain,
                                      cfg, placed, seed, metric, standing, scale)
                wall = time.perf_counter() - t0
                cd = chamfer_to(completions, truth) / where.scale ** 2
                row["methods"][method] = dict(
                    chamfer_to_truth=float(cd.mean()), best_chamfer_to_truth=float(cd[0]),
                    pairwise_chamfer=mean_pairwise_chamfer(completions) / where.scale ** 2,
                    time_s=wall)
            if cfg.prior == "boxes" and mode in REFERENCE_MODES:
                row["references"] = _references(case, where, placed["points"], truth,
                                                cfg.num_completions, spec.generator(seed))
            rows.append(row)
            log(f"[placed {cfg.prior}] case {c} {mode}: " + ", ".join(
                f"{k} {v['chamfer_to_truth']:.2e}" for k, v in row["methods"].items()))
    summary = {mode: {meth: _mean_rows([r["methods"][meth] for r in rows if r["mode"] == mode])
                      for meth in methods} for mode in modes}
    references = {mode: {name: {key: statistics.fmean(r["references"][name][key] for r in refs)
                                for key in ("chamfer_to_truth", "pairwise_chamfer")}
                         for name in refs[0]["references"]}
                  for mode in modes
                  for refs in [[r for r in rows if r["mode"] == mode and "references" in r]]
                  if refs}
    return dict(prior=cfg.prior, placement="random", units=_units(cfg.prior),
                config=asdict(cfg), xy_range_m=xy_range_m, size_range_m=list(size_range_m),
                completion_config=asdict(config), environment=environment(), modes=summary,
                references=references, cases=rows)


def _references(case: ShapeCase, where: Placement, seen: torch.Tensor, truth: torch.Tensor,
                k: int, generator: torch.Generator) -> dict:
    """The exact posterior's draws and its median box (:func:`placed_box_posterior`) scored
    as a method's answer: mean Chamfer to the truth and diversity."""
    out = {}
    for name, median in (("posterior", False), ("posterior_median", True)):
        ref = placed_box_posterior(case, where, seen, k, generator, median=median)
        out[name] = dict(chamfer_to_truth=float(chamfer_to(ref, truth).mean()),
                         pairwise_chamfer=mean_pairwise_chamfer(ref))
    return out


def _answer(method: str, main, plain, cfg: ShapeBenchmarkConfig, obs: dict, seed: int,
            metric: bool, standing: bool, length_scale: float) -> torch.Tensor:
    """One method's K completions ``(K, P, 3)`` in the support frame."""
    k = cfg.num_completions
    common = dict(prior=cfg.prior, num_completions=k, time_budget_s=cfg.time_budget_s,
                  seed=seed, iterations=None if cfg.iterations < 0 else cfg.iterations)
    seen = obs["points"] if "points" in obs else obs["contacts"]
    if method in ("mace", "mace_rule"):
        return main.complete(ShapeCompletionRequest(frame="support", **common, **obs)
                             ).completions
    if method == "prior":
        drawn = plain.complete(ShapeCompletionRequest(**dict(common, iterations=0), **obs)
                               ).completions
        mean, _ = initial_placement(seen, metric, length_scale)
        mean[:2] = seen[:, :2].mean(dim=0)  # at the observed points' (contacts') centroid
        return place(drawn, mean[None, :3].expand(k, 3), standing)[0]
    _, shift, factor = _aligned(seen, metric, standing, length_scale)
    if "points" in obs:
        request = dict(points=(obs["points"] - shift) / factor)
        if "viewpoint" in obs:
            request["viewpoint"] = (obs["viewpoint"] - shift) / factor
    else:
        request = dict(contacts=(obs["contacts"] - shift) / factor,
                       directions=obs["directions"],
                       grasp_center=(obs["grasp_center"] - shift) / factor,
                       finger_radius=obs["finger_radius"] / factor)
    done = main.complete(ShapeCompletionRequest(**common, **request)).completions
    return done * factor + shift


def _mean_rows(rows: list[dict]) -> dict:
    def mean(key):
        return statistics.fmean(r[key] for r in rows) if rows else math.nan
    return dict(mean_chamfer_to_truth=mean("chamfer_to_truth"),
                mean_best_chamfer_to_truth=mean("best_chamfer_to_truth"),
                mean_pairwise_chamfer=mean("pairwise_chamfer"),
                median_time_s=statistics.median(r["time_s"] for r in rows) if rows else math.nan,
                max_time_s=max((r["time_s"] for r in rows), default=math.nan),
                requests=len(rows))


def format_placed_table(report: dict) -> str:
    """Mean Chamfer distance to the placed truth per mode and method (canonical units)."""
    methods = list(next(iter(report["modes"].values()))) if report["modes"] else []
    lines = [f"shape completion, {report['prior']}, placed at random (x, y within "
             f"±{report['xy_range_m']:g} m, any turn about z"
             + (f", {report['size_range_m'][0]:g}-{report['size_range_m'][1]:g} m across"
                if report["prior"] == "objects" else "") + f"), {report['config']['num_cases']} "
             f"cases; Chamfer in {report['units']}",
             f"{'mode':<12}" + "".join(f" {m:>20}" for m in methods) + f" {'mace s (median)':>16}"]
    for mode, row in report["modes"].items():
        lines.append(f"{mode:<12}" + "".join(f" {row[m]['mean_chamfer_to_truth']:>20.3e}"
                                             for m in methods)
                     + f" {row.get('mace', {}).get('median_time_s', math.nan):>16.2f}")
    for mode, refs in report.get("references", {}).items():
        lines.append(f"reference, {mode}: the exact posterior knowing the box's turn "
                     f"{refs['posterior']['chamfer_to_truth']:.3e} (diversity "
                     f"{refs['posterior']['pairwise_chamfer']:.2e}), its median box "
                     f"{refs['posterior_median']['chamfer_to_truth']:.3e}")
    return "\n".join(lines)
