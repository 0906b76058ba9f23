"""Fit spheres that cover the robot's collision geometry as PyBullet sees it.

PyBullet collides a moving link's ``.obj`` mesh as the CONVEX HULL of its vertices grown by a
collision margin (1 mm), so the spheres cover that hull. Per link:

1. The hull's surface is triangulated (edges <= ``edge``).
2. Centres: k-means (seeded) of points inside the hull, then moved by Adam to minimize the largest
   *bulge* (how far a sphere reaches beyond the hull's face planes: radius minus the centre's
   depth) needed to cover every triangle vertex (a smooth max-min, annealed). A few restarts.
3. Radii, exact: each triangle goes to the sphere that covers it with the smallest bulge; a
   sphere's radius is the farthest vertex of its triangles, plus the margin. A ball contains a
   triangle when it contains its three vertices, so the union of the spheres contains the whole
   hull surface grown by the margin: no sampling gap. (The interior is covered only as far as
   the surface spheres reach; an obstacle is missed only if it lies entirely inside a link's hull.)

Then pairs of links that can never touch (PyBullet's smallest distance over sampled and locally
minimized configurations above a threshold) are listed, so the sphere checker can skip them (as
MoveIt's setup assistant disables "never in collision" pairs).

Run ``python -m mace_core.robot.sphere_fitting --out models/panda_spheres.yaml`` (about 10
minutes on two busy cores: the pair search and the table take most of it).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np
import torch
import trimesh
from scipy.cluster.vq import kmeans2
from scipy.optimize import minimize
from scipy.spatial import ConvexHull

from ..errors import ModelLoadError
from ..tensor import TensorSpec
from .collision import PYBULLET_MESH_MARGIN, joints_between, self_collision_link_pairs
from .kinematics import RobotKinematics, URDFModel
from .pybullet_checker import PyBulletCollisionChecker
from .spheres import PairTable, RobotSpheres

#: Spheres per link of the Panda: most on the wrist and hand, which come close to the forearm
#: and to obstacles; few on the base, which only meets the wrist.
PANDA_SPHERE_COUNTS = {
    "panda_link0": 12, "panda_link1": 12, "panda_link2": 12, "panda_link3": 10, "panda_link4": 12,
    "panda_link5": 16, "panda_link6": 12, "panda_link7": 10, "panda_hand": 20,
    "panda_leftfinger": 3, "panda_rightfinger": 3,
}


@dataclass
class SphereFitConfig:
    """Parameters of :func:`fit_robot_spheres` and :func:`find_never_colliding_pairs`."""

    counts: dict[str, int] = field(default_factory=lambda: dict(PANDA_SPHERE_COUNTS))  #: per link
    default_count: int = 4  #: spheres of a link missing from ``counts``
    margin: float = PYBULLET_MESH_MARGIN  #: m, added to every radius (PyBullet's mesh margin)
    edge: float = 0.01  #: m, longest triangle edge of the hull triangulation
    volume_samples: int = 20000  #: points sampled inside each hull for the k-means start
    steps: int = 500  #: Adam steps per restart
    restarts: int = 3  #: k-means starts per link; the smallest largest bulge is kept
    learning_rate: float = 2e-3  #: m, initial Adam step (decays to 5 %)
    temperature: float = 3e-3  #: m, initial smooth max-min temperature (decays to 10 %)
    seed: int = 0  #: seed of every random draw
    pair_samples: int = 20000  #: random configurations for the never-colliding search
    pair_threshold: float = 0.02  #: m, a pair is skipped when it never comes closer than this
    table_step: float = 0.0025  #: rad, cell size of the pair tables


def link_hull(urdf: URDFModel, link: str) -> trimesh.Trimesh:
    """Convex hull of every collision geometry of ``link``, in the link frame (m).

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
    return trimesh.convex.convex_hull(np.concatenate(points))


