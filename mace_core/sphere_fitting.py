"""Fit spheres that cover the robot's collision geometry as PyBullet sees it.

PyBullet collides a moving link's ``.obj`` mesh as the CONVEX HULL of its vertices grown by a
collision margin (1 mm), so the spheres cover that hull. Per link:

1. Hull surface grid: the hull's triangles subdivided until no edge is longer than ``h``; every
   point of the surface is then within ``gap = h / sqrt(3)`` of a grid vertex.
2. Centres: k-means (seeded) of points sampled uniformly inside the hull, so centres lie inside.
3. Radii: each grid vertex goes to its nearest centre; a sphere's radius is the largest distance
   of its vertices, then shrunk where other spheres already cover them; finally
   ``+ gap + margin``. Every point of the grown hull's surface is therefore inside a sphere.
   (The interior is not covered exactly; an obstacle can only be missed if it lies entirely
   inside a link's hull, or a link's hull entirely inside an obstacle with no sphere centre in it,
   which the hull-covering centres rule out for the scenes' obstacles.)

Run ``python -m mace_core.sphere_fitting --out models/panda_spheres.yaml``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import trimesh
from scipy.cluster.vq import kmeans2
from scipy.spatial import ConvexHull

from .collision import PYBULLET_MESH_MARGIN, RobotSpheres
from .errors import ModelLoadError
from .kinematics import RobotKinematics, URDFModel
from .tensor import TensorSpec

#: Spheres per link of the Panda, tuned so that false collisions stay low (see the benchmark).
PANDA_SPHERE_COUNTS = {
    "panda_link0": 4, "panda_link1": 6, "panda_link2": 6, "panda_link3": 6, "panda_link4": 6,
    "panda_link5": 8, "panda_link6": 6, "panda_link7": 4, "panda_hand": 6,
    "panda_leftfinger": 2, "panda_rightfinger": 2,
}


@dataclass
class SphereFitConfig:
    """Parameters of :func:`fit_robot_spheres`."""

    counts: dict[str, int] = field(default_factory=lambda: dict(PANDA_SPHERE_COUNTS))  #: per link
    default_count: int = 4  #: spheres of a link missing from ``counts``
    margin: float = PYBULLET_MESH_MARGIN  #: m, added to every radius (PyBullet's mesh margin)
    max_edge: float = 0.0015  #: m, edge length of the hull surface grid
    volume_samples: int = 20000  #: points sampled inside each hull for k-means
    coarse_edge: float = 0.005  #: m, edge length of the grid used while optimizing
    steps: int = 600  #: Adam steps on centres and radii
    learning_rate: float = 1e-3  #: Adam step size (m)
    coverage_weight: float = 10.0  #: initial weight of the uncovered-points penalty
    scale: float = 0.01  #: m, length scale of the loss terms
    seed: int = 0  #: seed of the volume samples and k-means


def link_hull(urdf: URDFModel, link: str) -> trimesh.Trimesh:
    """Convex hull ``(V, 3)`` / faces of every collision geometry of ``link``, in the link frame.

    Raises:
        ModelLoadError: a geometry kind that cannot be fitted (only meshes and boxes can).
    """
    points = []
    for geom in urdf.collisions.get(link, []):
        if geom.kind == "mesh":
            mesh = trimesh.load(geom.mesh_path, force="mesh", process=False)
            verts = np.asarray(mesh.vertices) * np.asarray(geom.scale)
        elif geom.kind == "box":
            verts = trimesh.creation.box(extents=geom.size).vertices
        else:
            raise ModelLoadError(f"{link}: cannot fit spheres to a {geom.kind} geometry")
        points.append(verts @ geom.origin[:3, :3].T + geom.origin[:3, 3])
    if not points:
        raise ModelLoadError(f"link '{link}' has no collision geometry")
    pts = np.concatenate(points)
    hull = ConvexHull(pts)
    # Faces oriented outwards (trimesh fixes winding from the hull's equations).
    return trimesh.Trimesh(pts, hull.simplices, process=True).convex_hull


def _sample_inside(hull: trimesh.Trimesh, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniform inside a convex hull, by rejection from its bounding box."""
    eq = ConvexHull(hull.vertices).equations
    lo, hi = hull.bounds
    out = []
    count = 0
    while count < n:
        cand = rng.uniform(lo, hi, size=(4 * n, 3))
        cand = cand[(cand @ eq[:, :3].T + eq[:, 3] <= 0).all(1)]
        out.append(cand)
        count += len(cand)
    return np.concatenate(out)[:n]


def _surface_grid(hull: trimesh.Trimesh, max_edge: float) -> np.ndarray:
    """Vertices ``(G, 3)`` of the hull's triangles subdivided to edges <= ``max_edge``."""
    verts, _ = trimesh.remesh.subdivide_to_size(hull.vertices, hull.faces, max_edge,
                                                max_iter=100)
    return np.unique(verts, axis=0)


