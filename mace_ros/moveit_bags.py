"""MoveIt's own IK calls in a bag: ``/compute_ik`` with the planning scene it was asked in.

A MoveIt pipeline recorded with ``ros2 bag record -s mcap /compute_ik/_service_event
/monitored_planning_scene`` (move_group's ``/compute_ik`` with service introspection on) holds
``moveit_msgs/srv/GetPositionIK_Event`` messages and ``moveit_msgs/msg/PlanningScene`` ones.
They are decoded with the definitions the bag stores (``rosbags``: no ``moveit_msgs`` needed at
run time), and every field is read by name, so a bag of any MoveIt 2 release reads alike.

- **Scene.** ``/monitored_planning_scene`` messages apply in bag order: a full scene
  (``is_diff`` false) replaces the world, a diff applies each collision object's
  ``operation`` (ADD replaces the object, REMOVE drops it, or every object when its id is
  empty, APPEND adds primitives, MOVE re-poses it). A request is asked in the world as it stood
  when the request was recorded. An object's primitives are posed by ``pose`` (MoveIt 2) then
  ``primitive_poses``.
- **Not supported, and said so per request** (``MoveItIKCall.unsupported``): meshes, planes,
  cones and prisms (left out of the scene), frames other than the robot's base (``world`` and
  an empty frame count as the base: the Panda's MoveIt config fixes one to the other), target
  links not rigidly attached to the flange (the request is not replayed).
- **Target.** ``ik_request.pose_stamped`` for ``ik_link_name`` (empty: ``panda_link8``, the
  ``panda_arm`` group's tip), turned into the pose of the service's end effector
  (``panda_grasptarget``) through the URDF's fixed joints: a full-pose request. Without
  ``avoid_collisions`` the scene is left out.
- **MoveIt's answer.** The response's ``solution.joint_state`` when ``error_code.val`` is
  SUCCESS (1); its latency from the events' stamps, client side (request sent to response
  received) where recorded, else server side.

:func:`write_moveit_style_bag` writes such a bag (the fields read here, under MoveIt's type
names) from core requests: the tests' bags, and ``mace-bench record --as-moveit``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore, get_types_from_idl

from mace_core.errors import InvalidRequestError
from mace_core.ik.request import IKRequest
from mace_core.robot.kinematics import PANDA_JOINTS, RobotKinematics
from mace_core.robot.rotations import matrix_to_quaternion_xyzw
from mace_core.robot.scenes import Obstacle, quaternion_xyzw_to_matrix
from mace_ros.bags import (REQUEST_RECEIVED, REQUEST_SENT, RESPONSE_RECEIVED, RESPONSE_SENT,
                           _idl_text, _stored_types, idl_definition)

COMPUTE_IK_EVENTS = "/compute_ik/_service_event"
PLANNING_SCENE = "/monitored_planning_scene"
GET_POSITION_IK_EVENT = "moveit_msgs/srv/GetPositionIK_Event"
PLANNING_SCENE_TYPE = "moveit_msgs/msg/PlanningScene"
#: moveit_msgs/msg/MoveItErrorCodes.SUCCESS
MOVEIT_SUCCESS = 1
#: moveit_msgs/msg/CollisionObject operations
ADD, REMOVE, APPEND, MOVE = 0, 1, 2, 3
#: shape_msgs/msg/SolidPrimitive types mace collides with
_PRIMITIVE_KINDS = {1: ("box", 3), 2: ("sphere", 1), 3: ("cylinder", 2)}
#: frames that name the robot's base in a Panda MoveIt config (besides the base link itself)
BASE_ALIASES = ("", "world")
#: the ``panda_arm`` group's tip: the link an empty ``ik_link_name`` means
DEFAULT_IK_LINK = "panda_link8"

#: MoveIt's types as far as the replay reads them (and the writer writes them): IDL blocks
#: under MoveIt's names, the fields named as in moveit_msgs
MOVEIT_IDL = {
    "moveit_msgs/msg/MoveItErrorCodes": """module moveit_msgs { module msg {
  struct MoveItErrorCodes { int32 val; string message; string source; }; }; };""",
    "moveit_msgs/msg/RobotState": """module moveit_msgs { module msg {
  struct RobotState { sensor_msgs::msg::JointState joint_state; boolean is_diff; }; }; };""",
    "moveit_msgs/msg/PositionIKRequest": """module moveit_msgs { module msg {
  struct PositionIKRequest {
    string group_name; moveit_msgs::msg::RobotState robot_state; boolean avoid_collisions;
    string ik_link_name; geometry_msgs::msg::PoseStamped pose_stamped;
    builtin_interfaces::msg::Duration timeout;
  }; }; };""",
    "moveit_msgs/srv/GetPositionIK": """module moveit_msgs { module srv {
  struct GetPositionIK_Request { moveit_msgs::msg::PositionIKRequest ik_request; };
  struct GetPositionIK_Response {
    moveit_msgs::msg::RobotState solution; moveit_msgs::msg::MoveItErrorCodes error_code;
  }; }; };""",
    GET_POSITION_IK_EVENT: """module moveit_msgs { module srv { struct GetPositionIK_Event {
  service_msgs::msg::ServiceEventInfo info;
  sequence<moveit_msgs::srv::GetPositionIK_Request, 1> request;
  sequence<moveit_msgs::srv::GetPositionIK_Response, 1> response;
}; }; };""",
    "moveit_msgs/msg/CollisionObject": """module moveit_msgs { module msg {
  struct CollisionObject {
    std_msgs::msg::Header header; geometry_msgs::msg::Pose pose; string id;
    sequence<shape_msgs::msg::SolidPrimitive> primitives;
    sequence<geometry_msgs::msg::Pose> primitive_poses;
    sequence<shape_msgs::msg::Mesh> meshes; sequence<geometry_msgs::msg::Pose> mesh_poses;
    sequence<shape_msgs::msg::Plane> planes; sequence<geometry_msgs::msg::Pose> plane_poses;
    octet operation;
  }; }; };""",
    "moveit_msgs/msg/PlanningSceneWorld": """module moveit_msgs { module msg {
  struct PlanningSceneWorld {
    sequence<moveit_msgs::msg::CollisionObject> collision_objects;
  }; }; };""",
    PLANNING_SCENE_TYPE: """module moveit_msgs { module msg {
  struct PlanningScene {
    string name; moveit_msgs::msg::PlanningSceneWorld world; boolean is_diff;
  }; }; };""",
}


@dataclass
class MoveItIKCall:
    """One recorded ``/compute_ik`` call."""

    stamp_ns: int  #: when the request was recorded (the bag's clock)
    #: the call as a mace request (a full pose of the end effector), None when it cannot be
    #: replayed (why: ``unsupported``)
    request: IKRequest | None
    group_name: str = ""
    ik_link_name: str = ""  #: the link the pose was asked for (empty: the group's tip)
    avoid_collisions: bool = False
    timeout_s: float = 0.0  #: MoveIt's own timeout for the call (0: its default)
    unsupported: list[str] = field(default_factory=list)  #: what the replay leaves out
    error_code: int | None = None  #: MoveIt's answer, when the response was recorded
    solution: np.ndarray | None = None  #: (7,) rad, MoveIt's solution (SUCCESS only)
    latency_s: float | None = None  #: s, from the events' stamps


def moveit_typestore():
    """Kilted's types plus MoveIt's as :data:`MOVEIT_IDL` declares them."""
    store = get_typestore(Stores.ROS2_KILTED)
    types = {}
    for text in MOVEIT_IDL.values():
        types.update(get_types_from_idl(text))
    store.register(types)
    return store


def _moveit_idl_text(typename: str) -> tuple[str, str]:
    pkg, kind, name = typename.split("/")
    if typename in MOVEIT_IDL:
        return typename, MOVEIT_IDL[typename]
    if pkg == "moveit_msgs" and kind == "srv":  # _Request / _Response: the service's block
        base = f"{pkg}/{kind}/{name.rpartition('_')[0]}"
        return base, MOVEIT_IDL[base]
    return _idl_text(typename)


# ----------------------------------------------------------------------------------------------
# Poses and the planning scene
# ----------------------------------------------------------------------------------------------

def _matrix(pose) -> np.ndarray:
    """(4, 4) of a geometry_msgs/Pose read by name (a zero quaternion: identity, as MoveIt)."""
    q = np.array([pose.orientation.x, pose.orientation.y, pose.orientation.z,
                  pose.orientation.w], dtype=float)
    out = np.eye(4)
    if np.linalg.norm(q) > 1e-9:
        out[:3, :3] = np.asarray(quaternion_xyzw_to_matrix(q / np.linalg.norm(q)))
    out[:3, 3] = [pose.position.x, pose.position.y, pose.position.z]
    return out


def _in_base(frame_id: str, base_frame: str) -> bool:
    return frame_id.lstrip("/") in BASE_ALIASES + (base_frame,)


class PlanningSceneState:
    """The world of collision objects as MoveIt's planning scene messages leave it."""

    def __init__(self, base_frame: str):
        self.base_frame = base_frame
        #: object id -> (object pose (4, 4), frame, [(primitive, pose (4, 4))], unsupported)
        self.objects: dict[str, tuple[np.ndarray, str, list, list[str]]] = {}
        self._obstacles: tuple[list[Obstacle], list[str]] | None = None  # until the next scene

    def apply(self, scene) -> None:
        """Apply one ``moveit_msgs/msg/PlanningScene`` (full or diff)."""
        self._obstacles = None
        if not scene.is_diff:
            self.objects = {}
        for obj in scene.world.collision_objects:
            self._apply_object(obj)

    def _apply_object(self, obj) -> None:
        op = int(getattr(obj, "operation", ADD))
        if op == REMOVE:
            if obj.id:
                self.objects.pop(obj.id, None)
            else:
                self.objects = {}
            return
        pose = _matrix(obj.pose) if hasattr(obj, "pose") else np.eye(4)
        if op == MOVE:
            if obj.id in self.objects:
                _, frame, prims, unsupported = self.objects[obj.id]
                self.objects[obj.id] = (pose, obj.header.frame_id or frame, prims, unsupported)
            return
        prims = [(p, _matrix(q)) for p, q in zip(obj.primitives, obj.primitive_poses)]
        unsupported = [f"{obj.id}: {len(obj.meshes)} mesh(es)"] if len(obj.meshes) else []
        if len(getattr(obj, "planes", [])):
            unsupported.append(f"{obj.id}: {len(obj.planes)} plane(s)")
        if op == APPEND and obj.id in self.objects:
            old_pose, frame, old, old_unsupported = self.objects[obj.id]
            self.objects[obj.id] = (old_pose, frame, old + prims, old_unsupported + unsupported)
        else:  # ADD (or APPEND to a new object): replaces
            self.objects[obj.id] = (pose, obj.header.frame_id, prims, unsupported)

    def obstacles(self) -> tuple[list[Obstacle], list[str]]:
        """The world's primitives as obstacles in the base frame, and what was left out (built
        once per scene message, however many requests are asked in it)."""
        if self._obstacles is None:
            self._obstacles = self._build_obstacles()
        out, unsupported = self._obstacles
        return list(out), list(unsupported)

    def _build_obstacles(self) -> tuple[list[Obstacle], list[str]]:
        out, unsupported = [], []
        for oid, (pose, frame, prims, missing) in self.objects.items():
            unsupported += missing
            if not _in_base(frame, self.base_frame):
                unsupported.append(f"{oid}: frame {frame!r} is not the robot's base")
                continue
            for i, (prim, local) in enumerate(prims):
                kind, dims = _PRIMITIVE_KINDS.get(int(prim.type), (None, 0))
                size = np.asarray(prim.dimensions, dtype=float)
                if kind is None or size.shape != (dims,):
                    unsupported.append(f"{oid}: primitive type {int(prim.type)} with "
                                       f"{size.size} dimensions")
                    continue
                world = pose @ local
                name = oid if len(prims) == 1 else f"{oid}/{i}"
                obstacle = Obstacle(name=name, kind=kind, size=tuple(size.tolist()),
                                    position=tuple(world[:3, 3].tolist()),
                                    rotation=tuple(tuple(r) for r in world[:3, :3].tolist()))
                try:
                    obstacle.validate()
                except InvalidRequestError as exc:
                    unsupported.append(str(exc))
                    continue
                out.append(obstacle)
        return out, unsupported


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

