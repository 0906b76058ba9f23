"""The robot as spheres and the obstacles as tensors: batched, conservative collision checks.

:class:`SphereCollisionChecker` checks a whole batch of configurations at once in torch (CPU or
CUDA) with spheres fitted around the Panda's collision meshes (:class:`RobotSpheres`, fitted by
:mod:`.sphere_fitting`), against the primitive obstacles of a :class:`CollisionWorld`. The
spheres cover what PyBullet collides with, so it never calls free what PyBullet calls colliding;
the conventions it shares with the exact checkers are in :mod:`.collision`.
"""

from __future__ import annotations

import base64
import math
import os
import zlib
from dataclasses import dataclass, field
from itertools import combinations
from typing import Sequence

import numpy as np
import torch
import yaml

from ..errors import InvalidRequestError, ModelLoadError
from ..paths import default_models_dir
from ..tensor import TensorSpec
from .collision import self_collision_link_pairs
from .kinematics import RobotKinematics
from .scenes import Obstacle, validate_obstacles


def default_spheres_path() -> str:
    """Path of the shipped ``panda_spheres.yaml`` (see
    :func:`mace_core.paths.default_models_dir`)."""
    return os.path.join(default_models_dir(), "panda_spheres.yaml")


# ----------------------------------------------------------------------------------------------
# Robot spheres
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class PairTable:
    """Where some link pairs may touch, as cells over the one or two joints that move them.

    The grid covers those joints' limits and is computed with PyBullet.

    A cell is flagged when some pair's PyBullet distance at a corner of the cell is within
    ``bound``, the largest distance change possible inside a cell (joint step times the largest
    lever arm), so a configuration in an unflagged cell is certainly free for these pairs.
    """

    pairs: tuple[tuple[str, str], ...]  #: (ancestor link, descendant link) pairs answered
    joints: tuple[str, ...]  #: the table's axes, root first
    lower: tuple[float, ...]  #: rad, first corner along each axis
    step: tuple[float, ...]  #: rad, cell size along each axis
    cells: np.ndarray  #: bool (n_1, ..., n_J): True where a pair may touch
    bound: float  #: m, distance margin used to flag cells

    def to_dict(self) -> dict:
        """YAML-friendly form; cells packed as zlib-compressed base64 bits."""
        packed = zlib.compress(np.packbits(self.cells.reshape(-1)).tobytes(), 9)
        return {"pairs": [list(p) for p in self.pairs], "joints": list(self.joints),
                "lower": [float(v) for v in self.lower], "step": [float(v) for v in self.step],
                "shape": list(self.cells.shape), "bound": float(self.bound),
                "cells": base64.b64encode(packed).decode("ascii")}

    @staticmethod
    def from_dict(data: dict) -> "PairTable":
        """Inverse of :meth:`to_dict`.

        Raises:
            ModelLoadError: missing keys or a cell array of the wrong size.
        """
        keys = {"pairs", "joints", "lower", "step", "shape", "bound", "cells"}
        if not isinstance(data, dict) or set(data) != keys:
            raise ModelLoadError(f"pair table must have exactly the keys {sorted(keys)}")
        shape = tuple(int(v) for v in data["shape"])
        try:
            bits = np.frombuffer(zlib.decompress(base64.b64decode(data["cells"])), np.uint8)
        except (ValueError, zlib.error) as exc:
            raise ModelLoadError(f"pair table cells are corrupt: {exc}") from exc
        size = int(np.prod(shape))
        if len(bits) * 8 < size or not len(shape) == len(data["joints"]) == len(data["lower"]) \
                == len(data["step"]):
            raise ModelLoadError("pair table cells do not match its shape")
        cells = np.unpackbits(bits)[:size].astype(bool).reshape(shape)
        return PairTable(tuple(tuple(p) for p in data["pairs"]), tuple(data["joints"]),
                         tuple(float(v) for v in data["lower"]),
                         tuple(float(v) for v in data["step"]), cells, float(data["bound"]))


