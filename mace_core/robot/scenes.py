"""Benchmark scenes: primitive obstacles around the Panda and a region of end-effector targets.

Every pose is in the robot's base frame (origin of ``panda_link0``, z up), lengths in metres.
Obstacle sizes follow ``shape_msgs/SolidPrimitive``: box (x, y, z) full lengths, sphere (radius,),
cylinder (height, radius) with its axis along the local z axis, centred on its position.
The YAML format is the one of ``config/scenes/*.yaml`` (described in ``scenes/README.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import yaml

from ..errors import InvalidRequestError, format_numbers, quote
from ..tensor import TensorSpec

#: Number of size values of each obstacle kind (SolidPrimitive conventions).
OBSTACLE_DIMENSIONS = {"box": 3, "sphere": 1, "cylinder": 2}
#: Largest deviation of R R^T from the identity (and of det R from 1) accepted as a rotation.
ROTATION_TOLERANCE = 1e-5
#: Largest deviation of a quaternion's norm from 1 accepted (it is then normalized).
QUATERNION_TOLERANCE = 1e-3

IDENTITY = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def quaternion_xyzw_to_matrix(quat: Sequence[float]) -> tuple[tuple[float, ...], ...]:
    """Rotation matrix (3x3, row-major nested tuples) of a quaternion given as (x, y, z, w).

    The quaternion is normalized; one whose norm is off 1 by more than QUATERNION_TOLERANCE
    (a zero quaternion included) is rejected. Plain floats, no NumPy: every obstacle of a
    request comes with one (4-7 against 22-25 us with NumPy).

    Raises:
        InvalidRequestError: not 4 finite values, or not a unit quaternion.
    """
    try:
        q = [float(v) for v in quat]
    except (TypeError, ValueError):
        q = []
    if len(q) != 4 or not all(math.isfinite(v) for v in q):
        raise InvalidRequestError(f"quaternion must be 4 finite values (x, y, z, w), got "
                                  f"{format_numbers(quat)}")
    norm = math.sqrt(sum(v * v for v in q))
    if abs(norm - 1.0) > QUATERNION_TOLERANCE:
        raise InvalidRequestError(f"quaternion (x, y, z, w) {format_numbers(q)} is not unit "
                                  f"(norm {norm:.6g})")
    x, y, z, w = (v / norm for v in q)
    return ((1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)),
            (2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)),
            (2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)))


def _finite_vector(values, length: int, what: str) -> tuple[float, ...]:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{what} must be {length} numbers, got "
                                  f"{quote(values)}") from exc
    if arr.shape != (length,):
        raise InvalidRequestError(f"{what} must be {length} numbers, got "
                                  f"{format_numbers(values)}")
    if not np.all(np.isfinite(arr)):
        raise InvalidRequestError(f"{what} must be finite, got {format_numbers(values)}")
    return tuple(float(v) for v in arr)


@dataclass(frozen=True)
class Obstacle:
    """One primitive obstacle, posed in the robot's base frame."""

    name: str  #: identifier, unique within a scene
    kind: str  #: "box", "sphere" or "cylinder"
    size: tuple[float, ...]  #: m; box (x, y, z) full lengths, sphere (r,), cylinder (height, r)
    position: tuple[float, float, float]  #: (3,) m, centre of the primitive in the base frame
    #: (3, 3) row-major rotation base-from-primitive (a cylinder's axis is its local z)
    rotation: tuple[tuple[float, ...], ...] = IDENTITY

    def validate(self) -> None:
        """Raise InvalidRequestError on an unknown kind, bad sizes, NaN/inf or a non-rotation."""
        label = f"obstacle {quote(self.name)}"
        if not isinstance(self.kind, str) or self.kind not in OBSTACLE_DIMENSIONS:
            raise InvalidRequestError(f"{label}: kind must be one of "
                                      f"{tuple(OBSTACLE_DIMENSIONS)}, got {quote(self.kind)}")
        dims = OBSTACLE_DIMENSIONS[self.kind]
        size = _finite_vector(self.size, dims, f"{label}: {self.kind} size")
        if min(size) <= 0.0:
            raise InvalidRequestError(f"{label}: sizes must be > 0, got "
                                      f"{format_numbers(self.size)}")
        _finite_vector(self.position, 3, f"{label}: position")
        try:
            rot = np.asarray(self.rotation, dtype=float)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"{label}: rotation must be 3x3 numbers") from exc
        if rot.shape != (3, 3) or not np.all(np.isfinite(rot)):
            raise InvalidRequestError(f"{label}: rotation must be a finite 3x3 matrix, got "
                                      f"{format_numbers(self.rotation)}")
        if (np.abs(rot @ rot.T - np.eye(3)).max() > ROTATION_TOLERANCE
                or abs(np.linalg.det(rot) - 1.0) > ROTATION_TOLERANCE):
            raise InvalidRequestError(f"{label}: rotation is not orthonormal with det +1")

    @property
    def half_extents(self) -> tuple[float, float, float]:
        """m, half sizes of the box in the primitive's frame that holds it: a box's half
        sizes, a sphere's (R, R, R), a cylinder's (R, R, height / 2)."""
        size = [float(v) for v in self.size]
        if self.kind == "box":
            return (size[0] / 2, size[1] / 2, size[2] / 2)
        if self.kind == "sphere":
            return (size[0],) * 3
        return (size[1], size[1], size[0] / 2)

    @property
    def rotation_matrix(self) -> np.ndarray:
        """(3, 3) rotation base-from-primitive."""
        return np.asarray(self.rotation, dtype=float)