def _stamp_s(stamp) -> float:
    return float(stamp.sec) + 1e-9 * float(stamp.nanosec)


def _solution(response) -> np.ndarray | None:
    names = list(response.solution.joint_state.name)
    values = np.asarray(response.solution.joint_state.position, dtype=float)
    if not all(j in names for j in PANDA_JOINTS) or len(values) != len(names):
        return None
    return np.array([values[names.index(j)] for j in PANDA_JOINTS])


def _arm_joints(state, lower: np.ndarray, upper: np.ndarray) -> np.ndarray | None:
    """The Panda arm's ``(7,)`` joints of a recorded ``RobotState`` (by name; None when it
    lacks one, e.g. an empty ``is_diff`` state), clipped onto the joint limits as the solvers
    clip a seed (a default-constructed state has joint 4 at 0, beyond its -0.07 limit)."""
    names = list(state.joint_state.name)
    values = np.asarray(state.joint_state.position, dtype=float)
    if len(values) != len(names) or not all(j in names for j in PANDA_JOINTS):
        return None
    q = np.array([values[names.index(j)] for j in PANDA_JOINTS])
    return np.clip(q, lower, upper) if np.isfinite(q).all() else None


def _call(stamp_ns: int, request, world: PlanningSceneState, offsets: dict[str, np.ndarray],
          tolerance: float, limits: tuple[np.ndarray, np.ndarray]) -> MoveItIKCall:
    """A recorded GetPositionIK request (read by name) as a call; its ``robot_state`` (MoveIt's
    seed, the robot's joints) becomes the request's ``seed_state``."""
    ik = request.ik_request
    call = MoveItIKCall(stamp_ns=stamp_ns, request=None, group_name=ik.group_name,
                        ik_link_name=ik.ik_link_name,
                        avoid_collisions=bool(ik.avoid_collisions),
                        timeout_s=_stamp_s(ik.timeout))
    link = ik.ik_link_name or DEFAULT_IK_LINK
    frame = ik.pose_stamped.header.frame_id
    obstacles, call.unsupported = world.obstacles()
    if link not in offsets:
        call.unsupported.append(f"target link {link!r} is not rigidly attached to the hand")
        return call
    if not _in_base(frame, world.base_frame):
        call.unsupported.append(f"target frame {frame!r} is not the robot's base")
        return call
    target = _matrix(ik.pose_stamped.pose) @ offsets[link]
    call.request = IKRequest(position=target[:3, 3], rotation=target[:3, :3],
                             orientation_tolerance=tolerance,
                             obstacles=obstacles if call.avoid_collisions else [],
                             seed_state=_arm_joints(ik.robot_state, *limits))
    return call


