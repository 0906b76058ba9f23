"""Batched collision checks of the Panda against primitive obstacles, with two backends.

- :class:`SphereCollisionChecker`: the robot as spheres fitted around its collision meshes, in torch
  (CPU or CUDA), a whole batch of configurations at once. Conservative: the spheres cover what
  PyBullet collides with, so it never calls free a configuration that PyBullet calls colliding.
- :class:`PyBulletCollisionChecker`: exact checks on the URDF's collision meshes in a private
  PyBullet client (the ground truth of the benchmarks), one configuration at a time.

Both answer ``valid(q) -> (B,) bool`` = within the joint limits AND free of self-collision AND
free of obstacles. Conventions shared by both (see ``config/scenes/README.md``):

- PyBullet collides with the CONVEX HULL of each ``.obj`` mesh of a moving link, grown by the URDF
  collision margin (1 mm); primitive obstacles are exact.
- Contact means a signed distance <= 0 between two shapes.
- The base link (``panda_link0``) never collides with obstacles; it does take part in
  self-collision.
- Self-collision is checked for every pair of links with collision geometry that are not adjacent
  (:func:`self_collision_link_pairs`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import combinations
from typing import Sequence

import numpy as np
import torch
import yaml

from .errors import InvalidRequestError, ModelLoadError
from .kinematics import (PANDA_BASE, PANDA_FINGERS, PANDA_JOINTS, RobotKinematics, URDFModel,
                         panda_urdf_path)
from .scenes import Obstacle
from .tensor import TensorSpec

#: Collision margin (m) PyBullet adds around the convex hull of a URDF mesh.
PYBULLET_MESH_MARGIN = 0.001


def default_spheres_path() -> str:
    """Path of ``models/panda_spheres.yaml`` in this repository."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models",
                        "panda_spheres.yaml")


# ----------------------------------------------------------------------------------------------
# Which link pairs can collide
# ----------------------------------------------------------------------------------------------

def adjacent_link_pairs(urdf: URDFModel) -> list[tuple[str, str]]:
    """Pairs of links with collision geometry that share a joint, once geometry-less links are
    contracted into their parent.

    A link without collision geometry (``panda_link8``, ``panda_grasptarget``) is merged with
    its parent, so the joint chain link7 -> link8 -> hand makes (link7, hand) adjacent: their
    hulls overlap in every configuration (PyBullet reports them in contact always). Siblings
    (the two fingers) are not adjacent.

    Returns:
        (parent, child) name pairs, parents first, in URDF joint order.
    """
    geometric = {name for name, geoms in urdf.collisions.items() if geoms}
    parent_of = {j.child: j.parent for j in urdf.joints.values()}
    pairs = []
    for joint in urdf.joints.values():
        child = joint.child
        if child not in geometric:
            continue
        parent = parent_of.get(child)
        while parent is not None and parent not in geometric:
            parent = parent_of.get(parent)
        if parent is not None:
            pairs.append((parent, child))
    return pairs