def validate_obstacles(obstacles: Sequence[Obstacle]) -> None:
    """:meth:`Obstacle.validate` on every one of ``obstacles``, batched: the same verdicts, in
    one pass of NumPy over all of them (a request's world is validated where it is built, and
    again by each checker it is written into: one at a time, 20-25 us an obstacle, a third of
    a millisecond for the cabinet's 14). Where any check fails, or a field is not a plain
    sequence of numbers, the obstacles are validated one at a time, so the message is the one
    of :meth:`Obstacle.validate` for the first that fails.

    Raises:
        InvalidRequestError: an obstacle fails :meth:`Obstacle.validate`.
    """
    if not obstacles:
        return
    try:
        ok = _all_valid(obstacles)
    except (TypeError, ValueError):  # a field of another shape or type: one at a time
        ok = False
    if not ok:
        for o in obstacles:
            o.validate()


def _all_valid(obstacles: Sequence[Obstacle]) -> bool:
    """Whether every obstacle passes :meth:`Obstacle.validate` (raises TypeError or ValueError
    where a field is not numbers of the expected shape)."""
    by_kind: dict[str, list[Sequence[float]]] = {}
    for o in obstacles:
        if not isinstance(o.kind, str) or o.kind not in OBSTACLE_DIMENSIONS:
            return False
        by_kind.setdefault(o.kind, []).append(o.size)
    for kind, sizes in by_kind.items():
        size = np.asarray(sizes, dtype=float)
        if (size.shape != (len(sizes), OBSTACLE_DIMENSIONS[kind])
                or not np.isfinite(size).all() or not (size > 0.0).all()):
            return False
    pos = np.asarray([o.position for o in obstacles], dtype=float)
    rot = np.asarray([o.rotation for o in obstacles], dtype=float)
    n = len(obstacles)
    if pos.shape != (n, 3) or rot.shape != (n, 3, 3):
        return False
    if not (np.isfinite(pos).all() and np.isfinite(rot).all()):
        return False
    gram = np.abs(rot @ rot.transpose(0, 2, 1) - np.eye(3)).max()
    return bool(gram <= ROTATION_TOLERANCE
                and np.abs(np.linalg.det(rot) - 1.0).max() <= ROTATION_TOLERANCE)


def padded(obstacle: Obstacle, padding_m: float) -> Obstacle:
    """``obstacle`` grown by ``padding_m`` on every side (box sides, sphere and cylinder radii,
    cylinder height): a configuration clear of it keeps that distance from the original.
    A grown box keeps its sharp corners, so it covers a little more than the padding asks."""
    if padding_m <= 0.0:
        return obstacle
    size = tuple(float(v) for v in obstacle.size)
    if obstacle.kind == "box":
        size = tuple(v + 2.0 * padding_m for v in size)
    elif obstacle.kind == "sphere":
        size = (size[0] + padding_m,)
    else:  # cylinder: (height, radius)
        size = (size[0] + 2.0 * padding_m, size[1] + padding_m)
    return replace(obstacle, size=size)


