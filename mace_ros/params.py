"""The node's ROS parameters: one per field of :class:`mace_core.config.ServiceConfig`.

Names are the dotted paths of the flattened config (``ik.mace.num_samples``), so the nested
``config/panda.yaml`` (``mace: ros__parameters: {ik: {mace: {num_samples: ...}}}``) maps onto them
one to one. Defaults come from the dataclasses, descriptions from their ``#:`` comments.
:func:`config_from_parameters` is the one function that maps parameter values back onto the
config, and validates them.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import yaml
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.node import Node

from mace_core.config import ServiceConfig, flat_docs, from_flat, to_flat
from mace_core.errors import InvalidRequestError, MaceError
from mace_core.tensor import TensorSpec

#: Parameters fixed at start: the device and the models are loaded once, and the executor's
#: threads are sized from max_concurrent_waiting.
READ_ONLY = frozenset({"device", "torch_threads", "models_dir", "ik_model", "shape_priors",
                       "max_concurrent_waiting", "joint_states_topic"})


#: values of ``request_log_level``
REQUEST_LOG_LEVELS = ("debug", "info")


class ParameterError(MaceError, ValueError):
    """A parameter value the node cannot run with."""


def parameter_defaults() -> dict[str, Any]:
    """``{dotted.name: default}`` of every parameter, from the dataclasses."""
    return to_flat(ServiceConfig())


#: string parameters whose words YAML reads as booleans (``off``, ``on``): declared with dynamic
#: typing so that ``-p service_introspection:=off`` works, the boolean read back as the word
BOOLEAN_WORDS = {"service_introspection": {False: "off", True: "on"}}


def as_declared(name: str, value: Any) -> Any:
    """``value`` of parameter ``name`` as its dataclass field expects it (see
    :data:`BOOLEAN_WORDS`)."""
    if name in BOOLEAN_WORDS and isinstance(value, bool):
        return BOOLEAN_WORDS[name][value]
    return value


def declare_parameters(node: Node) -> ServiceConfig:
    """Declare every parameter on ``node`` (overrides from --params-file / -p apply).

    Raises:
        ParameterError: a value of the wrong type or out of range.
    """
    docs = flat_docs(ServiceConfig)
    for name, default in parameter_defaults().items():
        read_only = name in READ_ONLY
        descriptor = ParameterDescriptor(
            name=name, description=docs.get(name, "") + (" (read-only)" if read_only else ""),
            read_only=read_only, dynamic_typing=name in BOOLEAN_WORDS)
        try:
            node.declare_parameter(name, default, descriptor)
        except InvalidParameterTypeException as exc:
            hint = " (a double needs a decimal point: 2.0, not 2)" if isinstance(
                default, float) else ""
            raise ParameterError(f"parameter '{name}' must be a {type(default).__name__} like "
                                 f"its default {default!r}{hint}: {exc}") from exc
        except InvalidParameterValueException as exc:
            raise ParameterError(f"parameter '{name}': {exc}") from exc
    return config_from_parameters(current_values(node))


def current_values(node: Node) -> dict[str, Any]:
    """Values of every declared mace parameter on ``node``."""
    return {name: as_declared(name, node.get_parameter(name).value)
            for name in parameter_defaults()}


def unknown_overrides(names: list[str]) -> list[str]:
    """Names among ``names`` that are not mace parameters (typos in a params file)."""
    known = parameter_defaults()
    return sorted(n for n in names if n not in known and n != "use_sim_time"
                  and not n.startswith("qos_overrides.")
                  and n != "start_type_description_service")


def config_from_parameters(values: Mapping[str, Any]) -> ServiceConfig:
    """Build and validate a :class:`ServiceConfig` from ``{dotted.name: value}``.

    Raises:
        ParameterError: unknown names, wrong types or values out of range.
    """
    try:
        config = from_flat(ServiceConfig, dict(values))
    except InvalidRequestError as exc:
        raise ParameterError(str(exc)) from exc
    validate(config)
    return config


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ParameterError(f"parameter '{name}' must be {rule}, got {value!r}")


def validate(config: ServiceConfig) -> None:
    """Reject values the node cannot serve with; the message names the parameter.

    Raises:
        ParameterError: the first invalid value.
    """
    try:
        TensorSpec.resolve(config.device)
    except (ValueError, RuntimeError) as exc:
        raise ParameterError(f"parameter 'device': {exc}") from exc
    _check(config.torch_threads >= 0, "torch_threads", ">= 0", config.torch_threads)
    _check(bool(config.ik_model), "ik_model", "a registry name", config.ik_model)
    _check(config.max_concurrent_waiting >= 0, "max_concurrent_waiting", ">= 0",
           config.max_concurrent_waiting)
    _check(config.request_log_level in REQUEST_LOG_LEVELS, "request_log_level",
           f"one of {REQUEST_LOG_LEVELS}", config.request_log_level)
    _check(math.isfinite(config.joint_states_max_age_s) and config.joint_states_max_age_s > 0,
           "joint_states_max_age_s", "> 0", config.joint_states_max_age_s)
    try:
        config.ik.validate()
    except InvalidRequestError as exc:
        raise ParameterError(f"parameter ik.{exc}") from exc
    try:
        config.shape.validate()
    except InvalidRequestError as exc:
        raise ParameterError(f"parameter shape.{exc}") from exc


def node_key_matches(key: str, fully_qualified_name: str) -> bool:
    """Whether a parameters-file section ``key`` applies to a node, by rcl's rules.

    A key without a leading ``/`` is taken from the root; ``*`` stands for one name token and
    ``**`` for any number of them (``/**`` applies to every node).
    """
    key = key if key.startswith("/") else "/" + key
    pattern = ""
    for token in key.split("/")[1:]:
        if token == "**":
            pattern += "(/[^/]+)*"
        else:
            pattern += "/" + re.escape(token).replace(r"\*", "[^/]+")
    return re.fullmatch(pattern, fully_qualified_name) is not None


def params_file_mismatch(path: str, fully_qualified_name: str) -> str | None:
    """A warning when no section of the parameters file ``path`` applies to the node (None when
    one does, or when the file is not a mapping of sections)."""
    try:
        with open(path) as f:
            sections = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None  # rcl has read it already; nothing more to say here
    if not isinstance(sections, dict) or not sections:
        return None
    keys = [str(k) for k in sections]
    if any(node_key_matches(k, fully_qualified_name) for k in keys):
        return None
    return (f"parameters file {path}: none of its sections {keys} applies to this node "
            f"({fully_qualified_name}), so none of its values is used; key it '/**:' (every "
            f"node) or '{fully_qualified_name}:'")