def self_collision_link_pairs(urdf: URDFModel, links: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs of ``links`` (in that order) checked for self-collision: both have collision
    geometry and they are not adjacent (:func:`adjacent_link_pairs`)."""
    adjacent = {frozenset(p) for p in adjacent_link_pairs(urdf)}
    geometric = [name for name in links if urdf.collisions.get(name)]
    return [(a, b) for a, b in combinations(geometric, 2) if frozenset((a, b)) not in adjacent]


# ----------------------------------------------------------------------------------------------
# Robot spheres
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class RobotSpheres:
    """Spheres rigidly attached to the robot's links, covering its collision geometry."""

    links: tuple[str, ...]  #: (S,) link each sphere is attached to
    centers: np.ndarray  #: (S, 3) m, sphere centres in their link's frame
    radii: np.ndarray  #: (S,) m, radii (the PyBullet mesh margin included)
    metadata: dict = field(default_factory=dict)  #: how the spheres were fitted (free form)

    def __post_init__(self):
        centers = np.asarray(self.centers, dtype=float)
        radii = np.asarray(self.radii, dtype=float)
        if (centers.shape != (len(self.links), 3) or radii.shape != (len(self.links),)
                or not np.all(np.isfinite(centers)) or not np.all(radii > 0)):
            raise ModelLoadError("robot spheres need (S, 3) finite centres and (S,) radii > 0")
        object.__setattr__(self, "centers", centers)
        object.__setattr__(self, "radii", radii)

    def __len__(self) -> int:
        return len(self.links)

    def for_link(self, link: str) -> tuple[np.ndarray, np.ndarray]:
        """Centres ``(n, 3)`` and radii ``(n,)`` of the spheres of one link."""
        mask = np.array([name == link for name in self.links], dtype=bool)
        return self.centers[mask], self.radii[mask]

    def save(self, path: str, header: str = "") -> None:
        """Write the YAML format :meth:`load` reads (``links: {name: [[x, y, z, r], ...]}``)."""
        by_link: dict[str, list[list[float]]] = {}
        for name, c, r in zip(self.links, self.centers, self.radii):
            by_link.setdefault(name, []).append([round(float(v), 6) for v in (*c, r)])
        lines = [f"# {line}" for line in header.splitlines()]
        doc = {"metadata": self.metadata, "links": by_link}
        text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=99)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write("\n".join(lines + [text]))

    @staticmethod
    def load(path: str | None = None) -> "RobotSpheres":
        """Read spheres saved by :meth:`save` (default: ``models/panda_spheres.yaml``).

        Raises:
            ModelLoadError: missing file, unknown keys or malformed spheres.
        """
        path = path or default_spheres_path()
        try:
            with open(path) as f:
                doc = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as exc:
            raise ModelLoadError(f"cannot read robot spheres '{path}': {exc}") from exc
        if not isinstance(doc, dict) or set(doc) - {"metadata", "links"} or "links" not in doc:
            raise ModelLoadError(f"'{path}': expected keys 'links' (and 'metadata')")
        links, rows = [], []
        for name, spheres in doc["links"].items():
            for row in spheres:
                if len(row) != 4:
                    raise ModelLoadError(f"'{path}': sphere of {name} must be [x, y, z, r]")
                links.append(str(name))
                rows.append([float(v) for v in row])
        rows_arr = np.asarray(rows, dtype=float).reshape(-1, 4)
        return RobotSpheres(tuple(links), rows_arr[:, :3], rows_arr[:, 3],
                            dict(doc.get("metadata") or {}))


# ----------------------------------------------------------------------------------------------
# Obstacles as tensors
# ----------------------------------------------------------------------------------------------

def _stack_frames(obstacles: Sequence[Obstacle], spec: TensorSpec) -> tuple[torch.Tensor, ...]:
    """``(3, 3K)`` stacked rotations and ``(3K,)`` offsets so that ``x @ rot - off`` gives
    every point ``x`` ``(N, 3)`` in each primitive's frame as ``(N, 3K)``."""
    rot = np.stack([o.rotation_matrix for o in obstacles]) if obstacles else np.zeros((0, 3, 3))
    pos = np.asarray([o.position for o in obstacles], dtype=float).reshape(-1, 3)
    stacked = np.concatenate(list(rot), axis=1) if len(rot) else np.zeros((3, 0))
    offsets = np.einsum("ki,kij->kj", pos, rot).reshape(-1)
    return spec.tensor(stacked), spec.tensor(offsets)


