"""Reference distances from the links' convex hulls to primitive obstacles and to each other, by
convex optimization: the referee where two exact checkers (MuJoCo, PyBullet) disagree.

Both engines measure these distances with GJK and their own tolerances; near a margin they can
disagree by tenths of a millimetre. This module uses neither: each link's hull comes from the
URDF's meshes (:func:`.sphere_fitting.link_hull`) as half-spaces ``N x <= d``, its pose from
the project's float64 kinematics, and a distance is a small convex program solved by SLSQP:

- hull to obstacle: ``min_x |e(R^T (x - p))|^2`` s.t. ``N x <= d`` (3 unknowns), ``e`` the part
  of a point outside the primitive (box: ``max(|x| - h, 0)``; sphere: radial; cylinder: radial
  and axial); by default the primitive is the one PyBullet collides with, its edges rounded
  (:func:`.collision.edge_rounding`: the core shrunk by the radius, the distance less it);
- hull to hull: ``min_{x, y} |x - y|^2`` s.t. ``N_a x <= d_a``, ``N_b y <= d_b`` (6 unknowns).

Overlapping shapes give 0 (no penetration depth: only distances near a margin are refereed).
Milliseconds a pair: for the few configurations in dispute, never for serving.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import trimesh
from scipy.optimize import minimize

from .collision import edge_rounding, self_collision_link_pairs
from .kinematics import RobotKinematics
from .scenes import Obstacle
from .sphere_fitting import link_hull

_OPTIONS = {"ftol": 1e-20, "maxiter": 200}


class Hull:
    """A convex polytope as half-spaces ``normals @ x <= offsets`` and its vertices."""

    def __init__(self, normals: np.ndarray, offsets: np.ndarray, vertices: np.ndarray):
        self.normals, self.offsets, self.vertices = normals, offsets, vertices

    @classmethod
    def of_points(cls, points: np.ndarray) -> "Hull":
        """The convex hull of ``points (V, 3)``."""
        return cls.of_mesh(trimesh.convex.convex_hull(np.asarray(points, dtype=float)))

    @classmethod
    def of_mesh(cls, hull: trimesh.Trimesh) -> "Hull":
        normals = np.asarray(hull.face_normals, dtype=float)  # outward, (F, 3)
        offsets = np.einsum("fk,fk->f", normals, np.asarray(hull.triangles[:, 0], dtype=float))
        return cls(normals, offsets, np.asarray(hull.vertices, dtype=float))

    def moved(self, rotation: np.ndarray, translation: np.ndarray) -> "Hull":
        """The hull after ``x -> rotation @ x + translation``."""
        normals = self.normals @ rotation.T
        return Hull(normals, self.offsets + normals @ translation,
                    self.vertices @ rotation.T + translation)

    def constraint(self, columns: slice) -> dict:
        """SLSQP's form of ``x[columns]`` inside the hull (``offsets - normals @ x >= 0``)."""
        def jac(x):
            out = np.zeros((len(self.offsets), len(x)))
            out[:, columns] = -self.normals
            return out
        return {"type": "ineq", "fun": lambda x: self.offsets - self.normals @ x[columns],
                "jac": jac}


def _outside(x: np.ndarray, obstacle: Obstacle, shrink: float = 0.0) -> tuple[float, np.ndarray]:
    """Squared distance of a point ``x (3,)`` (obstacle frame) to ``obstacle`` (its half extents
    less ``shrink``), and its gradient ``(3,)``."""
    h = np.asarray(obstacle.half_extents, dtype=float) - shrink
    if obstacle.kind == "box":
        e = np.sign(x) * np.maximum(np.abs(x) - h, 0.0)
        return float(e @ e), 2.0 * e
    if obstacle.kind == "sphere":
        r = float(np.linalg.norm(x))
        gap = max(r - h[0], 0.0)
        return gap * gap, (2.0 * gap / r) * x if r > 0 else np.zeros(3)
    radial = float(np.hypot(x[0], x[1]))  # cylinder along z: radius h[0], half height h[2]
    gap_r = max(radial - h[0], 0.0)
    gap_z = np.sign(x[2]) * max(abs(x[2]) - h[2], 0.0)
    grad = np.zeros(3)
    if radial > 0:
        grad[:2] = (2.0 * gap_r / radial) * x[:2]
    grad[2] = 2.0 * gap_z
    return gap_r * gap_r + gap_z * gap_z, grad


def _feasible(hull: Hull, x: np.ndarray) -> bool:
    return bool((hull.normals @ x - hull.offsets).max() <= 1e-9)