def _cover_radii(grid: torch.Tensor, centers: torch.Tensor,
                 radii: torch.Tensor) -> torch.Tensor:
    """Radii ``(k,)`` so that every grid point ``(G, 3)`` is inside a sphere: each point goes to
    the sphere its surface is least outside of (for the given ``radii``), and a sphere grows
    or shrinks to its farthest point."""
    dist = torch.cdist(grid, centers)  # (G, k)
    owner = (dist - radii).argmin(1)
    out = torch.zeros_like(radii)
    return out.scatter_reduce(0, owner, dist.gather(1, owner[:, None])[:, 0], "amax")


def fit_link_spheres(hull: trimesh.Trimesh, count: int, config: SphereFitConfig,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Spheres covering ``hull`` grown by ``config.margin``: centres ``(k, 3)``, radii ``(k,)``.

    The centres and radii minimize the sum of the fourth powers of the bulges (how far each
    sphere reaches beyond the hull's face planes), with a penalty on uncovered points of a
    coarse surface grid; the radii are then made exact on the fine grid.
    """
    eq = torch.tensor(ConvexHull(hull.vertices).equations)  # (F, 4): n.x + d <= 0 inside
    coarse = torch.tensor(_surface_grid(hull, config.coarse_edge))
    inside = _sample_inside(hull, config.volume_samples, rng)
    centers, _ = kmeans2(inside, count, minit="++", seed=rng, iter=50)
    c = torch.tensor(centers, requires_grad=True)
    r0 = _cover_radii(coarse, c.detach(), torch.zeros(count, dtype=c.dtype))
    r = r0.clone().requires_grad_(True)
    opt = torch.optim.Adam([c, r], lr=config.learning_rate)
    for step in range(config.steps):
        weight = config.coverage_weight * (1.0 + 99.0 * step / config.steps)
        depth = -(c @ eq[:, :3].T + eq[:, 3]).max(1).values  # (k,) distance to the boundary
        bulge = r - depth
        uncovered = (torch.cdist(coarse, c) - r).min(1).values.clamp_min(0.0)
        loss = (bulge.clamp_min(0.0) / config.scale).pow(4).sum() \
            + weight * (uncovered / config.scale).square().mean() \
            + 1e3 * (-depth / config.scale).clamp_min(0.0).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    fine = torch.tensor(_surface_grid(hull, config.max_edge))
    radii = _cover_radii(fine, c.detach(), r.detach())
    gap = config.max_edge / math.sqrt(3.0)
    return c.detach().numpy(), radii.numpy() + gap + config.margin


def link_bulges(hull: trimesh.Trimesh, centers: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """``(k,)`` m: how far each sphere reaches beyond the hull's face planes."""
    eq = ConvexHull(hull.vertices).equations
    return radii + (centers @ eq[:, :3].T + eq[:, 3]).max(1)


def fit_robot_spheres(urdf: URDFModel, links: list[str] | None = None,
                      config: SphereFitConfig | None = None) -> RobotSpheres:
    """Spheres covering the PyBullet collision geometry of every link with collision geometry.

    Args:
        urdf: the robot model (mesh paths resolved).
        links: links to fit, in order (default: every link with collision geometry).
        config: fitting parameters (default :class:`SphereFitConfig`).
    """
    config = config or SphereFitConfig()
    links = links or [name for name in urdf.links if urdf.collisions.get(name)]
    rng = np.random.default_rng(config.seed)
    names, centers, radii = [], [], []
    for link in links:
        count = config.counts.get(link, config.default_count)
        c, r = fit_link_spheres(link_hull(urdf, link), count, config, rng)
        names += [link] * len(r)
        centers.append(c)
        radii.append(r)
    meta = {"margin": config.margin, "max_edge": config.max_edge, "seed": config.seed,
            "counts": {n: config.counts.get(n, config.default_count) for n in links}}
    return RobotSpheres(tuple(names), np.concatenate(centers), np.concatenate(radii), meta)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models/panda_spheres.yaml", help="output YAML")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    kin = RobotKinematics.panda(TensorSpec())
    spheres = fit_robot_spheres(kin.urdf, config=SphereFitConfig(seed=args.seed))
    spheres.save(args.out, header=(
        "Spheres covering the Panda's PyBullet collision geometry (convex hull of each collision\n"
        "mesh + 1 mm margin), per link: [x, y, z, radius] in metres, link frame.\n"
        "Generated by: python -m mace_core.sphere_fitting --out models/panda_spheres.yaml"))
    print(f"{len(spheres)} spheres written to {args.out}")
    for link in dict.fromkeys(spheres.links):
        c, r = spheres.for_link(link)
        bulge = link_bulges(link_hull(kin.urdf, link), c, r)
        print(f"  {link:18s} {len(r)} spheres, radius {r.min():.4f}..{r.max():.4f} m, "
              f"bulge beyond the hull max {bulge.max() * 1e3:.1f} mm")


if __name__ == "__main__":
    main()