@dataclass(frozen=True, eq=False)
class CollisionWorld:
    """Obstacles tensorized once per request, grouped by kind, in the robot's base frame.

    Build it with :meth:`from_obstacles`. K* counts obstacles of each kind.
    """

    names: tuple[str, ...]  #: obstacle names in the column order of :meth:`signed_distance`
    box_frames: torch.Tensor  #: (3, 3Kb) stacked rotations base-from-box
    box_offsets: torch.Tensor  #: (3Kb,) box centres expressed in their own frames
    box_half: torch.Tensor  #: (Kb, 3) m, half extents
    sphere_centers: torch.Tensor  #: (Ks, 3) m
    sphere_radii: torch.Tensor  #: (Ks,) m
    cyl_frames: torch.Tensor  #: (3, 3Kc) stacked rotations base-from-cylinder
    cyl_offsets: torch.Tensor  #: (3Kc,)
    cyl_half_height: torch.Tensor  #: (Kc,) m, half of the height along the local z axis
    cyl_radii: torch.Tensor  #: (Kc,) m
    obstacles: tuple[Obstacle, ...] = ()  #: the validated source obstacles

    @staticmethod
    def from_obstacles(obstacles: Sequence[Obstacle], spec: TensorSpec) -> "CollisionWorld":
        """Validate and tensorize obstacles (columns ordered boxes, spheres, cylinders).

        Raises:
            InvalidRequestError: an obstacle fails :meth:`Obstacle.validate`.
        """
        for o in obstacles:
            o.validate()
        boxes = [o for o in obstacles if o.kind == "box"]
        spheres = [o for o in obstacles if o.kind == "sphere"]
        cyls = [o for o in obstacles if o.kind == "cylinder"]
        box_frames, box_offsets = _stack_frames(boxes, spec)
        cyl_frames, cyl_offsets = _stack_frames(cyls, spec)
        return CollisionWorld(
            names=tuple(o.name for o in boxes + spheres + cyls),
            box_frames=box_frames, box_offsets=box_offsets,
            box_half=spec.tensor([[s / 2 for s in o.size] for o in boxes]).reshape(-1, 3),
            sphere_centers=spec.tensor([o.position for o in spheres]).reshape(-1, 3),
            sphere_radii=spec.tensor([o.size[0] for o in spheres]).reshape(-1),
            cyl_frames=cyl_frames, cyl_offsets=cyl_offsets,
            cyl_half_height=spec.tensor([o.size[0] / 2 for o in cyls]).reshape(-1),
            cyl_radii=spec.tensor([o.size[1] for o in cyls]).reshape(-1),
            obstacles=tuple(boxes + spheres + cyls))

    def __len__(self) -> int:
        return len(self.names)

    def _local(self, points: torch.Tensor, frames: torch.Tensor,
               offsets: torch.Tensor) -> torch.Tensor:
        """Points ``(N, 3)`` in the frame of each primitive: ``(N, K, 3)`` (one GEMM)."""
        return (points @ frames - offsets).view(points.shape[0], -1, 3)

    def signed_distance(self, points: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        """Signed distance (m) from spheres to every obstacle, negative when they overlap.

        Args:
            points: ``(N, 3)`` sphere centres in the base frame.
            radii: ``(N,)`` sphere radii.

        Returns:
            ``(N, K)`` in the column order of :attr:`names`.
        """
        cols = []
        if self.box_half.shape[0]:
            q = self._local(points, self.box_frames, self.box_offsets).abs() - self.box_half
            outside = q.clamp_min(0.0).norm(dim=-1)
            inside = q.max(dim=-1).values.clamp_max(0.0)
            cols.append(outside + inside)
        if self.sphere_radii.shape[0]:
            cols.append(torch.cdist(points, self.sphere_centers) - self.sphere_radii)
        if self.cyl_radii.shape[0]:
            local = self._local(points, self.cyl_frames, self.cyl_offsets)
            dr = local[..., :2].norm(dim=-1) - self.cyl_radii
            dz = local[..., 2].abs() - self.cyl_half_height
            outside = torch.stack([dr, dz], -1).clamp_min(0.0).norm(dim=-1)
            cols.append(outside + torch.maximum(dr, dz).clamp_max(0.0))
        if not cols:
            return points.new_zeros(points.shape[0], 0)
        return torch.cat(cols, 1) - radii.unsqueeze(1)

    def overlaps(self, points: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: sphere ``(N, 3)``, ``(N,)`` touches or penetrates any obstacle.

        Same answer as ``signed_distance(points, radii).min(1) <= 0`` with fewer operations
        (squared distances, no square roots).
        """
        hit = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
        r2 = radii.square().unsqueeze(1)
        if self.box_half.shape[0]:
            q = self._local(points, self.box_frames, self.box_offsets).abs_().sub_(self.box_half)
            hit |= (q.clamp_min_(0.0).square_().sum(-1) <= r2).any(1)
        if self.sphere_radii.shape[0]:
            d2 = (points.unsqueeze(1) - self.sphere_centers).square().sum(-1)
            hit |= (d2 <= (radii.unsqueeze(1) + self.sphere_radii).square()).any(1)
        if self.cyl_radii.shape[0]:
            local = self._local(points, self.cyl_frames, self.cyl_offsets)
            dr = (local[..., :2].norm(dim=-1) - self.cyl_radii).clamp_min(0.0)
            dz = (local[..., 2].abs() - self.cyl_half_height).clamp_min(0.0)
            hit |= (dr.square() + dz.square() <= r2).any(1)
        return hit


# ----------------------------------------------------------------------------------------------
# Sphere checker (torch)
# ----------------------------------------------------------------------------------------------

class SphereCollisionChecker:
    """Conservative collision checks of joint batches with the robot as spheres, in torch.

    Every method takes ``q`` ``(B, 7)`` (rad) and optionally the link poses ``(B, L, 4, 4)``
    of :meth:`RobotKinematics.link_poses` for the same ``q``, so that a caller who already ran
    forward kinematics does not pay for it twice. Results are ``(B,)`` tensors on ``spec.device``.
    """

    def __init__(self, kinematics: RobotKinematics, spheres: RobotSpheres, spec: TensorSpec):
        self.kinematics = kinematics
        self.spec = spec
        index = {name: k for k, name in enumerate(kinematics.link_names)}
        unknown = sorted(set(spheres.links) - set(index))
        if unknown:
            raise ModelLoadError(f"spheres on links {unknown} that the robot does not have")
        missing = [name for name in kinematics.link_names
                   if kinematics.urdf.collisions.get(name) and name not in spheres.links]
        if missing:
            raise ModelLoadError(f"links {missing} have collision geometry but no spheres")
        self.spheres = spheres
        link_idx = torch.tensor([index[n] for n in spheres.links], device=spec.device)
        self._link_idx = link_idx  # (S,)
        self._centers = spec.tensor(spheres.centers)  # (S, 3) link frames
        self._radii = spec.tensor(spheres.radii)  # (S,)
        base = kinematics.base_link
        world = [k for k, n in enumerate(spheres.links) if n != base]
        self._world_idx = torch.tensor(world, device=spec.device, dtype=torch.long)
        self._world_radii = self._radii[self._world_idx]
        pairs = self_collision_link_pairs(kinematics.urdf, kinematics.link_names)
        allowed = {frozenset(p) for p in pairs}
        sphere_pairs = [(i, j) for i, j in combinations(range(len(spheres)), 2)
                        if frozenset((spheres.links[i], spheres.links[j])) in allowed]
        ij = torch.tensor(sphere_pairs, device=spec.device, dtype=torch.long).reshape(-1, 2)
        self._pair_i, self._pair_j = ij[:, 0], ij[:, 1]
        #: (P,) squared sum of radii of each checked sphere pair
        self._pair_r2 = (self._radii[self._pair_i] + self._radii[self._pair_j]).square()
        self.link_pairs = pairs  #: link pairs checked for self-collision

    @staticmethod
    def from_file(kinematics: RobotKinematics, spec: TensorSpec,
                  path: str | None = None) -> "SphereCollisionChecker":
        """Checker with the spheres of ``path`` (default ``models/panda_spheres.yaml``)."""
        return SphereCollisionChecker(kinematics, RobotSpheres.load(path), spec)

    @property
    def num_spheres(self) -> int:
        return len(self.spheres)

    def _poses(self, q: torch.Tensor, poses: torch.Tensor | None) -> torch.Tensor:
        if poses is None:
            return self.kinematics.link_poses(q)
        if poses.ndim != 4 or poses.shape[1:] != (len(self.kinematics.link_names), 4, 4):
            raise InvalidRequestError(f"link poses must be (B, {len(self.kinematics.link_names)}"
                                      f", 4, 4), got {tuple(poses.shape)}")
        return poses

    def sphere_positions(self, q: torch.Tensor,
                         poses: torch.Tensor | None = None) -> torch.Tensor:
        """Sphere centres in the base frame: ``(B, S, 3)`` m."""
        frames = self._poses(q, poses)[:, self._link_idx]  # (B, S, 4, 4)
        return (frames[..., :3, :3] @ self._centers.unsqueeze(-1)).squeeze(-1) \
            + frames[..., :3, 3]

    def self_collision(self, q: torch.Tensor,
                       poses: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` bool: some pair of non-adjacent links overlaps."""
        x = self.sphere_positions(q, poses)
        return self._self_hits(x)

    def _self_hits(self, x: torch.Tensor) -> torch.Tensor:
        d2 = (x[:, self._pair_i] - x[:, self._pair_j]).square_().sum(-1)  # (B, P)
        return (d2 <= self._pair_r2).any(-1)

    def world_collision(self, q: torch.Tensor, world: CollisionWorld,
                        poses: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` bool: some link other than the base touches an obstacle."""
        x = self.sphere_positions(q, poses)
        return self._world_hits(x, world)

    def _world_hits(self, x: torch.Tensor, world: CollisionWorld) -> torch.Tensor:
        if len(world) == 0:
            return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        pts = x[:, self._world_idx].reshape(-1, 3)
        radii = self._world_radii.repeat(x.shape[0])
        return world.overlaps(pts, radii).view(x.shape[0], -1).any(-1)

    def valid(self, q: torch.Tensor, world: CollisionWorld,
              poses: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` bool: within joint limits, no self-collision, no obstacle collision."""
        x = self.sphere_positions(q, poses)
        return (self.kinematics.within_limits(q) & ~self._self_hits(x)
                & ~self._world_hits(x, world))

    def clearance(self, q: torch.Tensor, world: CollisionWorld,
                  poses: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` m: smallest signed distance between the robot's spheres (base link excluded)
        and the obstacles; negative when penetrating, +inf without obstacles.

        A lower bound of the distance between the collision meshes and the obstacles.
        """
        x = self.sphere_positions(q, poses)
        if len(world) == 0:
            return torch.full((x.shape[0],), float("inf"), device=x.device, dtype=x.dtype)
        pts = x[:, self._world_idx].reshape(-1, 3)
        radii = self._world_radii.repeat(x.shape[0])
        return world.signed_distance(pts, radii).view(x.shape[0], -1).min(-1).values


# ----------------------------------------------------------------------------------------------
# PyBullet checker (exact, ground truth)
# ----------------------------------------------------------------------------------------------

def _matrix_to_quaternion_xyzw(rot: np.ndarray) -> list[float]:
    """Quaternion (x, y, z, w) of a rotation matrix (Shepperd's method)."""
    m = rot
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, s / 4]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [s / 4, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 1] + m[1, 0]) / s, s / 4, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4, (m[1, 0] - m[0, 1]) / s]
    q = np.asarray(q, dtype=float)
    return (q / np.linalg.norm(q)).tolist()


