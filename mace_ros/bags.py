"""ROS 2 bags of mace's service calls: the ``<service>/_service_event`` messages that service
introspection publishes and ``ros2 bag record`` captures, written and read with ``rosbags``.

A bag is MCAP (rosbag2 version 9) and carries its message definitions, so any reader decodes
it. The service types are registered from the interface files this package installs
(``share/mace_ros/srv/*.idl``, their RIHS01 hashes from the ``.json`` beside them); the
``<Srv>_Event`` type, which rosidl generates but does not write as IDL, is declared here with
the fields rosidl gives it (``info``, ``request[<=1]``, ``response[<=1]``).

Messages cross between rclpy's classes and rosbags' by their field definitions
(:func:`to_rosbags`, :func:`from_rosbags`): what a node receives is written as it is, and what a
bag holds becomes the request a client sends.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from ament_index_python.packages import get_package_share_directory
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore, get_types_from_idl, get_types_from_msg
from rosbags.typesys.store import Typestore

#: services whose calls a bag can carry: service name -> interface type
SERVICES = {"/mace/adapt_ik": "mace_ros/srv/AdaptIK",
            "/mace/complete_shape": "mace_ros/srv/CompleteShape"}
#: what ``info.event_type`` says (service_msgs/msg/ServiceEventInfo)
REQUEST_SENT, REQUEST_RECEIVED, RESPONSE_SENT, RESPONSE_RECEIVED = range(4)

_EVENT_IDL = """module {pkg} {{ module srv {{ struct {name}_Event {{
  service_msgs::msg::ServiceEventInfo info;
  sequence<{pkg}::srv::{name}_Request, 1> request;
  sequence<{pkg}::srv::{name}_Response, 1> response;
}}; }}; }};"""


def event_class(service: str):
    """rclpy's ``<Srv>.Event`` class of one of :data:`SERVICES`."""
    module, name = SERVICES[service].replace("/srv/", ".srv/").split("/")
    return getattr(importlib.import_module(module), name).Event


def mace_typestore() -> tuple[Typestore, dict[str, str]]:
    """Kilted's types plus mace_ros's messages and services (their ``_Event`` types too), and
    the RIHS01 hash of every mace_ros type by name."""
    store = get_typestore(Stores.ROS2_KILTED)
    share = get_package_share_directory("mace_ros")
    types, hashes = {}, {}
    for path in sorted(Path(share, "msg").glob("*.msg")):
        types.update(get_types_from_msg(path.read_text(), f"mace_ros/msg/{path.stem}"))
    for path in sorted(Path(share, "srv").glob("*.idl")):
        idl = re.sub(r"^#include.*$", "", path.read_text(), flags=re.M)
        types.update(get_types_from_idl(idl))
        types.update(get_types_from_idl(_EVENT_IDL.format(pkg="mace_ros", name=path.stem)))
    for path in sorted(Path(share).glob("*/*.json")):
        for entry in json.loads(path.read_text()).get("type_hashes", []):
            if entry["type_name"].startswith("mace_ros/"):
                hashes[entry["type_name"]] = entry["hash_string"]
    store.register(types)
    return store, hashes


def _idl_text(typename: str) -> tuple[str, str]:
    """(block name, IDL text) of the interface file that defines ``typename``: its own
    ``.idl``, the service's for ``_Request``/``_Response``, the declaration here for
    ``_Event``."""
    pkg, kind, name = typename.split("/")
    if kind == "srv":
        base, _, part = name.rpartition("_")
        if part == "Event":
            return typename, _EVENT_IDL.format(pkg=pkg, name=base)
        name = base
    path = Path(get_package_share_directory(pkg), kind, f"{name}.idl")
    return f"{pkg}/{kind}/{name}", path.read_text()


