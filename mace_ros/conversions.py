"""The one place that knows ROS messages: AdaptIK and CompleteShape requests and responses,
markers, PointCloud2.

Data flows one way: message -> ``*_from_msg`` -> core dataclass -> core -> result ->
``*_to_msg`` -> message. Quaternions are (x, y, z, w) in ROS; they are turned into rotation
matrices here and nowhere else. Every function raises
:class:`mace_core.errors.InvalidRequestError` with a message naming the offending field.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from geometry_msgs.msg import Point, Pose, PoseStamped, Quaternion, Vector3
from sensor_msgs.msg import JointState, PointCloud2, PointField
from shape_msgs.msg import SolidPrimitive
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from mace_core.errors import InvalidRequestError, format_numbers, quote
from mace_core.ik.batch import IKBatchAnswer, default_total_budget
from mace_core.ik.request import IKAdaptResult, IKRequest, IKSolution, IKTimings
from mace_core.robot.kinematics import PANDA_JOINTS, RobotKinematics
from mace_core.robot.rotations import matrix_to_quaternion_xyzw
from mace_core.robot.scenes import Obstacle, quaternion_xyzw_to_matrix
from mace_core.shape.completion import ShapeCompletionRequest, ShapeCompletionResult
from mace_ros.msg import CollisionObject, IKAnswer, IKSolution as IKSolutionMsg
from mace_ros.srv import AdaptIK, AdaptIKBatch, CompleteShape

#: The robot's base frame: every pose of a request must be in it (there is no tf2 here).
BASE_FRAME = "panda_link0"

#: SolidPrimitive type -> (Obstacle kind, number of dimensions).
_PRIMITIVES = {SolidPrimitive.BOX: ("box", 3), SolidPrimitive.SPHERE: ("sphere", 1),
               SolidPrimitive.CYLINDER: ("cylinder", 2)}
_PRIMITIVE_TYPES = {kind: (ptype, dims) for ptype, (kind, dims) in _PRIMITIVES.items()}


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------

def _check_frame(frame_id: str, base_frame: str, what: str) -> None:
    """Accept the base frame or an empty frame id (which means the base frame)."""
    if frame_id not in ("", base_frame):
        raise InvalidRequestError(f"{what}: unknown frame {quote(frame_id)}: targets must be in "
                                  f"{base_frame}")


def _vector(values: Sequence[float], what: str) -> np.ndarray:
    """Finite float64 array of ``values``."""
    arr = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(arr)):
        raise InvalidRequestError(f"{what} must be finite, got {format_numbers(arr)}")
    return arr


def _check_finite(values: list[float], what: str) -> list[float]:
    """``values`` (plain floats) when all are finite."""
    if not all(math.isfinite(v) for v in values):
        raise InvalidRequestError(f"{what} must be finite, got {format_numbers(values)}")
    return values


def _point(p) -> list[float]:
    return [p.x, p.y, p.z]


def _quaternion(q) -> list[float]:
    return [q.x, q.y, q.z, q.w]


def _rotation_from_quaternion(q: Quaternion, what: str) -> tuple[tuple[float, ...], ...]:
    """(3, 3) rotation (row-major tuples) of a ROS quaternion (x, y, z, w); zero, non-unit or
    NaN ones are errors. Plain floats: every obstacle of a request comes with one."""
    xyzw = _quaternion(q)
    if not all(math.isfinite(v) for v in xyzw):
        raise InvalidRequestError(f"{what} quaternion (x, y, z, w) must be finite, got "
                                  f"{format_numbers(xyzw)}")
    if sum(v * v for v in xyzw) < 1e-18:
        raise InvalidRequestError(f"{what} quaternion (x, y, z, w) is zero: give a unit "
                                  f"quaternion")
    try:
        return quaternion_xyzw_to_matrix(xyzw)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"{what}: {exc}") from exc


def _quaternion_msg(rotation: np.ndarray) -> Quaternion:
    x, y, z, w = matrix_to_quaternion_xyzw(np.asarray(rotation, dtype=float))
    return Quaternion(x=float(x), y=float(y), z=float(z), w=float(w))


def _pose_msg(position: Sequence[float], rotation: np.ndarray) -> Pose:
    x, y, z = (float(v) for v in position)
    return Pose(position=Point(x=x, y=y, z=z), orientation=_quaternion_msg(rotation))


# ------------------------------------------------------------------------------------------------
# Obstacles: mace_ros/CollisionObject <-> mace_core.robot.scenes.Obstacle
# ------------------------------------------------------------------------------------------------

def obstacles_from_msgs(objects: Sequence[CollisionObject],
                        base_frame: str = BASE_FRAME) -> list[Obstacle]:
    """One :class:`Obstacle` per primitive, named ``id`` (or ``id/i`` for several primitives)."""
    out = []
    for n, obj in enumerate(objects):
        label = f"obstacle {quote(obj.id)}" if obj.id else f"obstacles[{n}]"
        _check_frame(obj.header.frame_id, base_frame, label)
        if len(obj.primitives) != len(obj.primitive_poses):
            raise InvalidRequestError(
                f"{label}: {len(obj.primitives)} primitives but {len(obj.primitive_poses)} "
                f"primitive_poses (one pose per primitive)")
        for i, (prim, pose) in enumerate(zip(obj.primitives, obj.primitive_poses)):
            name = obj.id or f"obstacles[{n}]"
            if len(obj.primitives) > 1:
                name = f"{name}/{i}"
            where = f"{label} primitive {i}"
            if prim.type not in _PRIMITIVES:
                raise InvalidRequestError(f"{where}: primitive type {prim.type} not supported "
                                          f"(box, sphere, cylinder)")
            kind, dims = _PRIMITIVES[prim.type]
            size = [float(v) for v in prim.dimensions]
            if len(size) != dims:
                raise InvalidRequestError(
                    f"{where}: a {kind} needs {dims} dimensions, got {len(size)}")
            _check_finite(size, f"{where}: {kind} dimensions")
            if not all(v > 0.0 for v in size):
                raise InvalidRequestError(
                    f"{where}: {kind} dimensions must be > 0, got {format_numbers(size)}")
            position = _check_finite(_point(pose.position), f"{where}: position")
            rotation = _rotation_from_quaternion(pose.orientation, f"{where}: orientation")
            # every field is checked above: Obstacle.validate() would only repeat it
            out.append(Obstacle(name=name, kind=kind, size=tuple(size),
                                position=tuple(position), rotation=rotation))
    return out


def obstacles_to_msgs(obstacles: Sequence[Obstacle],
                      base_frame: str = BASE_FRAME) -> list[CollisionObject]:
    """One single-primitive :class:`CollisionObject` per obstacle, in ``base_frame``."""
    out = []
    for obstacle in obstacles:
        ptype, _ = _PRIMITIVE_TYPES[obstacle.kind]
        out.append(CollisionObject(
            header=Header(frame_id=base_frame), id=obstacle.name,
            primitives=[SolidPrimitive(type=ptype, dimensions=[float(s) for s in obstacle.size])],
            primitive_poses=[_pose_msg(obstacle.position, obstacle.rotation_matrix)]))
    return out


# ------------------------------------------------------------------------------------------------
# AdaptIK request <-> IKRequest
# ------------------------------------------------------------------------------------------------

def ik_request_from_msg(req: AdaptIK.Request, base_frame: str = BASE_FRAME) -> IKRequest:
    """Convert an AdaptIK request; 0 (and -1 for iterations and seed) takes the node's default.

    ``num_solutions`` and ``time_budget`` are passed on as given: the core rejects 0.
    """
    position, rotation = _target_from_msg(req.target, req.use_orientation, base_frame)
    if req.iterations < -1:
        raise InvalidRequestError(f"iterations must be -1 (the node's default) or >= 0, got "
                                  f"{req.iterations}")
    if req.seed < -1:
        raise InvalidRequestError(f"seed must be -1 (random) or >= 0, got {req.seed}")
    return IKRequest(
        position=position,
        obstacles=obstacles_from_msgs(req.obstacles, base_frame),
        rotation=rotation,
        orientation_tolerance=float(req.orientation_tolerance) if req.use_orientation else 0.0,
        num_solutions=int(req.num_solutions),
        time_budget_s=float(req.time_budget),
        iterations=None if req.iterations == -1 else int(req.iterations),
        refinement=req.refinement or None,
        objective=req.objective or None,
        num_samples=int(req.num_samples) or None,
        quantile=float(req.quantile) or None,
        gradient_steps=int(req.gradient_steps) or None,
        learning_rate=float(req.learning_rate) or None,
        seed=None if req.seed == -1 else int(req.seed),
        seed_state=seed_state_from_msg(req.seed_state),
        ik_link=req.ik_link_name)


def _target_from_msg(target: PoseStamped, use_orientation: bool, base_frame: str,
                     what: str = "target") -> tuple[np.ndarray, np.ndarray | None]:
    """A target's ``(3,)`` position and ``(3, 3)`` rotation (None without ``use_orientation``),
    in the base frame."""
    _check_frame(target.header.frame_id, base_frame, what)
    position = np.asarray(_point(target.pose.position), dtype=float)
    if not np.all(np.isfinite(position)):
        raise InvalidRequestError(f"{what} position must be finite, got "
                                  f"{format_numbers(position)}")
    rotation = None
    if use_orientation:
        rotation = np.asarray(_rotation_from_quaternion(target.pose.orientation,
                                                        f"{what} orientation"))
    return position, rotation


def ik_batch_requests_from_msg(req: AdaptIKBatch.Request, base_frame: str = BASE_FRAME,
                               max_total_s: float = math.inf
                               ) -> tuple[list[IKRequest | str], float]:
    """An AdaptIKBatch request as one request per target (the shared fields in each, the
    per-target ``time_budget``; target ``i`` seeded with ``seed + i``), or for a target
    malformed here the reason, and the whole batch's budget (s): ``total_time_budget``, or
    where it is 0 the per-target budget times the targets, at most ``max_total_s``. Raises
    InvalidRequestError for what all targets share (obstacles, seed)."""
    if req.seed < -1:
        raise InvalidRequestError(f"seed must be -1 (random) or >= 0, got {req.seed}")
    if not 0.0 < req.time_budget <= max_total_s:  # NaN fails too
        raise InvalidRequestError(f"time_budget (each target's) must be in (0, "
                                  f"{max_total_s:g}] s, got {req.time_budget:.6g}")
    shared = dict(obstacles=obstacles_from_msgs(req.obstacles, base_frame),
                  orientation_tolerance=(float(req.orientation_tolerance)
                                         if req.use_orientation else 0.0),
                  num_solutions=int(req.num_solutions), time_budget_s=float(req.time_budget),
                  seed_state=seed_state_from_msg(req.seed_state), ik_link=req.ik_link_name)
    requests: list[IKRequest | str] = []
    for i, target in enumerate(req.targets):
        try:
            position, rotation = _target_from_msg(target, req.use_orientation, base_frame,
                                                  f"target {i}")
        except InvalidRequestError as exc:
            requests.append(str(exc))
            continue
        requests.append(IKRequest(position=position, rotation=rotation,
                                  seed=None if req.seed == -1 else int(req.seed) + i, **shared))
    total = (float(req.total_time_budget)
             or default_total_budget(len(requests), float(req.time_budget), max_total_s))
    return requests, total


def ik_batch_request_to_msg(targets: np.ndarray, obstacles: Sequence[Obstacle] = (),
                            num_solutions: int = 8, time_budget_s: float = 1.0,
                            total_time_budget_s: float = 0.0,
                            orientation_tolerance: float = 1e-3, ik_link: str = "",
                            seed: int | None = None, seed_state: np.ndarray | None = None,
                            base_frame: str = BASE_FRAME) -> AdaptIKBatch.Request:
    """Build an AdaptIKBatch request (the client's side): ``targets`` ``(N, 3)`` positions, or
    ``(N, 7)`` poses (x, y, z, qx, qy, qz, qw) with ``orientation_tolerance``; ``time_budget_s``
    per target, ``total_time_budget_s`` for the batch (0: the node's default)."""
    targets = np.asarray(targets, dtype=float)
    if targets.ndim != 2 or targets.shape[1] not in (3, 7):
        raise ValueError(f"targets must be (N, 3) positions or (N, 7) poses, got "
                         f"{targets.shape}")
    msg = AdaptIKBatch.Request()
    msg.use_orientation = targets.shape[1] == 7
    for row in targets.tolist():
        target = PoseStamped(header=Header(frame_id=base_frame))
        target.pose.position = Point(x=row[0], y=row[1], z=row[2])
        if msg.use_orientation:
            target.pose.orientation = Quaternion(x=row[3], y=row[4], z=row[5], w=row[6])
        msg.targets.append(target)
    msg.orientation_tolerance = float(orientation_tolerance) if msg.use_orientation else 0.0
    msg.ik_link_name = ik_link
    msg.obstacles = obstacles_to_msgs(obstacles, base_frame)
    msg.num_solutions, msg.time_budget = int(num_solutions), float(time_budget_s)
    msg.total_time_budget = float(total_time_budget_s)
    msg.seed = -1 if seed is None else int(seed)
    if seed_state is not None:
        msg.seed_state = seed_state_to_msg(seed_state)
    return msg


def ik_batch_answers_to_msg(answers: Sequence[IKBatchAnswer],
                            response: AdaptIKBatch.Response) -> AdaptIKBatch.Response:
    """Fill ``response`` with one IKAnswer per target (in order) and return it: ``success``
    when some target has a solution, ``message`` how many."""
    response.answers = [
        IKAnswer(success=a.success, message=a.result.message if a.result else a.error,
                 solutions=_solution_msgs(a.result) if a.result else [],
                 total_time=float(a.result.timings.total) if a.result else 0.0)
        for a in answers]
    found = sum(a.success for a in answers)
    refused = sum(a.result is None for a in answers)
    response.success = found > 0
    response.message = (f"{found} of {len(answers)} targets have a solution"
                        + (f"; {refused} refused (see their messages)" if refused else ""))
    return response


def seed_state_to_msg(q) -> JointState:
    """A seed state ``(7,)`` (rad) as the JointState a request carries, the arm's joints by
    name."""
    return JointState(name=list(PANDA_JOINTS), position=[float(v) for v in q])


def seed_state_from_msg(state: JointState,
                        joint_names: Sequence[str] = PANDA_JOINTS) -> np.ndarray | None:
    """The arm's ``(7,)`` joint positions in ``joint_names``' order from a JointState that
    names them (any order; other joints, the fingers, ignored) or holds seven positions and
    no names; None when it holds no position. The core checks their values."""
    names, positions = list(state.name), [float(v) for v in state.position]
    if not positions:
        return None
    if not names:
        if len(positions) != len(joint_names):
            raise InvalidRequestError(
                f"seed_state without joint names must hold {len(joint_names)} positions "
                f"({', '.join(joint_names)}), got {len(positions)}")
        return np.asarray(positions)
    if len(names) != len(positions):
        raise InvalidRequestError(f"seed_state has {len(names)} names and {len(positions)} "
                                  f"positions")
    by_name = dict(zip(names, positions))
    missing = [n for n in joint_names if n not in by_name]
    if missing:
        raise InvalidRequestError(f"seed_state lacks {', '.join(missing)} (it names "
                                  f"{', '.join(quote(n) for n in names[:10])})")
    return np.asarray([by_name[n] for n in joint_names])


def ik_request_to_msg(request: IKRequest, base_frame: str = BASE_FRAME) -> AdaptIK.Request:
    """Build an AdaptIK request (the client's side); ``None`` overrides become 0 / -1 / "".

    Raises:
        ValueError: ``num_solutions`` or ``time_budget_s`` is None (the service needs both).
    """
    if request.num_solutions is None or request.time_budget_s is None:
        raise ValueError("an AdaptIK request needs num_solutions and time_budget_s")
    msg = AdaptIK.Request()
    msg.target = PoseStamped(header=Header(frame_id=base_frame))
    x, y, z = (float(v) for v in request.position)
    msg.target.pose.position = Point(x=x, y=y, z=z)
    if request.rotation is not None:
        msg.target.pose.orientation = _quaternion_msg(request.rotation)
        msg.use_orientation = True
        msg.orientation_tolerance = float(request.orientation_tolerance)
    msg.obstacles = obstacles_to_msgs(request.obstacles, base_frame)
    msg.num_solutions = int(request.num_solutions)
    msg.time_budget = float(request.time_budget_s)
    msg.iterations = -1 if request.iterations is None else int(request.iterations)
    msg.refinement = request.refinement or ""
    msg.objective = request.objective or ""
    msg.num_samples = int(request.num_samples or 0)
    msg.quantile = float(request.quantile or 0.0)
    msg.gradient_steps = int(request.gradient_steps or 0)
    msg.learning_rate = float(request.learning_rate or 0.0)
    msg.seed = -1 if request.seed is None else int(request.seed)
    if request.seed_state is not None:
        msg.seed_state = seed_state_to_msg(request.seed_state)
    msg.ik_link_name = request.ik_link
    return msg


# ------------------------------------------------------------------------------------------------
# IKAdaptResult <-> AdaptIK response
# ------------------------------------------------------------------------------------------------

def ik_result_to_msg(result: IKAdaptResult, response: AdaptIK.Response) -> AdaptIK.Response:
    """Fill ``response`` from a core result (best solution first) and return it."""
    response.success = result.success
    response.message = result.message
    response.solutions = _solution_msgs(result)
    response.valid_fraction_prior = float(result.valid_fraction_prior)
    response.valid_fraction_adapted = float(result.valid_fraction_adapted)
    response.iterations_run = int(result.iterations_run)
    response.sampling_time = float(result.timings.sampling)
    response.adaptation_time = float(result.timings.adaptation)
    response.refinement_time = float(result.timings.refinement)
    response.total_time = float(result.timings.total)
    return response


def _solution_msgs(result: IKAdaptResult) -> list[IKSolutionMsg]:
    return [IKSolutionMsg(joint_names=list(result.joint_names),
                          positions=[float(v) for v in sol.q], score=float(sol.score),
                          position_error=float(sol.position_error),
                          orientation_error=float(sol.orientation_error),
                          collision_free=bool(sol.collision_free),
                          clearance=float(sol.clearance))
            for sol in result.solutions]


def ik_result_from_msg(response: AdaptIK.Response) -> IKAdaptResult:
    """The client's view of a response as a core result.

    The message carries no K asked for (the number of solutions is taken).
    """
    names = list(response.solutions[0].joint_names) if response.solutions else []
    solutions = [IKSolution(q=np.asarray(s.positions, dtype=float), score=s.score,
                            position_error=s.position_error,
                            orientation_error=s.orientation_error,
                            collision_free=s.collision_free, clearance=s.clearance)
                 for s in response.solutions]
    timings = IKTimings(sampling=response.sampling_time, adaptation=response.adaptation_time,
                        refinement=response.refinement_time, total=response.total_time)
    found = sum(s.collision_free for s in solutions) if response.success else 0
    return IKAdaptResult(solutions=solutions, joint_names=names, num_requested=len(solutions),
                         num_found=found, valid_fraction_prior=response.valid_fraction_prior,
                         valid_fraction_adapted=response.valid_fraction_adapted,
                         iterations_run=response.iterations_run, timings=timings,
                         message=response.message)


# ------------------------------------------------------------------------------------------------
# Markers
# ------------------------------------------------------------------------------------------------

def arm_points(kin: RobotKinematics, q: np.ndarray) -> np.ndarray:
    """Origins of the links from the base to the end effector: ``(B, 7)`` -> ``(B, C, 3)`` m.

    The chain follows the URDF tree (fingers left out), so a polyline through these points draws
    the arm.
    """
    chain, k = [], kin.ee_index
    while k >= 0:
        chain.append(k)
        k = kin.parent_index[k]
    q = np.asarray(q, dtype=float).reshape(-1, kin.num_joints)
    poses = kin.link_poses(kin.spec.tensor(q))
    return poses[:, chain[::-1], :3, 3].detach().cpu().double().numpy()


def rank_color(rank: int, count: int, collision_free: bool = True) -> tuple[float, float, float]:
    """RGB of solution ``rank`` (0 best) among ``count``: green to blue; red on collision."""
    if not collision_free:
        return (0.9, 0.1, 0.1)
    t = rank / max(count - 1, 1)
    return (0.1, 0.8 * (1.0 - t) + 0.2 * t, 0.2 * (1.0 - t) + 0.9 * t)


def markers_from_ik_result(result: IKAdaptResult, kin: RobotKinematics, header: Header,
                           target: Sequence[float] | None = None,
                           line_width: float = 0.015) -> MarkerArray:
    """A DELETEALL, then one LINE_STRIP per solution (colored by rank) and the target sphere."""
    markers = [Marker(header=header, action=Marker.DELETEALL)]
    if result.solutions:
        arms = arm_points(kin, np.stack([s.q for s in result.solutions]))
        for rank, (sol, pts) in enumerate(zip(result.solutions, arms)):
            r, g, b = rank_color(rank, len(result.solutions), sol.collision_free)
            markers.append(Marker(
                header=header, ns="ik_solutions", id=rank, type=Marker.LINE_STRIP,
                action=Marker.ADD, points=[Point(x=x, y=y, z=z) for x, y, z in pts.tolist()],
                color=ColorRGBA(r=r, g=g, b=b, a=1.0 if rank == 0 else 0.6)))
            markers[-1].pose.orientation.w = 1.0
            markers[-1].scale.x = line_width
    if target is not None:
        x, y, z = (float(v) for v in target)
        sphere = Marker(header=header, ns="ik_target", id=0, type=Marker.SPHERE,
                        action=Marker.ADD, color=ColorRGBA(r=1.0, g=0.6, b=0.0, a=1.0))
        sphere.pose.position = Point(x=x, y=y, z=z)
        sphere.pose.orientation.w = 1.0
        sphere.scale.x = sphere.scale.y = sphere.scale.z = 0.03
        markers.append(sphere)
    return MarkerArray(markers=markers)


# ------------------------------------------------------------------------------------------------
# MoveIt /compute_ik (moveit_msgs/srv/GetPositionIK; the messages are passed in, not imported)
# ------------------------------------------------------------------------------------------------

def fill_compute_ik_request(req, seed: np.ndarray, joint_names: Sequence[str],
                            position: Sequence[float], rotation: np.ndarray, group: str,
                            ik_link: str, timeout_s: float, base_frame: str = BASE_FRAME):
    """Fill a ``GetPositionIK.Request`` seeded from ``seed (7,)``; collisions left to MACE."""
    ik = req.ik_request
    ik.group_name = group
    ik.robot_state.joint_state.name = list(joint_names)
    ik.robot_state.joint_state.position = [float(v) for v in seed]
    ik.avoid_collisions = False
    ik.ik_link_name = ik_link
    ik.pose_stamped.header.frame_id = base_frame
    ik.pose_stamped.pose = _pose_msg(position, rotation)
    ik.timeout.sec = int(timeout_s)
    ik.timeout.nanosec = int(round((timeout_s - int(timeout_s)) * 1e9))
    return req


def joints_from_compute_ik(response, joint_names: Sequence[str]) -> np.ndarray | None:
    """``(7,)`` solution of a ``GetPositionIK.Response`` in ``joint_names`` order, or None."""
    if response is None or response.error_code.val != 1:  # MoveItErrorCodes.SUCCESS
        return None
    state = response.solution.joint_state
    index = {name: k for k, name in enumerate(state.name)}
    if any(name not in index for name in joint_names):
        return None
    return np.asarray([state.position[index[name]] for name in joint_names], dtype=float)


# ------------------------------------------------------------------------------------------------
# PointCloud2 (x, y, z as float32)
# ------------------------------------------------------------------------------------------------

_XYZ = ("x", "y", "z")


def points_from_cloud(msg: PointCloud2, skip_nans: bool = True) -> np.ndarray:
    """The x, y, z fields of a cloud as a ``(P, 3)`` float64 array (other fields ignored).

    Handles padding (point_step larger than 12), row padding (row_step), organized clouds
    (height > 1) and big-endian data. Points with a NaN or inf coordinate are dropped when
    ``skip_nans``.

    Raises:
        InvalidRequestError: a missing or non-float32 x/y/z field, or sizes that disagree.
    """
    fields = {f.name: f for f in msg.fields}
    missing = [n for n in _XYZ if n not in fields]
    if missing:
        raise InvalidRequestError(f"point cloud has no field(s) {missing} (fields: "
                                  f"{quote(sorted(fields))}); x, y, z float32 are required")
    for name in _XYZ:
        f = fields[name]
        if f.datatype != PointField.FLOAT32 or f.count > 1:
            raise InvalidRequestError(f"point cloud field '{name}' must be one FLOAT32 "
                                      f"(datatype 7, count 1), got datatype {f.datatype} "
                                      f"count {f.count}")
        if f.offset + 4 > msg.point_step:
            raise InvalidRequestError(f"point cloud field '{name}' at offset {f.offset} does not "
                                      f"fit in point_step {msg.point_step}")
    width, height, step, row = msg.width, msg.height, msg.point_step, msg.row_step
    if row < width * step:
        raise InvalidRequestError(f"point cloud row_step {row} is smaller than width * "
                                  f"point_step = {width} * {step}")
    if len(msg.data) != row * height:
        raise InvalidRequestError(f"point cloud data has {len(msg.data)} bytes, expected "
                                  f"row_step * height = {row} * {height}")
    if width * height == 0:
        return np.zeros((0, 3))
    order = ">" if msg.is_bigendian else "<"
    dtype = np.dtype({"names": list(_XYZ), "formats": [order + "f4"] * 3,
                      "offsets": [fields[n].offset for n in _XYZ], "itemsize": step})
    raw = np.frombuffer(msg.data, dtype=np.uint8).reshape(height, row)[:, :width * step]
    records = np.frombuffer(np.ascontiguousarray(raw).tobytes(), dtype=dtype)
    points = np.stack([records[n].astype(np.float64) for n in _XYZ], axis=-1)
    if skip_nans:
        points = points[np.isfinite(points).all(axis=1)]
    return points


def cloud_from_points(points: np.ndarray, header: Header) -> PointCloud2:
    """An unorganized little-endian cloud with x, y, z float32 fields from ``(P, 3)`` points."""
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise InvalidRequestError(f"points must be (P, 3), got {pts.shape}")
    data = pts.astype("<f4").tobytes()
    return PointCloud2(
        header=header, height=1, width=pts.shape[0],
        fields=[PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                for i, n in enumerate(_XYZ)],
        is_bigendian=False, point_step=12, row_step=12 * pts.shape[0], data=data,
        is_dense=bool(np.isfinite(pts).all()))


# ------------------------------------------------------------------------------------------------
# CompleteShape request <-> ShapeCompletionRequest, ShapeCompletionResult <-> response
# ------------------------------------------------------------------------------------------------

def _cloud_given(cloud: PointCloud2) -> bool:
    """Whether the request carries a cloud at all (a default PointCloud2 means "no cloud")."""
    return bool(cloud.fields) or len(cloud.data) > 0 or cloud.width * cloud.height > 0


def shape_request_from_msg(req: CompleteShape.Request) -> ShapeCompletionRequest:
    """Convert a CompleteShape request: exactly one of a cloud or contacts with directions.

    Coordinates pass through unchanged: the cloud (in ``cloud.header.frame_id``) or the contacts
    (in ``contacts_frame``) must already be in the prior's frame and units (the core checks the
    rest: prior name, K, budget, finite and non-zero vectors); with ``infer_placement`` the
    cloud (and viewpoint), or the contacts, their directions and the grasp centre, are moved
    into the frame of ``support_pose`` and the core infers where the object stands there
    (frame "support"). -1 for iterations and seed, and 0 for
    finger_radius, take the node's default.

    Raises:
        InvalidRequestError: both or neither observation, an empty or malformed cloud, a point
            with a NaN or inf coordinate, contacts and directions of different lengths, or
            iterations / seed below -1.
    """
    has_cloud = _cloud_given(req.cloud)
    has_contacts = bool(req.contact_points) or bool(req.contact_directions)
    if has_cloud and has_contacts:
        raise InvalidRequestError("give exactly one observation: a cloud or contact_points with "
                                  "contact_directions, not both")
    if not has_cloud and not has_contacts:
        raise InvalidRequestError("no observation: the cloud is empty and there are no "
                                  "contact_points; give exactly one of them")
    if req.iterations < -1:
        raise InvalidRequestError(f"iterations must be -1 (the node's default) or >= 0, got "
                                  f"{req.iterations}")
    if req.seed < -1:
        raise InvalidRequestError(f"seed must be -1 (random) or >= 0, got {req.seed}")
    common = dict(prior=req.prior, num_completions=int(req.num_completions),
                  time_budget_s=float(req.time_budget),
                  iterations=None if req.iterations == -1 else int(req.iterations),
                  seed=None if req.seed == -1 else int(req.seed))
    if has_cloud:
        try:
            points = points_from_cloud(req.cloud, skip_nans=False)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"cloud: {exc}") from exc
        if points.shape[0] == 0:
            raise InvalidRequestError("cloud is empty (width * height = 0): send at least one "
                                      "point, or contacts instead")
        bad = int((~np.isfinite(points).all(axis=1)).sum())
        if bad:
            raise InvalidRequestError(f"cloud has {bad} of {points.shape[0]} points with a NaN or "
                                      f"inf coordinate: remove them before sending")
        viewpoint = None
        if req.has_viewpoint:
            viewpoint = _vector(_point(req.viewpoint), "viewpoint")
        support = support_transform(req)
        if support is not None:  # into the support frame, where the core infers the placement
            points = _transformed(points, np.linalg.inv(support))
            if viewpoint is not None:
                viewpoint = _transformed(np.asarray(viewpoint)[None], np.linalg.inv(support))[0]
            common["frame"] = "support"
        return ShapeCompletionRequest(points=points, viewpoint=viewpoint, **common)
    if req.has_viewpoint:
        raise InvalidRequestError("has_viewpoint is set but the observation is contacts: the "
                                  "viewpoint belongs to a cloud")
    if len(req.contact_points) != len(req.contact_directions):
        raise InvalidRequestError(
            f"{len(req.contact_points)} contact_points but {len(req.contact_directions)} "
            f"contact_directions: give one direction per contact")
    contacts = np.asarray(_vector([_point(p) for p in req.contact_points], "contact_points"))
    directions = np.asarray(_vector([_point(d) for d in req.contact_directions],
                                    "contact_directions"))
    center = np.asarray(_vector(_point(req.grasp_center), "grasp_center"))
    support = support_transform(req)
    if support is not None:  # into the support frame (directions turn, points move too)
        inverse = np.linalg.inv(support)
        contacts, center = _transformed(contacts, inverse), _transformed(center[None], inverse)[0]
        directions = directions.reshape(-1, 3) @ inverse[:3, :3].T
        common["frame"] = "support"
    radius = float(req.finger_radius)
    return ShapeCompletionRequest(contacts=contacts, directions=directions, grasp_center=center,
                                  finger_radius=None if radius == 0.0 else radius, **common)


def support_transform(req: CompleteShape.Request) -> np.ndarray | None:
    """``(4, 4)`` pose of the support surface in the cloud's frame with ``infer_placement``
    (identity for an all-zero pose), else None.

    Raises:
        InvalidRequestError: a NaN, inf or non-unit (or zero with a position) quaternion.
    """
    if not req.infer_placement:
        return None
    pose = req.support_pose
    position = _vector(_point(pose.position), "support_pose position")
    q = _quaternion(pose.orientation)
    out = np.eye(4)
    if np.all(np.asarray(q) == 0.0) and np.all(np.asarray(position) == 0.0):
        return out  # left unset: the cloud's frame is the support frame
    out[:3, :3] = _rotation_from_quaternion(pose.orientation, "support_pose orientation")
    out[:3, 3] = position
    return out


def pose_msg(pose: np.ndarray) -> Pose:
    """A ``geometry_msgs/Pose`` of a ``(4, 4)`` homogeneous pose."""
    pose = np.asarray(pose, dtype=float)
    return _pose_msg(pose[:3, 3], pose[:3, :3])


def _transformed(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """``(P, 3)`` points moved by the ``(4, 4)`` pose."""
    return np.asarray(points, dtype=float) @ pose[:3, :3].T + pose[:3, 3]


def shape_request_header(req: CompleteShape.Request) -> Header:
    """Header of the answer's clouds: the observation's frame (the cloud's header, stamp
    included, or ``contacts_frame``)."""
    if _cloud_given(req.cloud):
        return Header(frame_id=req.cloud.header.frame_id, stamp=req.cloud.header.stamp)
    return Header(frame_id=req.contacts_frame)


def shape_request_to_msg(request: ShapeCompletionRequest,
                         frame_id: str = "") -> CompleteShape.Request:
    """Build a CompleteShape request (the client's side); ``None`` fields become -1 / 0.

    ``frame_id`` is the frame of the points or contacts (the prior's frame, see
    ``models/shape_registry.yaml``).
    """
    msg = CompleteShape.Request()
    if request.points is not None:
        msg.cloud = cloud_from_points(_as_numpy(request.points), Header(frame_id=frame_id))
        if request.viewpoint is not None:
            x, y, z = (float(v) for v in _as_numpy(request.viewpoint).reshape(3))
            msg.has_viewpoint, msg.viewpoint = True, Point(x=x, y=y, z=z)
    if request.contacts is not None or request.directions is not None:
        msg.contacts_frame = frame_id
        msg.contact_points = [Point(x=float(x), y=float(y), z=float(z))
                              for x, y, z in _as_numpy(request.contacts).reshape(-1, 3)]
        msg.contact_directions = [Vector3(x=float(x), y=float(y), z=float(z))
                                  for x, y, z in _as_numpy(request.directions).reshape(-1, 3)]
        msg.finger_radius = float(request.finger_radius or 0.0)
        if request.grasp_center is not None:
            x, y, z = (float(v) for v in _as_numpy(request.grasp_center).reshape(3))
            msg.grasp_center = Point(x=x, y=y, z=z)
    msg.prior = request.prior
    msg.num_completions = int(request.num_completions)
    msg.time_budget = float(request.time_budget_s)
    msg.iterations = -1 if request.iterations is None else int(request.iterations)
    msg.seed = -1 if request.seed is None else int(request.seed)
    msg.infer_placement = request.frame == "support"  # the cloud's frame is the support frame
    return msg


def _as_numpy(values) -> np.ndarray:
    """A float64 array of a tensor or array-like (None: an empty ``(0, 3)``)."""
    if values is None:
        return np.zeros((0, 3))
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=float)


def shape_result_message(result: ShapeCompletionResult) -> str:
    """One line on a result: K, best score, iterations, time, then the core's notes."""
    k = int(result.scores.shape[0])
    best = f", best S = {float(result.scores[0]):.3f}" if k else ""
    text = (f"{k} completions{best}, {result.iterations_run} MACE iterations in "
            f"{result.total_time_s:.2f} s")
    return "; ".join([text, *result.notes])


def shape_result_to_msg(result: ShapeCompletionResult, header: Header,
                        response: CompleteShape.Response,
                        support: np.ndarray | None = None) -> CompleteShape.Response:
    """Fill ``response`` from a core result (best first), each completion a cloud in ``header``'s
    frame, and return it; with ``support`` (the ``(4, 4)`` support pose of the request,
    :func:`support_transform`) the completions and their placements are moved from the support
    frame into the cloud's."""
    clouds = _as_numpy(result.completions)
    if support is not None and clouds.size:
        clouds = clouds @ support[:3, :3].T + support[:3, 3]
    if support is not None and result.placements is not None:
        placed = _as_numpy(result.placements).reshape(-1, 3)
        spots = np.concatenate([placed[:, :2], np.zeros((len(placed), 1))], axis=1)
        response.placements = [_pose_msg(p, support[:3, :3])
                               for p in _transformed(spots, support)]
        response.scales = [float(v) for v in placed[:, 2]]
    response.success = clouds.shape[0] > 0
    response.message = shape_result_message(result)
    response.completions = [cloud_from_points(c, header) for c in clouds]
    response.scores = [float(s) for s in _as_numpy(result.scores).reshape(-1)]
    response.iterations_run = int(result.iterations_run)
    response.sampling_time = float(result.sampling_time_s)
    response.adaptation_time = float(result.adaptation_time_s)
    response.total_time = float(result.total_time_s)
    return response


def shape_result_from_msg(response: CompleteShape.Response) -> ShapeCompletionResult:
    """The client's view of a response: completions ``(K, P, 3)`` and scores ``(K,)`` as float64
    tensors. The message carries neither the deadline flag (False here) nor the notes (the
    message as the only note)."""
    clouds = [points_from_cloud(c) for c in response.completions]
    completions = (torch.as_tensor(np.stack(clouds)) if clouds
                   else torch.zeros(0, 0, 3, dtype=torch.float64))
    placements = None
    if len(response.placements):
        placements = torch.as_tensor([[p.position.x, p.position.y, s] for p, s in
                                      zip(response.placements, response.scales)],
                                     dtype=torch.float64)
    return ShapeCompletionResult(
        completions=completions, placements=placements,
        scores=torch.as_tensor(list(response.scores), dtype=torch.float64),
        iterations_run=response.iterations_run, sampling_time_s=response.sampling_time,
        adaptation_time_s=response.adaptation_time, total_time_s=response.total_time,
        stopped_by_deadline=False, notes=[response.message] if response.message else [])


__all__ = [
    "BASE_FRAME", "arm_points", "cloud_from_points", "fill_compute_ik_request",
    "ik_request_from_msg", "ik_request_to_msg", "ik_result_from_msg", "ik_result_to_msg",
    "joints_from_compute_ik", "markers_from_ik_result", "obstacles_from_msgs",
    "obstacles_to_msgs", "points_from_cloud", "pose_msg", "rank_color", "shape_request_from_msg",
    "shape_request_header", "shape_request_to_msg", "shape_result_from_msg",
    "shape_result_message", "shape_result_to_msg", "support_transform",
]