def read_moveit_ik_calls(path: str | os.PathLike, kin: RobotKinematics,
                         orientation_tolerance: float = 1e-3) -> list[MoveItIKCall]:
    """Every ``/compute_ik`` call the bag holds, in order, each with the planning scene as it
    stood when it was asked and MoveIt's recorded answer (none: no call, no such topic)."""
    offsets = kin.ee_in_link
    world = PlanningSceneState(kin.base_link)
    calls: dict[tuple, MoveItIKCall] = {}
    stamps: dict[tuple, dict[int, float]] = {}
    with Reader(path) as reader:
        wanted = [c for c in reader.connections
                  if c.topic in (COMPUTE_IK_EVENTS, PLANNING_SCENE)]
        if not any(c.topic == COMPUTE_IK_EVENTS for c in wanted):
            return []
        store = get_typestore(Stores.ROS2_KILTED)  # its own types win over the bag's copies
        store.register({k: v for k, v in _stored_types(reader).items()
                        if k not in store.fielddefs})
        for connection, stamp, raw in reader.messages(connections=wanted):
            msg = store.deserialize_cdr(raw, connection.msgtype)
            if connection.topic == PLANNING_SCENE:
                world.apply(msg)
                continue
            info = msg.info
            key = (bytes(np.asarray(info.client_gid, dtype=np.uint8)), int(info.sequence_number))
            stamps.setdefault(key, {})[int(info.event_type)] = _stamp_s(info.stamp)
            if len(msg.request) and key not in calls:
                calls[key] = _call(stamp, msg.request[0], world, offsets,
                                   orientation_tolerance, kin.limits_numpy)
            if len(msg.response) and key in calls:
                call = calls[key]
                call.error_code = int(msg.response[0].error_code.val)
                if call.error_code == MOVEIT_SUCCESS:
                    call.solution = _solution(msg.response[0])
    for key, call in calls.items():
        seen = stamps[key]
        for start, end in ((REQUEST_SENT, RESPONSE_RECEIVED), (REQUEST_RECEIVED, RESPONSE_SENT)):
            if start in seen and end in seen:
                call.latency_s = seen[end] - seen[start]
                break
    return list(calls.values())