def idl_definition(typename: str, store: Typestore, texts=None) -> str:
    """The bag's definition of ``typename`` in ROS 2's ``ros2idl`` form: one block per
    interface file it depends on (``====`` line, ``IDL: pkg/kind/Name``, the file);
    ``texts(name) -> (block, IDL text)`` finds the files (default: the installed ones)."""
    texts = texts or _idl_text
    order, seen = [], set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for _, (node, spec) in store.fielddefs[name][1]:
            if int(node) == 2:
                visit(spec)
            elif int(node) in (3, 4) and int(spec[0][0]) == 2:
                visit(spec[0][1])
        order.append(name)

    visit(typename)
    blocks, files = [], set()
    for name in reversed(order):  # the type itself first, as ROS 2 writes it
        block, text = texts(name)
        if block not in files:
            files.add(block)
            blocks.append("=" * 80 + f"\nIDL: {block}\n{text}")
    return "\n".join(blocks)


def to_rosbags(msg, typename: str, store: Typestore):
    """An rclpy message as the rosbags object of ``typename`` (``pkg/msg/Type``)."""
    cls = store.types[typename]
    values = {}
    for field, (node, spec) in store.fielddefs[typename][1]:
        value = getattr(msg, field)
        values[field] = _convert(value, node, spec, store, to_rosbags)
    return cls(**values)


def from_rosbags(obj, rclpy_cls):
    """A rosbags object as an instance of the rclpy message class ``rclpy_cls``; a field the
    object lacks (a bag recorded before the field was added) keeps its default."""
    msg = rclpy_cls()
    for field, slot in zip(rclpy_cls.get_fields_and_field_types(), rclpy_cls.SLOT_TYPES):
        if not hasattr(obj, field):
            continue
        value = getattr(obj, field)
        current = getattr(msg, field)
        if hasattr(current, "get_fields_and_field_types"):  # a nested message
            setattr(msg, field, from_rosbags(value, type(current)))
        elif isinstance(value, list) and value and hasattr(value[0], "__dataclass_fields__"):
            element = slot.value_type  # a sequence of messages: its element's namespaced type
            cls = getattr(importlib.import_module(".".join(element.namespaces)), element.name)
            setattr(msg, field, [from_rosbags(v, cls) for v in value])
        elif isinstance(value, np.ndarray):
            setattr(msg, field, value.tolist() if not isinstance(current, np.ndarray)
                    else value.astype(current.dtype))
        elif isinstance(value, list):  # strings, or an empty sequence of messages
            setattr(msg, field, list(value))
        else:
            setattr(msg, field, value)
    return msg


def _convert(value, node, spec, store, recurse):
    """One field's value for rosbags: nested messages recursed, numbers as numpy arrays."""
    kind = int(node)
    if kind == 2:  # NAME: a nested message
        return recurse(value, spec, store)
    if kind in (3, 4):  # ARRAY or SEQUENCE
        (sub_node, sub_spec), _ = spec
        if int(sub_node) == 2:
            return [recurse(v, sub_spec, store) for v in value]
        base = sub_spec[0]
        if base == "string":
            return list(value)
        dtype = {"char": np.uint8, "byte": np.uint8, "bool": np.bool_}.get(base, base)
        return np.asarray(list(value), dtype=dtype)
    return value


class ServiceEventBag:
    """Writes the events of mace's services into an MCAP bag (``with`` closes it)."""

    def __init__(self, path: str | os.PathLike):
        self.store, self.hashes = mace_typestore()
        self.writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
        self.writer.open()
        self._connections = {}

    def _connection(self, service: str):
        if service not in self._connections:
            typename = SERVICES[service] + "_Event"
            self._connections[service] = self.writer.add_connection(
                f"{service}/_service_event", typename, msgdef=idl_definition(typename, self.store),
                rihs01=self.hashes[typename])
        return self._connections[service]

    def write_event(self, service: str, event, stamp_ns: int) -> None:
        """Write one rclpy ``<Srv>.Event`` message received at ``stamp_ns``."""
        typename = SERVICES[service] + "_Event"
        data = self.store.serialize_cdr(to_rosbags(event, typename, self.store), typename)
        self.writer.write(self._connection(service), stamp_ns, bytes(data))

    def write_raw(self, service: str, data: bytes, stamp_ns: int) -> None:
        """Write one event as received on the wire (CDR bytes of a ``raw`` subscription)."""
        self.writer.write(self._connection(service), stamp_ns, bytes(data))

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "ServiceEventBag":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_service_events(path: str | os.PathLike, service: str = "/mace/adapt_ik"
                        ) -> Iterator[tuple[int, object]]:
    """``(stamp_ns, event)`` of each event of ``service`` in the bag, decoded with the
    definitions the bag stores, as rclpy ``<Srv>.Event`` messages."""
    rclpy_event = event_class(service)
    with Reader(path) as reader:
        store = get_typestore(Stores.ROS2_KILTED)  # its own types win over the bag's copies
        store.register({k: v for k, v in _stored_types(reader).items()
                        if k not in store.fielddefs})
        wanted = [c for c in reader.connections if c.topic == f"{service}/_service_event"]
        if not wanted:  # (no connections would read every message)
            return
        for connection, stamp, raw in reader.messages(connections=wanted):
            obj = store.deserialize_cdr(raw, connection.msgtype)
            yield stamp, from_rosbags(obj, rclpy_event)