@dataclass(frozen=True, eq=False)
class RobotSpheres:
    """Spheres rigidly attached to the robot's links, covering its collision geometry."""

    links: tuple[str, ...]  #: (S,) link each sphere is attached to
    centers: np.ndarray  #: (S, 3) m, sphere centres in their link's frame
    radii: np.ndarray  #: (S,) m, radii (the PyBullet mesh margin included)
    #: link pairs that can never touch (found with PyBullet); the sphere checker skips them
    never_colliding: tuple[tuple[str, str], ...] = ()
    #: exact tables for link pairs moved by at most two joints; the sphere checker uses them
    #: instead of those pairs' spheres
    tables: tuple[PairTable, ...] = ()
    metadata: dict = field(default_factory=dict)  #: how the spheres were fitted (free form)

    def __post_init__(self):
        centers = np.asarray(self.centers, dtype=float).reshape(-1, 3)
        radii = np.asarray(self.radii, dtype=float).reshape(-1)
        if (centers.shape != (len(self.links), 3) or radii.shape != (len(self.links),)
                or not np.all(np.isfinite(centers)) or not np.all(radii > 0)):
            raise ModelLoadError("robot spheres need (S, 3) finite centres and (S,) radii > 0")
        object.__setattr__(self, "centers", centers)
        object.__setattr__(self, "radii", radii)
        object.__setattr__(self, "never_colliding",
                           tuple((str(a), str(b)) for a, b in self.never_colliding))

    def __len__(self) -> int:
        return len(self.links)

    def for_link(self, link: str) -> tuple[np.ndarray, np.ndarray]:
        """Centres ``(n, 3)`` and radii ``(n,)`` of the spheres of one link."""
        mask = np.array([name == link for name in self.links], dtype=bool)
        return self.centers[mask], self.radii[mask]

    def save(self, path: str, header: str = "") -> None:
        """Write the YAML that :meth:`load` reads.

        Keys: ``links: {name: [[x, y, z, r], ...]}``, ``never_colliding: [[link_a, link_b],
        ...]``, ``tables`` (:meth:`PairTable.to_dict`) and free-form ``metadata``.
        """
        by_link: dict[str, list[list[float]]] = {}
        for name, c, r in zip(self.links, self.centers, self.radii):
            # Micrometres; the radius rounded up past the centre's rounding (still covering).
            radius = math.ceil((float(r) + 1e-6) * 1e6) / 1e6
            by_link.setdefault(name, []).append([round(float(v), 6) for v in c] + [radius])
        doc = {"metadata": self.metadata, "links": by_link,
               "never_colliding": [list(p) for p in self.never_colliding],
               "tables": [t.to_dict() for t in self.tables]}
        text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=99)
        lines = [f"# {line}" for line in header.splitlines()]
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
        keys = {"metadata", "links", "never_colliding", "tables"}
        if not isinstance(doc, dict) or set(doc) - keys or "links" not in doc:
            raise ModelLoadError(f"'{path}': expected keys {sorted(keys)} ('links' required)")
        links, rows = [], []
        for name, spheres in doc["links"].items():
            for row in spheres:
                if len(row) != 4:
                    raise ModelLoadError(f"'{path}': sphere of {name} must be [x, y, z, r]")
                links.append(str(name))
                rows.append([float(v) for v in row])
        pairs = doc.get("never_colliding") or []
        if any(len(pr) != 2 for pr in pairs):
            raise ModelLoadError(f"'{path}': never_colliding entries must be [link_a, link_b]")
        rows_arr = np.asarray(rows, dtype=float).reshape(-1, 4)
        tables = tuple(PairTable.from_dict(t) for t in doc.get("tables") or [])
        return RobotSpheres(tuple(links), rows_arr[:, :3], rows_arr[:, 3],
                            tuple(tuple(pr) for pr in pairs), tables,
                            dict(doc.get("metadata") or {}))


# ----------------------------------------------------------------------------------------------
# Obstacles as tensors
# ----------------------------------------------------------------------------------------------

_KIND_CODES = {"box": 0, "sphere": 1, "cylinder": 2}


def _outside_sq(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, dims: torch.Tensor,
                kind: int) -> torch.Tensor:
    """Squared distance (m^2) from points to a primitive, 0 inside.

    Coordinates ``x, y, z`` in the primitive's frame, any shape; ``dims`` ``(..., 3)`` broadcast
    against them: box half extents, sphere (R, R, R), cylinder (R, R, h/2). Component-wise: no
    size-3 reductions.
    """
    if kind == 0:
        out = (x.abs() - dims[..., 0]).clamp_min_(0.0).square_()
        out += (y.abs() - dims[..., 1]).clamp_min_(0.0).square_()
        return out.add_((z.abs() - dims[..., 2]).clamp_min_(0.0).square_())
    if kind == 1:
        norm = (x.square() + y.square() + z.square()).sqrt_()
        return (norm - dims[..., 0]).clamp_min_(0.0).square_()
    radial = (x.square() + y.square()).sqrt_()
    out = (radial - dims[..., 0]).clamp_min_(0.0).square_()
    return out.add_((z.abs() - dims[..., 2]).clamp_min_(0.0).square_())