@dataclass(frozen=True)
class TargetRegion:
    """Axis-aligned box of end-effector target positions, in the base frame."""

    min: tuple[float, float, float]  #: (3,) m, lower corner
    max: tuple[float, float, float]  #: (3,) m, upper corner

    def validate(self) -> None:
        """Raise InvalidRequestError unless both corners are finite and min <= max."""
        lo = _finite_vector(self.min, 3, "targets.min")
        hi = _finite_vector(self.max, 3, "targets.max")
        if any(a > b for a, b in zip(lo, hi)):
            raise InvalidRequestError(f"targets.min {list(lo)} exceeds targets.max {list(hi)}")

    def sample(self, n: int, generator: torch.Generator, spec: TensorSpec) -> torch.Tensor:
        """``n`` positions drawn uniformly in the region: ``(n, 3)`` m, base frame.

        ``generator`` must live on ``spec.device``.
        """
        lo, hi = spec.tensor(self.min), spec.tensor(self.max)
        u = torch.rand(n, 3, generator=generator, device=spec.device, dtype=spec.dtype)
        return lo + u * (hi - lo)


@dataclass(frozen=True)
class Scene:
    """A benchmark scene: obstacles and the region its IK targets are drawn from."""

    name: str  #: scene identifier
    ee_link: str  #: link whose origin must reach the targets (e.g. panda_grasptarget)
    obstacles: tuple[Obstacle, ...]  #: every obstacle, the floor included
    targets: TargetRegion  #: where target positions are drawn

    def validate(self) -> None:
        """Validate every obstacle and the target region; obstacle names must be unique."""
        names = [o.name for o in self.obstacles]
        if len(set(names)) != len(names):
            raise InvalidRequestError(f"scene '{self.name}': obstacle names are not unique")
        validate_obstacles(self.obstacles)
        self.targets.validate()

    def sample_targets(self, n: int, generator: torch.Generator,
                       spec: TensorSpec) -> torch.Tensor:
        """``n`` target positions uniform in the target region: ``(n, 3)`` m, base frame."""
        return self.targets.sample(n, generator, spec)


_SCENE_KEYS = {"name", "ee_link", "obstacles", "targets"}
_OBSTACLE_KEYS = {"name", "type", "center", "size", "quat"}
_TARGET_KEYS = {"min", "max"}


def _check_keys(data, allowed: set[str], required: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise InvalidRequestError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidRequestError(f"{where}: unknown key(s) {unknown}; allowed: "
                                  f"{sorted(allowed)}")
    missing = sorted(required - set(data))
    if missing:
        raise InvalidRequestError(f"{where}: missing key(s) {missing}")


def scene_from_dict(data: dict, source: str = "scene") -> Scene:
    """Build and validate a Scene from the parsed YAML mapping (see module docstring)."""
    _check_keys(data, _SCENE_KEYS, _SCENE_KEYS, source)
    obstacles = []
    if not isinstance(data["obstacles"], list):
        raise InvalidRequestError(f"{source}: obstacles must be a list")
    for i, item in enumerate(data["obstacles"]):
        where = f"{source}: obstacles[{i}]"
        _check_keys(item, _OBSTACLE_KEYS, {"name", "type", "center", "size"}, where)
        kind = item["type"]
        if kind not in OBSTACLE_DIMENSIONS:
            raise InvalidRequestError(f"{where}: type must be one of "
                                      f"{tuple(OBSTACLE_DIMENSIONS)}, got '{kind}'")
        rotation = IDENTITY
        if item.get("quat") is not None:
            rotation = quaternion_xyzw_to_matrix(_finite_vector(item["quat"], 4,
                                                                f"{where}: quat"))
        obstacles.append(Obstacle(
            name=str(item["name"]), kind=kind,
            size=_finite_vector(item["size"], OBSTACLE_DIMENSIONS[kind], f"{where}: size"),
            position=_finite_vector(item["center"], 3, f"{where}: center"),
            rotation=rotation))
    _check_keys(data["targets"], _TARGET_KEYS, _TARGET_KEYS, f"{source}: targets")
    targets = TargetRegion(_finite_vector(data["targets"]["min"], 3, "targets.min"),
                           _finite_vector(data["targets"]["max"], 3, "targets.max"))
    scene = Scene(str(data["name"]), str(data["ee_link"]), tuple(obstacles), targets)
    scene.validate()
    return scene


def load_scene(path: str) -> Scene:
    """Read a scene YAML file (``quat`` is x, y, z, w there).

    Raises:
        InvalidRequestError: unreadable YAML, unknown or missing keys, or invalid values.
    """
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidRequestError(f"cannot read scene file '{path}': {exc}") from exc
    return scene_from_dict(data, source=path)