def _stored_types(reader: Reader) -> dict:
    """The types whose definitions the bag's connections carry (``ros2idl`` blocks, or a
    concatenated ``ros2msg`` definition)."""
    types = {}
    for connection in reader.connections:
        data = connection.msgdef.data
        if data.startswith("=" * 80 + "\nIDL: "):
            for block in re.split(r"^={80}\nIDL: \S+\n", data, flags=re.M)[1:]:
                types.update(get_types_from_idl(re.sub(r"^#include.*$", "", block,
                                                       flags=re.M)))
        else:
            types.update(_types_from_concatenated_msg(data, connection.msgtype,
                                                      get_types_from_msg))
    return types


def _types_from_concatenated_msg(text: str, typename: str, from_msg) -> dict:
    """A ROS 2 concatenated ``.msg`` definition (the main type, then ``MSG: pkg/Type``
    blocks) as types."""
    types = {}
    blocks = re.split(r"^=+\s*$", text, flags=re.M)
    types.update(from_msg(blocks[0], typename))
    for block in blocks[1:]:
        match = re.search(r"^MSG: (\S+)\s*$", block, flags=re.M)
        if match:
            name = match.group(1)
            if name.count("/") == 1:
                name = name.replace("/", "/msg/")
            types.update(from_msg(block[match.end():], name))
    return types


def events_of(requests: Iterable, service: str = "/mace/adapt_ik"):
    """REQUEST_RECEIVED events ``<Srv>.Event`` carrying ``requests`` (numbered from 1)."""
    for k, request in enumerate(requests, 1):
        event = event_class(service)()
        event.info.event_type = REQUEST_RECEIVED
        event.info.sequence_number = k
        event.request = [request]
        yield event


def draw_requests(scene, num_targets: int, seed: int, target_kind: str = "position",
                  num_solutions: int = 8, time_budget_s: float = 1.0,
                  orientation_tolerance: float = 1e-3, seed_near_rad: float = 0.0) -> list:
    """Core requests for targets drawn as ``mace-bench ik`` draws them (uniform in the scene's
    region, or hand poses of valid configurations there); pose targets with ``seed_near_rad``
    carry the seed states ``mace-bench ik --seed-near`` gives them."""
    from mace_core.ik.benchmark import near_seed_states, sample_pose_targets, sample_targets
    from mace_core.ik.request import IKRequest
    from mace_core.robot.kinematics import RobotKinematics
    from mace_core.robot.pybullet_checker import PyBulletCollisionChecker
    from mace_core.robot.scenes import quaternion_xyzw_to_matrix
    from mace_core.tensor import TensorSpec

    seeds = [None] * num_targets
    if target_kind == "pose":
        with PyBulletCollisionChecker(scene.obstacles) as checker:
            targets, drawn_from = sample_pose_targets(scene, num_targets, seed, checker,
                                                      configurations=True)
        if seed_near_rad:
            seeds = list(near_seed_states(drawn_from, seed_near_rad, seed,
                                          RobotKinematics.panda(TensorSpec.resolve("cpu"))))
    else:
        targets = sample_targets(scene, num_targets, seed)
    requests = []
    for k, target in enumerate(targets):
        pose = {}
        if target.shape[0] == 7:
            pose = dict(rotation=np.asarray(quaternion_xyzw_to_matrix(target[3:])),
                        orientation_tolerance=orientation_tolerance)
        requests.append(IKRequest(
            position=target[:3], obstacles=list(scene.obstacles), num_solutions=num_solutions,
            time_budget_s=time_budget_s, seed=seed * 100003 + k, seed_state=seeds[k], **pose))
    return requests