# ----------------------------------------------------------------------------------------------
# Writing (what a MoveIt pipeline's recording holds)
# ----------------------------------------------------------------------------------------------

def _pose(store, matrix: np.ndarray):
    t = store.types
    x, y, z, w = matrix_to_quaternion_xyzw(matrix[:3, :3])
    return t["geometry_msgs/msg/Pose"](
        position=t["geometry_msgs/msg/Point"](x=float(matrix[0, 3]), y=float(matrix[1, 3]),
                                              z=float(matrix[2, 3])),
        orientation=t["geometry_msgs/msg/Quaternion"](x=float(x), y=float(y), z=float(z),
                                                      w=float(w)))


def _header(store, frame: str, stamp_ns: int = 0):
    t = store.types
    return t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](
        sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000), frame_id=frame)


def _homogeneous(position: Sequence[float], rotation) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = np.asarray(rotation, dtype=float)
    out[:3, 3] = np.asarray(position, dtype=float)
    return out


def _planning_scene(store, obstacles: Sequence[Obstacle], frame: str):
    t = store.types
    kinds = {kind: code for code, (kind, _) in _PRIMITIVE_KINDS.items()}
    objects = [t["moveit_msgs/msg/CollisionObject"](
        header=_header(store, frame), pose=_pose(store, np.eye(4)), id=o.name,
        primitives=[t["shape_msgs/msg/SolidPrimitive"](
            type=kinds[o.kind], dimensions=np.asarray(o.size, dtype=float),
            polygon=t["geometry_msgs/msg/Polygon"](points=[]))],
        primitive_poses=[_pose(store, _homogeneous(o.position, o.rotation_matrix))],
        meshes=[], mesh_poses=[], planes=[], plane_poses=[], operation=ADD)
        for o in obstacles]
    return t[PLANNING_SCENE_TYPE](
        name="recorded", world=t["moveit_msgs/msg/PlanningSceneWorld"](collision_objects=objects),
        is_diff=False)