def _as_numpy_batch(q, num_joints: int) -> np.ndarray:
    if isinstance(q, torch.Tensor):
        q = q.detach().cpu().double().numpy()
    q = np.asarray(q, dtype=float)
    if q.ndim != 2 or q.shape[1] != num_joints:
        raise InvalidRequestError(
            f"joint configurations must be (B, {num_joints}), got {tuple(q.shape)}")
    return q


class PyBulletCollisionChecker:
    """Exact collision checks on the URDF's collision meshes in a private PyBullet client.

    Contact is ``getClosestPoints(..., distance=0)`` returning a point with distance <= 0 for a
    checked pair (a stateless query). With ``screen=True`` (default) one
    ``performCollisionDetection`` per configuration first lists the candidate pairs (broadphase +
    narrowphase, contacts closer than ``screen_tolerance``) and only those are confirmed with
    ``getClosestPoints``: the same answer as ``screen=False`` (every pair queried), several times
    faster. The client is owned by the process that built the checker; call :meth:`close`
    (or use it as a context manager) when done. Not safe to share across a ``fork``.
    """

    def __init__(self, obstacles: Sequence[Obstacle] = (), urdf_path: str | None = None,
                 screen: bool = True, screen_tolerance: float = 1e-3):
        import pybullet as p  # imported here: the module prints its build time on import

        self._p = p
        self.screen = screen
        self.screen_tolerance = screen_tolerance
        urdf_path = urdf_path or panda_urdf_path()
        with open(urdf_path) as f:
            self.urdf = URDFModel.from_text(f.read(), os.path.dirname(urdf_path))
        for o in obstacles:
            o.validate()
        self.obstacles = tuple(obstacles)
        self.client = p.connect(p.DIRECT)
        if self.client < 0:
            raise ModelLoadError("cannot start a PyBullet DIRECT client")
        cid = self.client
        self.robot = p.loadURDF(urdf_path, useFixedBase=True, flags=p.URDF_USE_SELF_COLLISION,
                                physicsClientId=cid)
        link_index = {PANDA_BASE: -1}
        joint_index = {}
        self.lower, self.upper = np.zeros(len(PANDA_JOINTS)), np.zeros(len(PANDA_JOINTS))
        for i in range(p.getNumJoints(self.robot, physicsClientId=cid)):
            info = p.getJointInfo(self.robot, i, physicsClientId=cid)
            joint_index[info[1].decode()] = i
            link_index[info[12].decode()] = i
        self._joints = [joint_index[name] for name in PANDA_JOINTS]
        for k, name in enumerate(PANDA_JOINTS):
            self.lower[k] = self.urdf.joints[name].lower
            self.upper[k] = self.urdf.joints[name].upper
        for name, value in PANDA_FINGERS.items():
            p.resetJointState(self.robot, joint_index[name], value, physicsClientId=cid)
        self.link_index = link_index  #: link name -> PyBullet link index (base -1)
        pairs = self_collision_link_pairs(self.urdf, list(link_index))
        self._pairs = [(link_index[a], link_index[b]) for a, b in pairs]
        self._pair_set = {frozenset(pr) for pr in self._pairs}
        self.link_pairs = pairs  #: link pairs checked for self-collision
        # Excluded pairs are filtered out of the screening pass as well.
        geometric = [link_index[n] for n in link_index if self.urdf.collisions.get(n)]
        for a, b in combinations(geometric, 2):
            if frozenset((a, b)) not in self._pair_set:
                p.setCollisionFilterPair(self.robot, self.robot, a, b, 0, physicsClientId=cid)
        self._bodies = []
        for o in self.obstacles:
            if o.kind == "box":
                shape = p.createCollisionShape(p.GEOM_BOX, halfExtents=[s / 2 for s in o.size],
                                               physicsClientId=cid)
            elif o.kind == "sphere":
                shape = p.createCollisionShape(p.GEOM_SPHERE, radius=o.size[0],
                                               physicsClientId=cid)
            else:
                shape = p.createCollisionShape(p.GEOM_CYLINDER, height=o.size[0],
                                               radius=o.size[1], physicsClientId=cid)
            body = p.createMultiBody(0, shape, basePosition=list(o.position),
                                     baseOrientation=_matrix_to_quaternion_xyzw(
                                         o.rotation_matrix), physicsClientId=cid)
            # The base link never collides with obstacles.
            p.setCollisionFilterPair(self.robot, body, -1, -1, 0, physicsClientId=cid)
            self._bodies.append(body)
        self._body_set = set(self._bodies)
        self._moving = [i for i in geometric if i != -1]

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        """Disconnect the private client (idempotent)."""
        if self.client is not None and self.client >= 0:
            try:
                self._p.disconnect(physicsClientId=self.client)
            except self._p.error:
                pass
        self.client = None

    def __enter__(self) -> "PyBulletCollisionChecker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- one configuration ----------------------------------------------------------------------
    def _set(self, q: np.ndarray) -> None:
        self._p.resetJointStatesMultiDof(self.robot, self._joints, [[float(v)] for v in q],
                                         physicsClientId=self.client)

    def _touch(self, body_b: int, link_a: int, link_b: int | None) -> bool:
        p = self._p
        if link_b is None:
            pts = p.getClosestPoints(self.robot, body_b, 0.0, linkIndexA=link_a,
                                     physicsClientId=self.client)
        else:
            pts = p.getClosestPoints(self.robot, body_b, 0.0, linkIndexA=link_a,
                                     linkIndexB=link_b, physicsClientId=self.client)
        return any(pt[8] <= 0.0 for pt in pts)

    def _check(self, want_self: bool, want_world: bool) -> tuple[bool, bool]:
        """(self collision, world collision) of the configuration currently set."""
        if not self.screen:
            hit_self = want_self and any(self._touch(self.robot, a, b) for a, b in self._pairs)
            hit_world = want_world and any(self._touch(body, link, None)
                                           for body in self._bodies for link in self._moving)
            return hit_self, hit_world
        p, cid, robot = self._p, self.client, self.robot
        p.performCollisionDetection(physicsClientId=cid)
        self_cands, world_cands = set(), set()
        for pt in p.getContactPoints(bodyA=robot, physicsClientId=cid):
            if pt[8] > self.screen_tolerance:
                continue
            body_a, body_b, link_a, link_b = pt[1], pt[2], pt[3], pt[4]
            if body_a == robot and body_b == robot:
                pair = (min(link_a, link_b), max(link_a, link_b))
                if frozenset(pair) in self._pair_set:
                    self_cands.add(pair)
            else:
                link, body = (link_a, body_b) if body_a == robot else (link_b, body_a)
                if link != -1 and body in self._body_set:
                    world_cands.add((body, link))
        hit_self = want_self and any(self._touch(robot, a, b) for a, b in sorted(self_cands))
        hit_world = want_world and any(self._touch(body, link, None)
                                       for body, link in sorted(world_cands))
        return hit_self, hit_world

    # -- batches --------------------------------------------------------------------------------
    def _run(self, q, want_self: bool, want_world: bool) -> np.ndarray:
        q = _as_numpy_batch(q, len(self._joints))
        out = np.zeros((q.shape[0], 2), dtype=bool)
        for k in range(q.shape[0]):
            self._set(q[k])
            out[k] = self._check(want_self, want_world)
        return out

    def within_limits(self, q) -> np.ndarray:
        """``(B,)`` bool: every joint inside the URDF limits."""
        q = _as_numpy_batch(q, len(self._joints))
        return ((q >= self.lower) & (q <= self.upper)).all(1)

    def self_collision(self, q) -> np.ndarray:
        """``(B,)`` bool: some non-adjacent link pair in contact. ``q``: numpy or torch (B, 7)."""
        return self._run(q, True, False)[:, 0]

    def world_collision(self, q) -> np.ndarray:
        """``(B,)`` bool: some link other than the base in contact with an obstacle."""
        return self._run(q, False, True)[:, 1]

    def collisions(self, q) -> np.ndarray:
        """``(B, 2)`` bool: columns (self collision, world collision)."""
        return self._run(q, True, True)

    def valid(self, q) -> np.ndarray:
        """``(B,)`` bool: within joint limits, no self-collision, no obstacle collision."""
        return self.within_limits(q) & ~self.collisions(q).any(1)


def exact_self_collision_free(q, checker: PyBulletCollisionChecker | None = None) -> np.ndarray:
    """``(B,)`` bool: PyBullet calls the configurations ``(B, 7)`` free of self-collision (joint
    limits are not checked). Builds (and closes) an obstacle-free checker unless one is given;
    pass one to amortize its start-up (~50 ms) over many calls."""
    if checker is not None:
        return ~checker.self_collision(q)
    with PyBulletCollisionChecker() as own:
        return ~own.self_collision(q)