def record_drawn_requests(path: str | os.PathLike, scene, num_targets: int, seed: int,
                          target_kind: str = "position", num_solutions: int = 8,
                          time_budget_s: float = 1.0, orientation_tolerance: float = 1e-3,
                          seed_near_rad: float = 0.0) -> list:
    """Write a bag of ``/mace/adapt_ik`` request events for targets drawn as
    ``mace-bench ik`` draws them (:func:`draw_requests`), without a node: what a pipeline's
    recorded bag holds. Returns the rclpy requests written."""
    from mace_ros.conversions import ik_request_to_msg

    requests = [ik_request_to_msg(r) for r in draw_requests(
        scene, num_targets, seed, target_kind, num_solutions, time_budget_s,
        orientation_tolerance, seed_near_rad)]
    with ServiceEventBag(path) as bag:
        for k, event in enumerate(events_of(requests)):
            bag.write_event("/mace/adapt_ik", event, stamp_ns=(k + 1) * 1_000_000_000)
    return requests


def read_ik_requests(path: str | os.PathLike) -> list:
    """The ``/mace/adapt_ik`` requests a bag holds (one per call: its request event), in
    order, as rclpy ``AdaptIK.Request`` messages."""
    return read_requests(path, "/mace/adapt_ik")


def read_shape_requests(path: str | os.PathLike) -> list:
    """The ``/mace/complete_shape`` requests a bag holds, in order (``CompleteShape.Request``)."""
    return read_requests(path, "/mace/complete_shape")


def read_requests(path: str | os.PathLike, service: str) -> list:
    """The requests of ``service`` (one of :data:`SERVICES`) a bag holds, one per call (the
    first event that carries it), in order."""
    seen, out = set(), []
    for _, event in read_service_events(path, service):
        key = (bytes(event.info.client_gid), event.info.sequence_number)
        if event.request and key not in seen:
            seen.add(key)
            out.append(event.request[0])
    return out


def record_live(path: str | os.PathLike, duration_s: float,
                services: Iterable[str] = tuple(SERVICES), node_name: str = "mace_recorder",
                ready=None) -> dict[str, int]:
    """Subscribe to the ``_service_event`` topics of a running node's ``services`` for
    ``duration_s`` and write every event, as received, into an MCAP bag at ``path``; returns
    the events written per service. ``ready`` (a ``threading.Event``) is set once the node's
    event publishers are discovered (or the time is up).
    Needs the node's ``service_introspection`` at ``contents`` for the requests themselves."""
    import time

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    context = rclpy.Context()
    rclpy.init(context=context)
    counts = {service: 0 for service in services}
    try:
        node = rclpy.create_node(node_name, context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        with ServiceEventBag(path) as bag:
            def writer(service):
                def write(data: bytes) -> None:
                    bag.write_raw(service, data, time.time_ns())
                    counts[service] += 1
                return write

            for service in services:
                node.create_subscription(event_class(service), f"{service}/_service_event",
                                         writer(service), qos, raw=True)
            end = time.monotonic() + duration_s
            if ready is not None:  # once the node's event publishers are discovered
                topics = [f"{service}/_service_event" for service in services]
                while time.monotonic() < end and not all(
                        node.count_publishers(t) for t in topics):
                    executor.spin_once(timeout_sec=0.05)
                ready.set()
            while time.monotonic() < end:
                executor.spin_once(timeout_sec=min(0.1, max(0.0, end - time.monotonic())))
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
    return counts