def _event(store, event_type: int, sequence: int, stamp_ns: int, request=None, response=None):
    t = store.types
    info = t["service_msgs/msg/ServiceEventInfo"](
        event_type=event_type, stamp=_header(store, "", stamp_ns).stamp,
        client_gid=np.zeros(16, dtype=np.uint8), sequence_number=sequence)
    return t[GET_POSITION_IK_EVENT](info=info, request=[request] if request else [],
                                    response=[response] if response else [])


def write_moveit_style_bag(path: str | os.PathLike, requests: Iterable[IKRequest],
                           kin: RobotKinematics, ik_link: str = DEFAULT_IK_LINK,
                           answers: Sequence[tuple[np.ndarray | None, float]] | None = None,
                           group: str = "panda_arm") -> None:
    """Write a bag as a MoveIt pipeline records it: per request, the planning scene of its
    obstacles (a full scene, when they changed), then the ``/compute_ik`` request event
    (server side); with ``answers`` (per request: MoveIt's solution ``(7,)`` or None for a
    failure, and its latency in s) the response event too. Targets are the requests' end
    effector poses, asked for ``ik_link``; each one's ``robot_state`` is its ``seed_state``
    (all zeros without one)."""
    store = moveit_typestore()
    t = store.types
    link_from_ee = np.linalg.inv(kin.ee_in_link[ik_link])
    writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
    writer.open()
    try:
        scene_conn, ik_conn = (
            writer.add_connection(topic, typename, msgdef=idl_definition(
                typename, store, _moveit_idl_text), rihs01=store.hash_rihs01(typename))
            for topic, typename in ((PLANNING_SCENE, PLANNING_SCENE_TYPE),
                                    (COMPUTE_IK_EVENTS, GET_POSITION_IK_EVENT)))
        last = None
        clock = 1_000_000_000
        for k, request in enumerate(requests):
            clock += 1_000_000_000
            if last != tuple(request.obstacles):
                last = tuple(request.obstacles)
                writer.write(scene_conn, clock - 500_000_000, bytes(store.serialize_cdr(
                    _planning_scene(store, request.obstacles, kin.base_link),
                    PLANNING_SCENE_TYPE)))
            rotation = np.eye(3) if request.rotation is None else request.rotation
            pose = _homogeneous(request.position, rotation) @ link_from_ee
            ik = t["moveit_msgs/msg/PositionIKRequest"](
                group_name=group, robot_state=_robot_state(
                    store, np.zeros(len(PANDA_JOINTS)) if request.seed_state is None
                    else np.asarray(request.seed_state, dtype=float)),
                avoid_collisions=True, ik_link_name=ik_link,
                pose_stamped=t["geometry_msgs/msg/PoseStamped"](
                    header=_header(store, kin.base_link, clock), pose=_pose(store, pose)),
                timeout=t["builtin_interfaces/msg/Duration"](sec=0, nanosec=50_000_000))
            event = _event(store, REQUEST_RECEIVED, k + 1, clock,
                           request=t["moveit_msgs/srv/GetPositionIK_Request"](ik_request=ik))
            writer.write(ik_conn, clock, bytes(store.serialize_cdr(event, GET_POSITION_IK_EVENT)))
            if answers is not None:
                solution, latency = answers[k]
                done = clock + int(latency * 1e9)
                response = t["moveit_msgs/srv/GetPositionIK_Response"](
                    solution=_robot_state(store, solution if solution is not None
                                          else np.zeros(0)),
                    error_code=t["moveit_msgs/msg/MoveItErrorCodes"](
                        val=MOVEIT_SUCCESS if solution is not None else -31,
                        message="", source=""))
                writer.write(ik_conn, done, bytes(store.serialize_cdr(
                    _event(store, RESPONSE_SENT, k + 1, done, response=response),
                    GET_POSITION_IK_EVENT)))
    finally:
        writer.close()


def _robot_state(store, q: np.ndarray):
    t = store.types
    names = list(PANDA_JOINTS) if len(q) else []
    return t["moveit_msgs/msg/RobotState"](
        joint_state=t["sensor_msgs/msg/JointState"](
            header=_header(store, ""), name=names, position=np.asarray(q, dtype=float),
            velocity=np.zeros(0), effort=np.zeros(0)),
        is_diff=False)


def unsupported_summary(calls: Sequence[MoveItIKCall]) -> list[str]:
    """Each distinct thing the replay left out, with how many calls it concerned."""
    counts: dict[str, int] = {}
    for call in calls:
        for item in dict.fromkeys(call.unsupported):
            counts[item] = counts.get(item, 0) + 1
    return [f"{item} ({n} call{'s' if n > 1 else ''})" for item, n in counts.items()]
