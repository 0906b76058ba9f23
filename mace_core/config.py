"""Typed configuration: nested dataclasses <-> YAML dicts <-> flat dotted names (ROS parameters).

One function builds a config from a (nested) dict and rejects unknown keys; another flattens it to
``{"ik.mace.num_samples": 512, ...}`` so the node can declare one ROS parameter per field, with the
field's ``#:`` comment as its description.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import yaml

from .errors import InvalidRequestError
from .ik.request import IKAdaptConfig
from .shape.completion import ShapeCompletionConfig

_SCALARS = (bool, int, float, str)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: dict | None, where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; missing keys keep their defaults.

    Raises:
        InvalidRequestError: an unknown key or a value of the wrong type.
    """
    data = dict(data or {})
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise InvalidRequestError(f"unknown configuration keys under '{where or cls.__name__}': "
                                  f"{sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        tp, key = hints[name], f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise InvalidRequestError(f"'{key}' must be a mapping")
            kwargs[name] = from_dict(tp, value, key)
        else:
            kwargs[name] = _coerce(tp, value, key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in _SCALARS:
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise InvalidRequestError(f"'{key}' must be {tp.__name__}, got {value!r}")
        return value
    return value


def to_flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a dataclass instance to ``{dotted.name: scalar}``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(to_flat(value, key + "."))
        else:
            out[key] = value
    return out


def from_flat(cls: type, flat: dict[str, Any]) -> Any:
    """Inverse of :func:`to_flat` (unknown names are errors)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(cls, nested)


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The ``#:`` comment of each field of dataclass ``cls``, by field name: on the field's line,
    or on the comment lines right above it (the longer ones)."""
    docs, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        if line.strip().startswith("#:"):
            above.append(line.strip()[2:].strip())
            continue
        m = re.match(r"\s+(\w+)\s*:[^#]*(?:#:\s*(.+))?$", line)
        if m and (m.group(2) or above):
            docs[m.group(1)] = (m.group(2) or " ".join(above)).strip()
        above = []
    return docs


def flat_docs(cls: type, prefix: str = "") -> dict[str, str]:
    """Descriptions of every flattened field of ``cls``: ``{dotted.name: text}``."""
    out = {}
    hints = _field_types(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(flat_docs(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = docs.get(f.name, "")
    return out


@dataclass
class ServiceConfig:
    """Everything the mace node is configured with (``config/panda.yaml``)."""

    device: str = "auto"  #: "auto", "cpu" or "cuda[:N]"
    torch_threads: int = 1  #: torch's CPU threads; 1 beats 2 on a 2-core machine (0: default)
    models_dir: str = ""  #: folder of the model registry; empty: the package's models/
    #: registry name of the IK prior: ``panda_ik_small`` (3 x 128 per joint) answers position
    #: requests 10-28 % faster than the paper-sized ``panda_ik`` (5 x 200), all 8 valid alike
    #: (models/panda_ik_small.md)
    ik_model: str = "panda_ik_small"
    shape_priors: str = "boxes,objects"  #: comma-separated registry names of shape priors to load
    max_concurrent_waiting: int = 8  #: requests queued behind a running one; more get "busy"
    publish_markers: bool = True  #: publish IK solutions as a visualization_msgs/MarkerArray
    #: level of the one-line summary of each answered request, "debug" or "info" (refusals and
    #: errors are warnings whatever it says); "info" measured 0.4 ms more per box pose request
    #: end to end over DDS, in turns with "debug" (the line goes to the console and /rosout)
    request_log_level: str = "debug"
    #: service introspection of both services: "contents" (request and response events on
    #: ``<service>/_service_event``, what ``ros2 bag record`` captures for a replay),
    #: "metadata" (the events without their contents) or "off"
    service_introspection: str = "contents"
    #: a ``sensor_msgs/JointState`` topic (a robot's ``/joint_states``) whose latest message
    #: seeds the IK requests that carry no ``seed_state``, as MoveIt's IK takes the robot's
    #: current state; empty: none
    joint_states_topic: str = ""
    #: s, a joint state older than this seeds nothing (the robot's state is not known)
    joint_states_max_age_s: float = 1.0
    ik: IKAdaptConfig = field(default_factory=IKAdaptConfig)  #: defaults of /mace/adapt_ik
    shape: ShapeCompletionConfig = field(default_factory=ShapeCompletionConfig)  #: shape service


def load_service_config(path: str, node_name: str = "mace") -> ServiceConfig:
    """Read a ROS 2 parameters YAML (``<node>: ros__parameters: {...}``) or a plain mapping."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    for key in (node_name, f"/{node_name}", "/**"):
        if isinstance(raw.get(key), dict) and "ros__parameters" in raw[key]:
            raw = raw[key]["ros__parameters"]
            break
    return from_dict(ServiceConfig, raw)