def _sample_inside(planes: np.ndarray, bounds: np.ndarray, n: int,
                   rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniform inside the polytope ``planes`` (F, 4) (n.x + d <= 0).

    Rejection sampling from its bounding box ``bounds`` (2, 3).
    """
    out, count = [], 0
    while count < n:
        cand = rng.uniform(bounds[0], bounds[1], size=(4 * n, 3))
        cand = cand[(cand @ planes[:, :3].T + planes[:, 3] <= 0).all(1)]
        out.append(cand)
        count += len(cand)
    return np.concatenate(out)[:n]


def _triangulate(hull: trimesh.Trimesh, edge: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertices ``(V, 3)`` and triangles ``(T, 3)`` of the hull surface, edges <= ``edge``."""
    verts, faces = trimesh.remesh.subdivide_to_size(hull.vertices, hull.faces, edge,
                                                    max_iter=100)
    verts, inverse = np.unique(np.round(verts, 10), axis=0, return_inverse=True)
    return verts, inverse.reshape(-1)[faces]


def _depth(centers: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Distance ``(k,)`` from centres inside a convex polytope to its nearest face plane."""
    return -(centers @ planes[:, :3].T + planes[:, 3]).max(1).values


def _exact_radii(centers: torch.Tensor, planes: torch.Tensor, verts: torch.Tensor,
                 tris: torch.Tensor) -> torch.Tensor:
    """Radii ``(k,)`` whose spheres contain every triangle.

    Each triangle goes to the sphere that covers it with the smallest bulge; a radius is the
    farthest vertex of its triangles.
    """
    far = torch.cdist(centers, verts)[:, tris].amax(-1)  # (k, T)
    owner = (far - _depth(centers, planes)[:, None]).argmin(0)
    radii = torch.zeros(centers.shape[0], dtype=far.dtype)
    return radii.scatter_reduce(0, owner, far.gather(0, owner[None])[0], "amax")


def fit_link_spheres(hull: trimesh.Trimesh, count: int, config: SphereFitConfig,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Spheres covering ``hull`` grown by ``config.margin``: centres ``(k, 3)``, radii ``(k,)``."""
    planes = torch.tensor(ConvexHull(hull.vertices).equations)  # (F, 4), outward normals
    verts_np, tris_np = _triangulate(hull, config.edge)
    verts, tris = torch.tensor(verts_np), torch.tensor(tris_np)
    inside = _sample_inside(planes.numpy(), hull.bounds, config.volume_samples, rng)
    best = None
    for _ in range(config.restarts):
        start, _ = kmeans2(inside, count, minit="++", seed=rng, iter=50)
        c = torch.tensor(start, requires_grad=True)
        opt = torch.optim.Adam([c], lr=config.learning_rate)
        for step in range(config.steps):
            frac = step / config.steps
            tau = config.temperature * 0.1 ** frac
            for group in opt.param_groups:
                group["lr"] = config.learning_rate * 0.05 ** frac
            depth = _depth(c, planes)
            bulge = torch.cdist(verts, c) - depth  # (V, k): bulge needed to cover a vertex
            needed = -tau * torch.logsumexp(-bulge / tau, 1)  # smooth min over spheres
            loss = tau * torch.logsumexp(needed / tau, 0) + 10.0 * (-depth).clamp_min(0).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        centers = c.detach()
        radii = _exact_radii(centers, planes, verts, tris)
        score = float((radii - _depth(centers, planes)).max())
        if best is None or score < best[0]:
            best = (score, centers, radii)
    _, centers, radii = best
    return centers.numpy(), radii.numpy() + config.margin


def link_bulges(hull: trimesh.Trimesh, centers: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """``(k,)`` m: how far each sphere reaches beyond the hull's face planes."""
    planes = ConvexHull(hull.vertices).equations
    return radii + (centers @ planes[:, :3].T + planes[:, 3]).max(1)


def find_never_colliding_pairs(config: SphereFitConfig, urdf_path: str | None = None
                               ) -> list[tuple[str, str, float]]:
    """Find the checked self-collision pairs PyBullet never sees closer than the threshold.

    Returns ``(link_a, link_b, smallest distance found (m))`` for the pairs whose smallest
    distance exceeds ``config.pair_threshold``.

    The smallest distance of each pair over ``config.pair_samples`` uniform configurations is
    refined by Nelder-Mead from its five closest samples.
    """
    rng = np.random.default_rng(config.seed)
    with PyBulletCollisionChecker(urdf_path=urdf_path) as pb:
        p, cid, robot = pb._p, pb.client, pb.robot
        names = {index: name for name, index in pb.link_index.items()}
        lower, upper = pb.lower, pb.upper

        def distance(q: np.ndarray, a: int, b: int) -> float:
            pb._set(np.clip(q, lower, upper))
            pts = p.getClosestPoints(robot, robot, 0.5, linkIndexA=a, linkIndexB=b,
                                     physicsClientId=cid)
            return min((pt[8] for pt in pts), default=0.5)

        q = rng.uniform(lower, upper, size=(config.pair_samples, len(lower)))
        dist = np.array([[distance(x, a, b) for a, b in pb._pairs] for x in q])
        found = []
        for k, (a, b) in enumerate(pb._pairs):
            if dist[:, k].min() <= config.pair_threshold:
                continue
            best = dist[:, k].min()
            for i in np.argsort(dist[:, k])[:5]:
                res = minimize(distance, q[i], args=(a, b), method="Nelder-Mead",
                               options={"maxfev": 600, "xatol": 1e-4, "fatol": 1e-6})
                best = min(best, float(res.fun))
            if best > config.pair_threshold:
                found.append((names[a], names[b], round(float(best), 4)))
    return found


def build_pair_tables(urdf: URDFModel, skip: set[frozenset], config: SphereFitConfig,
                      urdf_path: str | None = None) -> list[PairTable]:
    """Tables for the checked link pairs that at most two joints move relative to each other.

    On the Panda: the forearm against its flange, hand and fingers, moved by joints 6 and 7.

    Grid corners every ``config.table_step`` rad over the joint limits; PyBullet's distance of
    every pair at every corner; a cell is flagged when a corner is within ``bound`` = sum over
    the table's joints of (half step x largest lever arm of the moving link about that joint).
    Lever arms are bounded by balls: the moving link's largest distance from the last joint's
    origin, plus the distances between consecutive joint origins.
    """
    kin = RobotKinematics(urdf, TensorSpec(torch.device("cpu"), torch.float64))
    poses = kin.link_poses(torch.zeros(1, kin.num_joints, dtype=torch.float64))[0].numpy()
    index = {name: k for k, name in enumerate(kin.link_names)}
    groups: dict[tuple[str, ...], list[tuple[str, str]]] = {}
    for a, b in self_collision_link_pairs(urdf, kin.link_names):
        if frozenset((a, b)) in skip:
            continue
        for anc, desc in ((a, b), (b, a)):
            joints = joints_between(urdf, anc, desc)
            if joints is not None and 1 <= len(joints) <= 2:
                groups.setdefault(tuple(joints), []).append((anc, desc))
    tables = []
    with PyBulletCollisionChecker(urdf_path=urdf_path) as pb:
        p, cid, robot = pb._p, pb.client, pb.robot
        for joints, pairs in groups.items():
            cols = [kin.joint_names.index(j) for j in joints]
            origins = [poses[index[urdf.joints[j].child], :3, 3] for j in joints]
            arms = []
            for _, desc in pairs:
                hull = link_hull(urdf, desc).vertices
                world = hull @ poses[index[desc], :3, :3].T + poses[index[desc], :3, 3]
                arms.append(np.linalg.norm(world - origins[-1], axis=1).max() + config.margin)
            lever = [max(arms)]
            for k in range(len(joints) - 1, 0, -1):
                lever.insert(0, lever[0] + float(np.linalg.norm(origins[k] - origins[k - 1])))
            lower = pb.lower[cols]
            span = pb.upper[cols] - lower
            counts = np.floor(span / config.table_step).astype(int) + 1  # cells per axis
            bound = float(sum(0.5 * config.table_step * arm for arm in lever))
            axes = [lower[k] + config.table_step * np.arange(counts[k] + 1)
                    for k in range(len(cols))]
            corners = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(cols))
            links = [(pb.link_index[a], pb.link_index[b]) for a, b in pairs]
            q = np.zeros(kin.num_joints)
            dist = np.empty(len(corners))
            for i, corner in enumerate(corners):
                q[cols] = corner
                pb._set(q)
                near = [pt[8] for la, lb in links
                        for pt in p.getClosestPoints(robot, robot, bound + 0.01, linkIndexA=la,
                                                     linkIndexB=lb, physicsClientId=cid)]
                dist[i] = min(near, default=bound + 0.01)
            close = (dist <= bound).reshape([c + 1 for c in counts])
            cells = np.zeros(counts, dtype=bool)
            for offset in np.ndindex(*([2] * len(cols))):
                cells |= close[tuple(slice(o, o + c) for o, c in zip(offset, counts))]
            tables.append(PairTable(tuple(pairs), joints, tuple(float(v) for v in lower),
                                    (config.table_step,) * len(cols), cells, bound))
    return tables


def fit_robot_spheres(urdf: URDFModel, links: list[str] | None = None,
                      config: SphereFitConfig | None = None,
                      never_colliding: list[tuple[str, str, float]] | None = None,
                      tables: list[PairTable] | None = None) -> RobotSpheres:
    """Spheres covering the PyBullet collision geometry of every link with collision geometry.

    Args:
        urdf: the robot model (mesh paths resolved).
        links: links to fit, in order (default: every link with collision geometry).
        config: fitting parameters (default :class:`SphereFitConfig`).
        never_colliding: pairs the sphere checker may skip (:func:`find_never_colliding_pairs`).
        tables: tables for pairs moved by at most two joints (:func:`build_pair_tables`).
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
    meta = {"margin": config.margin, "edge": config.edge, "seed": config.seed,
            "pair_samples": config.pair_samples, "pair_threshold": config.pair_threshold,
            "table_step": config.table_step}
    pairs = tuple((a, b) for a, b, _ in (never_colliding or []))
    meta["never_colliding_min_distance"] = {f"{a} {b}": d for a, b, d in never_colliding or []}
    return RobotSpheres(tuple(names), np.concatenate(centers), np.concatenate(radii),
                        never_colliding=pairs, tables=tuple(tables or ()), metadata=meta)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models/panda_spheres.yaml", help="output YAML")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pair-samples", type=int, default=20000,
                        help="configurations sampled to find never-colliding link pairs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = SphereFitConfig(seed=args.seed, pair_samples=args.pair_samples)
    kin = RobotKinematics.panda(TensorSpec())
    never = find_never_colliding_pairs(config)
    tables = build_pair_tables(kin.urdf, {frozenset(p[:2]) for p in never}, config)
    spheres = fit_robot_spheres(kin.urdf, config=config, never_colliding=never, tables=tables)
    spheres.save(args.out, header=(
        "Spheres covering the Panda's PyBullet collision geometry (convex hull of each collision\n"
        "mesh + 1 mm margin), per link: [x, y, z, radius] in metres, link frame; the link pairs\n"
        "PyBullet never finds closer than metadata.pair_threshold (skipped by the sphere\n"
        "checker); and tables of where the pairs moved only by joints 6 and 7 may touch (cells\n"
        "zlib + base64 packed bits). Generated by: python -m mace_core.robot.sphere_fitting --out "
        "models/panda_spheres.yaml"))
    print(f"{len(spheres)} spheres written to {args.out}; never-colliding pairs: {len(never)}")
    for t in tables:
        print(f"  table over {t.joints}: {t.cells.shape} cells, bound {t.bound * 1e3:.1f} mm, "
              f"{t.cells.mean():.1%} flagged, pairs {t.pairs}")
    for link in dict.fromkeys(spheres.links):
        c, r = spheres.for_link(link)
        bulge = link_bulges(link_hull(kin.urdf, link), c, r)
        print(f"  {link:18s} {len(r):2d} spheres, radius {r.min():.4f}..{r.max():.4f} m, "
              f"bulge beyond the hull {bulge.min() * 1e3:.1f}..{bulge.max() * 1e3:.1f} mm")


if __name__ == "__main__":
    main()