def hull_obstacle_distance(hull: Hull | np.ndarray, obstacle: Obstacle,
                           rounded: bool = True) -> float:
    """m, distance from ``hull`` (or the hull of points ``(V, 3)``), base frame, to
    ``obstacle`` (with ``rounded``, its edges rounded as PyBullet's are); 0 where they
    overlap."""
    hull = hull if isinstance(hull, Hull) else Hull.of_points(hull)
    rounding = edge_rounding(obstacle.kind, obstacle.half_extents) if rounded else 0.0
    rot = obstacle.rotation_matrix
    position = np.asarray(obstacle.position, dtype=float)
    local = (hull.vertices - position) @ rot
    upper = min(_outside(v, obstacle, rounding)[0] for v in local)  # the nearest vertex

    def fun(x):
        value, grad = _outside((x - position) @ rot, obstacle, rounding)
        return value, rot @ grad

    result = minimize(fun, hull.vertices.mean(0), jac=True, method="SLSQP",
                      constraints=[hull.constraint(slice(0, 3))], options=_OPTIONS)
    best = float(result.fun) if _feasible(hull, result.x) else upper
    return max(float(np.sqrt(max(min(best, upper), 0.0))) - rounding, 0.0)


def hull_hull_distance(a: Hull | np.ndarray, b: Hull | np.ndarray) -> float:
    """m, distance between two hulls (or the hulls of points ``(V, 3)``); 0 where they
    overlap."""
    a = a if isinstance(a, Hull) else Hull.of_points(a)
    b = b if isinstance(b, Hull) else Hull.of_points(b)
    upper = float(np.linalg.norm(a.vertices[:, None] - b.vertices[None], axis=-1).min()) ** 2

    def fun(x):
        d = x[:3] - x[3:]
        return float(d @ d), np.concatenate([2.0 * d, -2.0 * d])

    start = np.concatenate([a.vertices.mean(0), b.vertices.mean(0)])
    result = minimize(fun, start, jac=True, method="SLSQP",
                      constraints=[a.constraint(slice(0, 3)), b.constraint(slice(3, 6))],
                      options=_OPTIONS)
    ok = _feasible(a, result.x[:3]) and _feasible(b, result.x[3:])
    best = float(result.fun) if ok else upper
    return float(np.sqrt(max(min(best, upper), 0.0)))


class HullDistanceReference:
    """The arm's hull distances at a configuration: to obstacles (the base excepted) and
    between the link pairs checked for self-collision.

    Args:
        kin: the robot's kinematics (poses are taken in float64 whatever its dtype).
    """

    def __init__(self, kin: RobotKinematics):
        self.kin = kin
        self.root = kin.link_names[0]  # welded to the world: never touches an obstacle
        self.hulls = {name: Hull.of_mesh(link_hull(kin.urdf, name))
                      for name in kin.link_names if kin.urdf.collisions.get(name)}
        #: link pairs checked for self-collision (the checkers' rule)
        self.pairs = self_collision_link_pairs(kin.urdf, kin.link_names)

    def _world_hulls(self, q) -> dict[str, Hull]:
        """Each link's hull in the base frame at ``q (7,)``."""
        q = torch.as_tensor(q, dtype=torch.float64).reshape(1, -1).to(self.kin.spec.device)
        poses = self.kin.link_poses(q.to(self.kin.spec.dtype)).double()[0].cpu().numpy()
        index = self.kin.link_names.index
        return {name: hull.moved(poses[index(name), :3, :3], poses[index(name), :3, 3])
                for name, hull in self.hulls.items()}

    @staticmethod
    def _ball(hull: Hull) -> tuple[np.ndarray, float]:
        centre = hull.vertices.mean(0)
        return centre, float(np.linalg.norm(hull.vertices - centre, axis=1).max())

    def self_distance(self, q, reach_m: float = 0.01) -> float:
        """m, the smallest distance between the hulls of a checked link pair at ``q (7,)``;
        ``reach_m`` where none is nearer (pairs whose bounding balls are farther are skipped)."""
        hulls = self._world_hulls(q)
        balls = {name: self._ball(hull) for name, hull in hulls.items()}
        best = reach_m
        for a, b in self.pairs:
            (ca, ra), (cb, rb) = balls[a], balls[b]
            if np.linalg.norm(ca - cb) - ra - rb < best:
                best = min(best, hull_hull_distance(hulls[a], hulls[b]))
                if best <= 0.0:
                    return 0.0
        return best

    def world_distance(self, q, obstacles: Sequence[Obstacle], reach_m: float = 0.01,
                       rounded: bool = True) -> float:
        """m, the smallest distance from a link hull to an obstacle at ``q (7,)`` (``rounded``:
        edges as PyBullet's, :func:`hull_obstacle_distance`); ``reach_m`` where none is nearer
        (pairs whose bounding balls are farther are skipped)."""
        hulls = self._world_hulls(q)
        best = reach_m
        for name, hull in hulls.items():
            if name == self.root:
                continue
            centre, radius = self._ball(hull)
            for obstacle in obstacles:
                local = (centre - np.asarray(obstacle.position)) @ obstacle.rotation_matrix
                if np.sqrt(_outside(local, obstacle)[0]) - radius < best:  # a lower bound
                    best = min(best, hull_obstacle_distance(hull, obstacle, rounded))
                    if best <= 0.0:
                        return 0.0
        return best