def _norm(*parts: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of the components ``parts``, elementwise.

    The gradient is 0 (not NaN) at the origin: the squared norm is clamped at 1e-18 m^2 (1 nm).
    """
    return sum(p.square() for p in parts).clamp_min(1e-18).sqrt()


def _signed(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, dims: torch.Tensor,
            kind: int) -> torch.Tensor:
    """Signed distance (m) from points to a primitive's surface, negative inside.

    Arguments as :func:`_outside_sq`.
    """
    if kind == 0:
        qx, qy, qz = x.abs() - dims[..., 0], y.abs() - dims[..., 1], z.abs() - dims[..., 2]
        inside = torch.maximum(torch.maximum(qx, qy), qz).clamp_max(0.0)
        return _norm(qx.clamp_min(0.0), qy.clamp_min(0.0), qz.clamp_min(0.0)) + inside
    if kind == 1:
        return _norm(x, y, z) - dims[..., 0]
    dr = _norm(x, y) - dims[..., 0]
    dz = z.abs() - dims[..., 2]
    return _norm(dr.clamp_min(0.0), dz.clamp_min(0.0)) + torch.maximum(dr, dz).clamp_max(0.0)


def _signed_with_gradient(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, dims: torch.Tensor,
                          kind: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """:func:`_signed` and its gradient in the primitive's frame, in closed form (no autograd).

    Returns the signed distance and its three partial derivatives, each shaped like ``x``. Inside
    a box or a cylinder the gradient is the normal of the nearest face.
    """
    if kind == 1:
        norm = _norm(x, y, z)
        return norm - dims[..., 0], (x / norm, y / norm, z / norm)
    if kind == 0:
        qs = (x.abs() - dims[..., 0], y.abs() - dims[..., 1], z.abs() - dims[..., 2])
        signs = (x.sign(), y.sign(), z.sign())
    else:
        radial = _norm(x, y)
        qs = (radial - dims[..., 0], z.abs() - dims[..., 2])
        signs = (None, z.sign())
    outs = [q.clamp_min(0.0) for q in qs]
    out = _norm(*outs)
    deepest = qs[0]
    for q in qs[1:]:
        deepest = torch.maximum(deepest, q)
    is_out = deepest > 0.0
    signed = torch.where(is_out, out, deepest)
    grads, taken = [], None  # inside: the normal of one nearest face (ties: the first)
    for q, o in zip(qs, outs):
        nearest = q == deepest if taken is None else (q == deepest) & ~taken
        taken = nearest if taken is None else taken | nearest
        grads.append(torch.where(is_out, o / out, nearest.to(q.dtype)))  # d signed / d q
    if kind == 0:
        return signed, tuple(g * sg for g, sg in zip(grads, signs))
    return signed, (grads[0] * x / radial, grads[0] * y / radial, grads[1] * signs[1])


@dataclass(frozen=True, eq=False)
class CollisionWorld:
    """Obstacles tensorized once per request, in the robot's base frame.

    Build it with :meth:`from_obstacles`; obstacles are stored sorted by kind (boxes, spheres,
    cylinders), which is the column order of :meth:`signed_distance`. K obstacles.
    """

    obstacles: tuple[Obstacle, ...]  #: (K,) the validated obstacles, in column order
    kinds: torch.Tensor  #: (K,) long, 0 box, 1 sphere, 2 cylinder
    rotations: torch.Tensor  #: (K, 3, 3) base-from-obstacle rotations
    positions: torch.Tensor  #: (K, 3) m, obstacle centres
    dims: torch.Tensor  #: (K, 3) m, box half extents, sphere (R, R, R), cylinder (R, R, h/2)
    aabb_half: torch.Tensor  #: (K, 3) m, half extents of each obstacle's base-frame bounding box
    slices: tuple[tuple[int, int, int], ...]  #: (kind, first column, end column) per kind

    @staticmethod
    def from_obstacles(obstacles: Sequence[Obstacle], spec: TensorSpec) -> "CollisionWorld":
        """Validate and tensorize obstacles.

        Raises:
            InvalidRequestError: an obstacle fails :meth:`Obstacle.validate`.
        """
        validate_obstacles(obstacles)
        ordered = sorted(obstacles, key=lambda o: _KIND_CODES[o.kind])
        rot = np.stack([o.rotation_matrix for o in ordered]) if ordered else np.zeros((0, 3, 3))
        pos = np.asarray([o.position for o in ordered], dtype=float).reshape(-1, 3)
        dims_arr = np.asarray([o.half_extents for o in ordered], dtype=float).reshape(-1, 3)
        codes = [_KIND_CODES[o.kind] for o in ordered]
        slices = tuple((code, codes.index(code), len(codes) - codes[::-1].index(code))
                       for code in sorted(set(codes)))
        return CollisionWorld(
            obstacles=tuple(ordered),
            kinds=torch.tensor(codes, dtype=torch.long, device=spec.device),
            rotations=spec.tensor(rot), positions=spec.tensor(pos), dims=spec.tensor(dims_arr),
            aabb_half=spec.tensor(np.einsum("kij,kj->ki", np.abs(rot), dims_arr)),
            slices=slices)

    @property
    def names(self) -> tuple[str, ...]:
        """Obstacle names, in column order."""
        return tuple(o.name for o in self.obstacles)

    def __len__(self) -> int:
        return len(self.obstacles)

    def _local(self, points: torch.Tensor, a: int, b: int) -> tuple[torch.Tensor, ...]:
        """Points ``(N, 3)`` in the frames of obstacles ``a:b``: ``x, y, z`` ``(b - a, N)``."""
        rot, k = self.rotations[a:b], b - a
        # One matrix product: rows (i, k) of A hold column i of R_k, so A p = R_k^T p.
        mat = rot.permute(2, 0, 1).reshape(3 * k, 3)
        offset = torch.einsum("kji,kj->ik", rot, self.positions[a:b]).reshape(3 * k, 1)
        local = torch.addmm(offset, mat, points.T, alpha=1.0, beta=-1.0).view(3, k, -1)
        return local[0], local[1], local[2]  # R^T (p - c)

    def _signed_kn(self, points: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        """:meth:`signed_distance` transposed: ``(K, N)``."""
        rows = [_signed(*self._local(points, a, b), self.dims[a:b, None], kind)
                for kind, a, b in self.slices]
        if not rows:
            return points.new_zeros(0, points.shape[0])
        return torch.cat(rows, 0) - radii

    def signed_distance(self, points: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        """Signed distance (m) between spheres and every obstacle, negative when they overlap.

        Differentiable in ``points`` (the IK refiner's obstacle penalty uses its gradient).

        Args:
            points: ``(N, 3)`` sphere centres in the base frame.
            radii: ``(N,)`` sphere radii.

        Returns:
            ``(N, K)``, columns in the order of :attr:`obstacles`.
        """
        return self._signed_kn(points, radii).T.contiguous()

    def penetration(self, points: torch.Tensor, radii: torch.Tensor,
                    margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Penetration cost of spheres and its gradient, in closed form (no autograd).

        cost_n = Σ_k relu(margin − sd_nk), the depth (m) of sphere n inside every obstacle counted
        from ``margin`` outside it; the IK refiner's collision penalty descends it.

        Args:
            points: ``(N, 3)`` sphere centres in the base frame.
            radii: ``(N,)`` sphere radii.
            margin: m, clearance below which a sphere starts to cost.

        Returns:
            cost ``(N,)`` and its gradient with respect to the centres ``(N, 3)``.
        """
        n, k = points.shape[0], len(self)
        if k == 0:
            return points.new_zeros(n), torch.zeros_like(points)
        index = torch.arange(k, device=points.device).repeat(n)  # every (sphere, obstacle)
        depth, grad = self.pair_penetration(points.repeat_interleave(k, 0).unsqueeze(1),
                                            radii.repeat_interleave(k).unsqueeze(1), index,
                                            margin)
        return depth.view(n, k).sum(1), grad.view(n, k, 3).sum(1)

    def overlap_matrix(self, points: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` bool: sphere ``(N, 3)``, ``(N,)`` touches or penetrates obstacle k.

        Same answer as ``signed_distance(points, radii) <= 0``, with squared distances only.
        """
        r2 = radii.square()
        rows = [_outside_sq(*self._local(points, a, b), self.dims[a:b, None], kind) <= r2
                for kind, a, b in self.slices]
        if not rows:
            return torch.zeros(points.shape[0], 0, dtype=torch.bool, device=points.device)
        return torch.cat(rows, 0).T.contiguous()

    def pair_overlaps(self, points: torch.Tensor, radii: torch.Tensor,
                      index: torch.Tensor) -> torch.Tensor:
        """``(N, m)`` bool: spheres ``(N, m, 3)``, ``(N, m)`` touch obstacle ``index`` ``(N,)``."""
        hit = torch.zeros(points.shape[:2], dtype=torch.bool, device=points.device)
        for kind, rows in self._rows_by_kind(index):
            k = index[rows]
            local = torch.bmm(points[rows] - self.positions.index_select(0, k).unsqueeze(1),
                              self.rotations.index_select(0, k))  # R^T (p - c)
            touch = _outside_sq(*local.unbind(-1), self.dims.index_select(0, k).unsqueeze(1),
                                kind) <= radii[rows].square()
            if isinstance(rows, slice):  # one kind: every row
                return touch
            hit[rows] = touch
        return hit

    def _rows_by_kind(self, index: torch.Tensor):
        """Per kind of obstacle: the rows of a per-pair obstacle ``index`` ``(N,)`` of that kind
        (``(n,)`` long, or ``slice(None)``, every row, when all obstacles are of one kind)."""
        for kind, a, b in self.slices:
            if (a, b) == (0, len(self)):
                yield kind, slice(None)
                return
            rows = ((index >= a) & (index < b)).nonzero().squeeze(1)
            if rows.numel():
                yield kind, rows

    def pair_penetration(self, points: torch.Tensor, radii: torch.Tensor, index: torch.Tensor,
                         margin: float) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`penetration` of spheres ``(N, m, 3)``, ``(N, m)`` against obstacle ``index``
        ``(N,)`` only.

        Returns:
            depth ``(N, m)`` (m, 0 when clear) and its gradient with respect to the centres
            ``(N, m, 3)``, base frame.
        """
        depth, grad = torch.zeros_like(radii), torch.zeros_like(points)
        for kind, rows in self._rows_by_kind(index):
            k = index[rows]
            rot = self.rotations.index_select(0, k)  # (n, 3, 3)
            local = torch.bmm(points[rows] - self.positions.index_select(0, k).unsqueeze(1),
                              rot)  # R^T (p - c)
            signed, g = _signed_with_gradient(*local.unbind(-1),
                                              self.dims.index_select(0, k).unsqueeze(1), kind)
            d = ((margin + radii[rows]) - signed).clamp_min_(0.0)
            # d local_j / d p_i = R_ij
            g = torch.where((d > 0.0).unsqueeze(-1), torch.stack(g, -1), 0.0).bmm(
                rot.transpose(1, 2)).neg_()
            if isinstance(rows, slice):  # one kind: every row
                return d, g
            depth[rows], grad[rows] = d, g
        return depth, grad


# ----------------------------------------------------------------------------------------------
# Sphere checker (torch)
# ----------------------------------------------------------------------------------------------

class SphereCollisionChecker:
    """Conservative collision checks of joint batches with the robot as spheres, in torch.

    Every method takes ``q`` ``(B, 7)`` (rad) and optionally the link poses ``(B, L, 4, 4)``
    of :meth:`RobotKinematics.link_poses` for the same ``q``, so that a caller who already ran
    forward kinematics does not pay for it twice. Results are ``(B,)`` tensors on ``spec.device``.

    Two levels, all batched: each link's spheres are split into groups of at most
    ``group_size`` with a bounding sphere. Group pairs (self) whose bounding spheres overlap, and
    groups whose bounding sphere meets an obstacle's bounding box (world), are the only ones
    whose spheres are tested. The dense first level keeps the batch as the last (contiguous)
    dimension and works coordinate by coordinate (no tiny matrix products, no size-3
    reductions), which is what CPUs run fast.
    """

    def __init__(self, kinematics: RobotKinematics, spheres: RobotSpheres, spec: TensorSpec,
                 group_size: int = 8):
        self.kinematics = kinematics
        self.spec = spec
        self.spheres = spheres
        #: (J, L): joint j moves link l (the penetration's joint gradient)
        self._moves = kinematics.ancestor_mask(list(kinematics.link_names))
        names = kinematics.link_names
        index = {name: k for k, name in enumerate(names)}
        unknown = sorted(set(spheres.links) - set(index))
        if unknown:
            raise ModelLoadError(f"spheres on links {unknown} that the robot does not have")
        missing = [n for n in names
                   if kinematics.urdf.collisions.get(n) and n not in spheres.links]
        if missing:
            raise ModelLoadError(f"links {missing} have collision geometry but no spheres")
        self._sphere_link = torch.tensor([index[n] for n in spheres.links], device=spec.device)
        self._centers = spec.tensor(spheres.centers)  # (S, 3), link frames
        self._radii = spec.tensor(spheres.radii)  # (S,)
        world = [k for k, n in enumerate(spheres.links) if n != kinematics.base_link]
        # the spheres an obstacle can touch (all but the base's), for clearance
        self._world_sphere_plan = self._gather_plan([index[spheres.links[k]] for k in world],
                                                    spheres.centers[world])
        self._world_radii = spec.tensor(spheres.radii[world])  # (Sw,)
        skip = {frozenset(p) for p in spheres.never_colliding}
        skip |= {frozenset(p) for t in spheres.tables for p in t.pairs}
        #: link pairs whose spheres are tested for self-collision
        self.link_pairs = [p for p in self_collision_link_pairs(kinematics.urdf, names)
                           if frozenset(p) not in skip]
        self._build_groups(group_size, index)
        self._tables = []
        for t in spheres.tables:
            cols = [kinematics.joint_names.index(j) for j in t.joints]
            shape = torch.tensor(t.cells.shape, device=spec.device)
            strides = torch.tensor([int(np.prod(t.cells.shape[k + 1:]))
                                    for k in range(len(cols))], device=spec.device)
            self._tables.append((torch.tensor(cols, device=spec.device),
                                 spec.tensor(t.lower), spec.tensor(t.step), shape, strides,
                                 torch.tensor(t.cells.reshape(-1), device=spec.device)))

    def _build_groups(self, group_size: int, index: dict[str, int]) -> None:
        """Split each link's spheres into groups along the principal axis of their centres.

        Also the checked group pairs, and the rows and weights that turn link frames into group
        centres.
        """
        groups: list[tuple[str, np.ndarray]] = []
        for link in dict.fromkeys(self.spheres.links):
            members = np.array([k for k, n in enumerate(self.spheres.links) if n == link])
            c = self.spheres.centers[members]
            axis = np.linalg.svd(c - c.mean(0))[2][0] if len(c) > 1 else np.zeros(3)
            order = members[np.argsort((c - c.mean(0)) @ axis, kind="stable")]
            for chunk in np.array_split(order, -(-len(order) // group_size)):
                groups.append((link, chunk))
        gmax = max(len(chunk) for _, chunk in groups)
        centers = np.zeros((len(groups), gmax, 3))
        radii = np.zeros((len(groups), gmax))
        valid = np.zeros((len(groups), gmax), dtype=bool)
        g_center, g_radius = np.zeros((len(groups), 3)), np.zeros(len(groups))
        for g, (_, chunk) in enumerate(groups):
            c, r = self.spheres.centers[chunk], self.spheres.radii[chunk]
            lo, hi = (c - r[:, None]).min(0), (c + r[:, None]).max(0)
            g_center[g] = (lo + hi) / 2
            g_radius[g] = (np.linalg.norm(c - g_center[g], axis=1) + r).max()
            centers[g, :len(chunk)], radii[g, :len(chunk)] = c, r
            centers[g, len(chunk):] = g_center[g]
            valid[g, :len(chunk)] = True
        links = [index[n] for n, _ in groups]
        spec = self.spec
        base = self.kinematics.base_link
        world = [g for g, (n, _) in enumerate(groups) if n != base]
        allowed = {frozenset(p) for p in self.link_pairs}
        pairs = [(a, b) for a, b in combinations(range(len(groups)), 2)
                 if frozenset((groups[a][0], groups[b][0])) in allowed]
        ab = torch.tensor(pairs, device=spec.device, dtype=torch.long).reshape(-1, 2)
        self._center_plan = self._gather_plan(links, g_center)
        self._pair_a, self._pair_b = ab[:, 0], ab[:, 1]
        # (P, m, m) squared contact distances of the spheres of each pair; -1 for padding slots
        reach = radii[ab[:, 0].cpu().numpy(), :, None] + radii[ab[:, 1].cpu().numpy(), None, :]
        both = valid[ab[:, 0].cpu().numpy(), :, None] & valid[ab[:, 1].cpu().numpy(), None, :]
        self._pair_sphere_r2 = spec.tensor(np.where(both, reach ** 2, -1.0))
        self._pair_r2 = spec.tensor((g_radius[ab[:, 0].cpu().numpy()]
                                     + g_radius[ab[:, 1].cpu().numpy()]) ** 2).unsqueeze(1)
        self._world_groups = torch.tensor(world, device=spec.device, dtype=torch.long)
        self._group_link = torch.tensor(links, device=spec.device)
        self._group_points = spec.tensor(centers)  # (G, m, 3), link frames
        self._group_radii = spec.tensor(radii)  # (G, m)
        self._group_valid = torch.tensor(valid, device=spec.device)  # (G, m)
        # radii for penetration depths: padding slots far negative, so they never cost
        self._group_pen_radii = spec.tensor(np.where(valid, radii, -1e3))  # (G, m)
        self._group_radius = spec.tensor(g_radius)  # (G,)
        self._world_group_radius = self._group_radius[self._world_groups]  # (Gw,)
        self.num_groups = len(groups)  #: sphere groups (bounding spheres) in total

    @staticmethod
    def from_file(kinematics: RobotKinematics, spec: TensorSpec,
                  path: str | None = None) -> "SphereCollisionChecker":
        """Checker with the spheres of ``path`` (default ``models/panda_spheres.yaml``)."""
        return SphereCollisionChecker(kinematics, RobotSpheres.load(path), spec)

    @property
    def num_spheres(self) -> int:
        return len(self.spheres)

    def _check(self, q: torch.Tensor) -> torch.Tensor:
        if q.ndim != 2 or q.shape[1] != self.kinematics.num_joints:
            raise InvalidRequestError(f"joint configurations must be (B, "
                                      f"{self.kinematics.num_joints}), got {tuple(q.shape)}")
        return q.to(device=self.spec.device, dtype=self.spec.dtype)

    def _frames(self, q: torch.Tensor, poses: torch.Tensor | None) -> torch.Tensor:
        """Link frames flattened to ``(B, 12 L)`` (the top three rows of each pose)."""
        if poses is None:
            poses = self.kinematics.link_poses(q)
        elif poses.ndim != 4 or poses.shape[1:] != (len(self.kinematics.link_names), 4, 4):
            raise InvalidRequestError(f"link poses must be (B, {len(self.kinematics.link_names)}"
                                      f", 4, 4), got {tuple(poses.shape)}")
        return poses[:, :, :3, :].reshape(poses.shape[0], -1).to(self.spec.dtype)

    def sphere_positions(self, q: torch.Tensor,
                         poses: torch.Tensor | None = None) -> torch.Tensor:
        """Sphere centres in the base frame: ``(B, S, 3)`` m, in the order of the spheres."""
        frames = self._frames(self._check(q), poses).view(q.shape[0], -1, 3, 4)
        frames = frames[:, self._sphere_link]  # (B, S, 3, 4)
        return (frames[..., :3] @ self._centers.unsqueeze(-1)).squeeze(-1) + frames[..., 3]

    def _gather_plan(self, links: Sequence[int], points: np.ndarray
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """How :meth:`_points` places ``points (P, 3)``, fixed in the frames of ``links (P,)``:
        coordinate i of point p is Σ_j frame[12 l + 4 i + j] [c, 1]_j, so the rows of the
        flattened frames ``(12 L, B)`` to gather ``(3 P 4,)`` and their weights
        ``(3, P, 4, 1)``."""
        rows = np.zeros((3, len(links), 4), dtype=np.int64)
        weights = np.ones((3, len(links), 4))
        for p, lk in enumerate(links):
            for i in range(3):
                rows[i, p] = 12 * lk + 4 * i + np.arange(4)
                weights[i, p, :3] = points[p]
        return (torch.tensor(rows.reshape(-1), device=self.spec.device),
                self.spec.tensor(weights).unsqueeze(-1))

    @staticmethod
    def _points(frames: torch.Tensor, plan: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Base-frame positions of the points of a :meth:`_gather_plan`, batch last:
        ``(3, P, B)`` m, from the flattened link frames ``(B, 12 L)``."""
        rows, weights = plan
        picked = frames.T.contiguous().index_select(0, rows)  # (3 P 4, B)
        return picked.view(3, -1, 4, frames.shape[0]).mul_(weights).sum(2)

    def _group_centers(self, frames: torch.Tensor) -> torch.Tensor:
        """Group bounding-sphere centres, batch last: ``(3, G, B)`` m."""
        return self._points(frames, self._center_plan)

    def _spheres_of(self, frames: torch.Tensor, b: torch.Tensor,
                    g: torch.Tensor) -> torch.Tensor:
        """Base-frame sphere centres ``(N, m, 3)`` of groups ``g`` ``(N,)`` in configurations
        ``b``, from the flattened link frames ``(B, 12 L)``."""
        links = len(self.kinematics.link_names)
        f = frames.view(-1, 3, 4).index_select(0, b * links + self._group_link.index_select(0, g))
        return torch.baddbmm(f[:, None, :, 3], self._group_points.index_select(0, g),
                             f[..., :3].transpose(1, 2))  # (N, m, 3)

    def _table_hits(self, q: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: a pair answered by a table may touch (True outside a table's range)."""
        hit = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
        for cols, lower, step, shape, strides, cells in self._tables:
            idx = torch.floor((q[:, cols] - lower) / step).long()  # (B, J)
            inside = ((idx >= 0) & (idx < shape)).all(1)
            flat = (idx.clamp(min=0).minimum(shape - 1) * strides).sum(1)
            hit |= cells[flat] | ~inside
        return hit

    def _self_hits(self, frames: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        batch = frames.shape[0]
        hit = torch.zeros(batch, dtype=torch.bool, device=frames.device)
        if self._pair_a.numel() == 0:
            return hit
        d2 = (centers[:, self._pair_a] - centers[:, self._pair_b]).square_().sum(0)  # (P, B)
        p, b = (d2 <= self._pair_r2).nonzero(as_tuple=True)  # candidate group pairs
        if b.numel() == 0:
            return hit
        pa = self._spheres_of(frames, b, self._pair_a[p])
        pb = self._spheres_of(frames, b, self._pair_b[p])
        d2 = sum((u.unsqueeze(2) - v.unsqueeze(1)).square_()
                 for u, v in zip(pa.unbind(-1), pb.unbind(-1)))  # (n, m, m), no size-3 sums
        touch = (d2 <= self._pair_sphere_r2[p]).flatten(1).any(1)
        hit[b[touch]] = True
        return hit

    def _world_hits(self, frames: torch.Tensor, centers: torch.Tensor,
                    world: CollisionWorld) -> torch.Tensor:
        batch = frames.shape[0]
        hit = torch.zeros(batch, dtype=torch.bool, device=frames.device)
        if len(world) == 0 or batch == 0:
            return hit
        k, g, b = self._world_candidates(centers, world)
        if b.numel() == 0:
            return hit
        touch = world.pair_overlaps(self._spheres_of(frames, b, g),
                                    self._group_radii.index_select(0, g), k)
        touch = (touch & self._group_valid.index_select(0, g)).any(1)
        hit[b[touch]] = True
        return hit

    def _world_candidates(self, centers: torch.Tensor, world: CollisionWorld,
                          pad: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(obstacle, group, configuration) triples ``(n,)`` each whose bounding volumes (group
        spheres grown by ``pad``, obstacles' base-frame boxes) meet; groups ``(3, G, B)``."""
        groups = self._world_groups
        reach = world.aabb_half.T.unsqueeze(-1) + (self._world_group_radius + pad)  # (3, K, Gw)
        mid = world.positions.T.unsqueeze(-1)  # (3, K, 1)
        c = centers[:, groups].unsqueeze(1)  # (3, 1, Gw, B)
        near = (c >= (mid - reach).unsqueeze(-1)).logical_and_(c <= (mid + reach).unsqueeze(-1))
        k, gi, b = near.all(0).nonzero(as_tuple=True)
        return k, groups[gi], b

    @torch.no_grad()
    def penetration(self, q: torch.Tensor, world: CollisionWorld, margin: float = 0.0,
                    poses: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Obstacle penetration of the robot's spheres, summed per link, with its gradient.

        cost_b = Σ_s Σ_k relu(margin + r_s − sd_k(x_s)) over the spheres s of every link but the
        base (:meth:`CollisionWorld.penetration`, in closed form); only the (sphere group,
        obstacle) pairs whose bounding volumes meet are evaluated, a few percent of all.

        Returns:
            cost ``(B,)`` m, and the wrench per link l ``(B, L, 6)``: the force
            F_l = Σ_{s on l} ∂cost/∂x_s (``[..., :3]``) and the torque
            T_l = Σ_{s on l} x_s × ∂cost/∂x_s about the base origin (``[..., 3:]``), from which
            the joint gradient follows (the IK refiner's collision penalty).
        """
        q = self._check(q)
        frames = self._frames(q, poses)
        batch, links = q.shape[0], len(self.kinematics.link_names)
        cost = q.new_zeros(batch)
        wrench = q.new_zeros(batch * links, 6)
        if len(world) and batch:
            k, g, b = self._world_candidates(self._group_centers(frames), world, margin)
            if b.numel():
                pos = self._spheres_of(frames, b, g)  # (n, m, 3) sphere centres
                depth, grad = world.pair_penetration(
                    pos, self._group_pen_radii.index_select(0, g), k, margin)
                cost.index_add_(0, b, depth.sum(1))
                per_group = torch.cat([grad.sum(1), torch.cross(pos, grad, dim=-1).sum(1)], -1)
                wrench.index_add_(0, b * links + self._group_link.index_select(0, g), per_group)
        return cost, wrench.view(batch, links, 6)

    def penetration_gradient(self, q: torch.Tensor, world: CollisionWorld, margin: float = 0.0,
                             poses: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`penetration`'s cost ``(B,)`` and its joint gradient ``(B, J)``.

        The gradient is analytic, g_j = a_j · Σ_s (x_s − p_j) × ∂P/∂x_s over the spheres s that
        joint j (axis a_j, origin p_j) moves, from the per-link sums of ∂P/∂x_s and
        x_s × ∂P/∂x_s (the wrench).
        """
        if len(world) == 0:
            return q.new_zeros(q.shape[0]), torch.zeros_like(q)
        kin = self.kinematics
        poses = kin.link_poses(q) if poses is None else poses
        cost, wrench = self.penetration(q, world, margin, poses)
        wrench = self._moves @ wrench  # (B, J, 6): what joint j's subtree feels
        axes, origins = kin.joint_axes(poses)  # (B, J, 3)
        grad = (axes * (wrench[..., 3:] - torch.cross(origins, wrench[..., :3], dim=-1))).sum(-1)
        return cost, grad

    @torch.no_grad()
    def self_collision(self, q: torch.Tensor,
                       poses: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` bool: some pair of non-adjacent links may touch.

        Tested with the spheres or the pair tables; a configuration outside a table's joint
        range counts as colliding.
        """
        q = self._check(q)
        frames = self._frames(q, poses)
        return self._table_hits(q) | self._self_hits(frames, self._group_centers(frames))

    @torch.no_grad()
    def world_collision(self, q: torch.Tensor, world: CollisionWorld,
                        poses: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` bool: some link other than the base touches an obstacle."""
        frames = self._frames(self._check(q), poses)
        return self._world_hits(frames, self._group_centers(frames), world)

    @torch.no_grad()
    def valid(self, q: torch.Tensor, world: CollisionWorld,
              poses: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` bool: within joint limits, no self-collision, no obstacle collision."""
        q = self._check(q)
        frames = self._frames(q, poses)
        centers = self._group_centers(frames)
        return (self.kinematics.within_limits(q) & ~self._table_hits(q)
                & ~self._self_hits(frames, centers) & ~self._world_hits(frames, centers, world))

    def clearance(self, q: torch.Tensor, world: CollisionWorld,
                  poses: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` m: smallest signed distance between the robot's spheres and the obstacles.

        The base link is excluded; negative when penetrating, +inf without obstacles.

        A lower bound of the distance between PyBullet's collision shapes and the obstacles.
        """
        q = self._check(q)
        batch = q.shape[0]
        if len(world) == 0:
            return torch.full((batch,), float("inf"), device=q.device, dtype=q.dtype)
        x = self._points(self._frames(q, poses), self._world_sphere_plan)  # (3, Sw, B)
        radii = self._world_radii.repeat_interleave(batch)
        return world._signed_kn(x.reshape(3, -1).T, radii).view(-1, batch).amin(0)
