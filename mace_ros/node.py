"""The ``mace`` node: serves ``~/adapt_ik`` (collision-aware IK by MACE) and its markers,
``~/adapt_ik_batch`` (many targets in one call) and ``~/complete_shape`` (shape completion by
MACE-VAE).

Everything is built once at start (device, kinematics, collision spheres, the IK prior, the
adapter, the shape priors named in ``shape_priors`` and their completer) and warmed up; a missing
or corrupt model stops the node with a clear error and exit status 1. Callbacks only convert
(:mod:`mace_ros.conversions`), call the core and convert back.

Concurrency: the services are served by a :class:`~mace_ros.serving.ServiceLoop` (a thread that
takes every request off the wire at once and a pool that answers them; the node's own executor
keeps the parameters and clients); one :class:`RequestGate`, shared by the services, then
serves them one at a time in arrival order (the IK adapter tunes the prior's weights in place, and
both are heavy). Above ``max_concurrent_waiting`` waiting requests, a new one is answered at once
with ``success = false``, "busy: N requests waiting". Malformed requests are answered before
queueing. A request's time budget counts from its arrival, so the time it waits is part of it.

Shutdown: SIGINT and SIGTERM (Ctrl-C, ``ros2 launch``) are handled by :class:`ShutdownSignals`,
not by rclpy: the first one cancels the request being served and the waiting ones (each is
answered ``success = false``, "node shutting down"), then the node is destroyed and the process
exits with status 0, within about a second. Further signals change nothing.

    python -m mace_ros.node --ros-args --params-file config/panda.yaml -p device:=cpu
"""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Iterator

import numpy as np
import rclpy
import torch
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import SingleThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.service_introspection import ServiceIntrospectionState
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import JointState
from std_msgs.msg import Header
from visualization_msgs.msg import MarkerArray

from mace_core.config import ServiceConfig
from mace_core.deadline import Deadline
from mace_core.errors import InvalidRequestError, MaceError, quote
from mace_core.ik.adapter import IKAdapter
from mace_core.ik.batch import solve_batch
from mace_core.ik.refinement import IKTarget, Refiner
from mace_core.ik.request import IKRequest
from mace_core.robot.kinematics import RobotKinematics
from mace_core.shape.completion import ShapeCompleter, ShapeCompletionConfig
from mace_core.shape.vae import ShapePrior, load_shape_priors
from mace_core.tensor import TensorSpec
from mace_ros import conversions, params
from mace_ros.params import ParameterError
from mace_ros.latest import LatestJointState, LatestMarkers
from mace_ros.serving import ServiceLoop
from mace_ros.srv import AdaptIK, AdaptIKBatch, CompleteShape

#: A reachable target in free space, for the warm-up request (base frame, m).
WARMUP_TARGET = (0.4, 0.0, 0.4)
#: values of the ``service_introspection`` parameter
INTROSPECTION_STATES = ("off", "metadata", "contents")
#: MoveIt planning group of the Panda arm (moveit_resources_panda).
MOVEIT_GROUP = "panda_arm"
#: The shape priors' registry, in the models folder.
SHAPE_REGISTRY = "shape_registry.yaml"


#: Seconds the node waits, once shutting down, for cancelled requests to send their answers.
SHUTDOWN_GRACE_S = 1.0
#: The answer to requests cancelled or refused because the node is shutting down.
SHUTTING_DOWN = "node shutting down: the request was abandoned"


class BusyError(MaceError):
    """Too many requests are already waiting for their turn."""


class ShuttingDownError(MaceError):
    """The node is shutting down: no request is served any more."""

    def __init__(self, message: str = SHUTTING_DOWN):
        super().__init__(message)


class RequestGate:
    """Lets callers through one at a time, first come first served.

    A caller that would find more than ``max_waiting`` others waiting is refused with
    :class:`BusyError` at once instead of queueing. After :meth:`close`, waiting and new callers
    get :class:`ShuttingDownError`.
    """

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._next_ticket = 0  # next ticket to hand out
        self._serving = 0  # ticket whose turn it is
        self._closed = False

    def close(self) -> None:
        """Refuse every waiting and later caller (the one being served goes on)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        """Callers waiting for their turn (the one being served not counted)."""
        with self._cond:
            return max(self._next_ticket - self._serving - 1, 0)

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Block until it is this caller's turn; raises BusyError if the queue is full."""
        with self._cond:
            if self._closed:
                raise ShuttingDownError()
            admitted = self._next_ticket - self._serving  # running + waiting
            if admitted > self.max_waiting:
                raise BusyError(f"busy: {admitted - 1} requests waiting")
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(lambda: self._serving == ticket or self._closed)
            if self._closed:  # for good: the turns need no more counting
                raise ShuttingDownError()
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()


class MoveItRefiner:
    """:class:`~mace_core.ik.refinement.Refiner` calling MoveIt's ``/compute_ik`` once per seed.

    Each candidate seeds the request (``robot_state``); the pose asked for is the target position
    with the target orientation, or the candidate's own hand orientation for position-only
    requests. ``avoid_collisions`` is off: MACE re-checks every result for collision.
    """

    def __init__(self, node: Node, spec: TensorSpec, solver_timeout_s: float,
                 service: str = "/compute_ik", call_timeout_s: float = 1.0):
        from moveit_msgs.srv import GetPositionIK

        self._request_type = GetPositionIK.Request
        self._client = node.create_client(GetPositionIK, service,
                                          callback_group=ReentrantCallbackGroup())
        self.kin, self.service = RobotKinematics.panda(spec), service
        self.solver_timeout_s, self.call_timeout_s = solver_timeout_s, call_timeout_s

    def refine(self, q0: torch.Tensor, target: IKTarget, penalty=None,
               deadline: Deadline | None = None, needed: int | None = None,
               clear=None) -> torch.Tensor:
        """Refine each row of ``q0 (B, 7)``; rows MoveIt fails on come back unchanged.

        MoveIt is asked with ``avoid_collisions`` off (MACE re-checks every answer), so the
        collision ``penalty`` is not used, nor ``needed`` (every seed is tried); no call starts
        after ``deadline``, and none waits past it."""
        if not self._client.service_is_ready():
            raise InvalidRequestError(f"refinement 'moveit': MoveIt's {self.service} is not "
                                      f"available (is move_group running?)")
        seeds = q0.detach().cpu().double().numpy()
        if target.rotation is None:
            rotations = self.kin.ee_pose(q0)[:, :3, :3].detach().cpu().double().numpy()
        else:
            rotations = np.broadcast_to(target.rotation.cpu().double().numpy(),
                                        (len(seeds), 3, 3))
        position = target.position.cpu().double().numpy()
        out = seeds.copy()
        for b, seed in enumerate(seeds):
            wait_s = self.call_timeout_s
            if deadline is not None:
                if deadline.expired():
                    break
                wait_s = min(wait_s, deadline.remaining())
            request = conversions.fill_compute_ik_request(
                self._request_type(), seed, self.kin.joint_names, position, rotations[b],
                MOVEIT_GROUP, self.kin.ee_link, self.solver_timeout_s, self.kin.base_link)
            try:
                response = self._client.call(request, timeout_sec=wait_s)
            except TimeoutError:
                response = None
            q = conversions.joints_from_compute_ik(response, self.kin.joint_names)
            if q is not None:
                out[b] = q
        return torch.as_tensor(out, dtype=q0.dtype, device=q0.device)


def resolve_models_dir(models_dir: str) -> str:
    """``models_dir``, or the installed package's ``share/mace_ros/models`` when empty."""
    if models_dir:
        return os.path.abspath(os.path.expanduser(models_dir))
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

    try:
        return os.path.join(get_package_share_directory("mace_ros"), "models")
    except PackageNotFoundError as exc:
        raise ParameterError("parameter 'models_dir' is empty and the mace_ros package is not "
                             "in the ament index (AMENT_PREFIX_PATH): source scripts/env.sh or "
                             "set models_dir") from exc


class BudgetSpentError(MaceError):
    """A request's time budget ran out before its turn came."""


class MaceNode(Node):
    """The node named ``mace``: ``~/adapt_ik`` and ``~/complete_shape`` services,
    ``~/ik_solutions`` markers.

    ``params_files`` are the ``--params-file`` paths it was started with: it warns when none of
    a file's sections names it (a file keyed ``mace:`` under a namespace applies to nothing).
    """

    def __init__(self, params_files: tuple[str, ...] = (), **kwargs):
        super().__init__("mace", **kwargs)
        self._params_files = tuple(params_files)
        self._cancel = threading.Event()  # set once: cancels the request being served
        self._in_flight = 0  # service callbacks running (served or waiting)
        self._quiet_since: float | None = time.monotonic()  # none in flight since (monotonic)
        self._in_flight_lock = threading.Lock()
        try:
            self._build()
        except BaseException:
            self.destroy_node()
            raise

    def destroy_node(self) -> None:
        """Stop the services' loop and the markers' thread, then destroy the node."""
        service_loop = getattr(self, "_service_loop", None)
        if service_loop is not None:
            service_loop.stop()
        markers = getattr(self, "_markers", None)
        if markers is not None:
            markers.close()
        super().destroy_node()

    # -- start ---------------------------------------------------------------------------------

    def _build(self) -> None:
        t0 = time.perf_counter()
        log = self.get_logger()
        log.info("starting: loading the models and warming up")
        self.config = params.declare_parameters(self)
        unknown = params.unknown_overrides(list(getattr(self, "_parameter_overrides", {})))
        if unknown:
            log.warning(f"ignoring unknown parameters {unknown} (see config/panda.yaml)")
        for path in self._params_files:
            problem = params.params_file_mismatch(path, self.get_fully_qualified_name())
            if problem:
                log.warning(problem)
        if self.config.torch_threads > 0:
            torch.set_num_threads(self.config.torch_threads)
        self.spec = TensorSpec.resolve(self.config.device)
        self.models_dir = resolve_models_dir(self.config.models_dir)
        self._refiners: dict[str, Refiner] = {}
        if importlib.util.find_spec("moveit_msgs") is not None:
            self._refiners["moveit"] = MoveItRefiner(
                self, self.spec, self.config.ik.refinement.tracik_timeout)
        self._ik = self._build_ik(self.config)
        self._shape_priors = self._load_shape_priors(self.config.shape_priors)
        self._shape = self._build_shape(self.config.shape)
        warmup_s = self._warm_up()
        shape_warmup_s = self._warm_up_shape()

        self._gate = RequestGate(self.config.max_concurrent_waiting)
        self.num_threads = self.config.max_concurrent_waiting + 3  # running + waiting + spare
        requests_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST,
                                  depth=max(100, 4 * self.num_threads),
                                  reliability=ReliabilityPolicy.RELIABLE,
                                  durability=DurabilityPolicy.VOLATILE)
        self._service_loop = ServiceLoop(self, workers=self.num_threads)
        group = self._service_loop.callback_group
        self._adapt_ik_srv = self.create_service(
            AdaptIK, "~/adapt_ik", self._on_adapt_ik, qos_profile=requests_qos,
            callback_group=group)
        self._adapt_ik_batch_srv = self.create_service(
            AdaptIKBatch, "~/adapt_ik_batch", self._on_adapt_ik_batch,
            qos_profile=requests_qos, callback_group=group)
        self._complete_shape_srv = None
        if self._shape is not None:
            self._complete_shape_srv = self.create_service(
                CompleteShape, "~/complete_shape", self._on_complete_shape,
                qos_profile=requests_qos, callback_group=group)
        self._configure_introspection(self.config.service_introspection)
        for srv in (self._adapt_ik_srv, self._adapt_ik_batch_srv, self._complete_shape_srv):
            if srv is not None:
                self._service_loop.add(srv)
        self._joint_states = LatestJointState()
        if self.config.joint_states_topic:
            self.create_subscription(JointState, self.config.joint_states_topic,
                                     self._joint_states.offer, 10)
        self._service_loop.start()
        markers_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                                 reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._markers = LatestMarkers(
            self.create_publisher(MarkerArray, "~/ik_solutions", markers_qos),
            quiet_since=self.quiet_since)
        self.add_on_set_parameters_callback(self._check_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        shape = (f"{self._complete_shape_srv.service_name} with priors "
                 f"{sorted(self._shape_priors)}, warm-up {shape_warmup_s:.1f} s"
                 if self._complete_shape_srv else "no shape service (shape_priors is empty)")
        log.info(f"ready in {time.perf_counter() - t0:.1f} s: {self._adapt_ik_srv.service_name} "
                 f"(and {self._adapt_ik_batch_srv.service_name}) "
                 f"on {self.spec.device}, IK prior '{self.config.ik_model}' from "
                 f"{self.models_dir}, collision backend {self.config.ik.collision.backend} "
                 f"(padding {self.config.ik.collision.padding_m:g} m; "
                 f"{self._ik.checker.num_spheres} spheres for the penalty), refiners "
                 f"{sorted(self._ik.refiners)}, {self._pose_ik_path()}, warm-up "
                 f"{warmup_s * 1e3:.0f} ms; {shape}"
                 + (f"; requests without a seed_state seeded from "
                    f"{self.config.joint_states_topic}" if self.config.joint_states_topic
                    else ""))

    def _pose_ik_path(self) -> str:
        """Which solver answers requests with an orientation, for the start-up line."""
        ik = self.config.ik
        if ik.pose_refinement_mode in self._ik.refiners:
            if ik.pose_refinement_mode == "analytic":
                return "pose requests: closed form (the URDF is the Panda's chain)"
            return f"pose requests: {ik.pose_refinement_mode}"
        return (f"pose requests: {ik.refinement_mode} ({ik.pose_refinement_mode} unavailable: "
                f"the URDF is not the Panda's chain)")

    def _build_ik(self, config: ServiceConfig) -> IKAdapter:
        """An adapter loaded from the models folder, whose defaults are valid requests.

        Raises:
            ModelLoadError: missing or corrupt registry, weights or collision spheres.
            ParameterError: ik.* defaults that no request could be served with.
        """
        adapter = IKAdapter.from_models(self.models_dir, config.ik_model, config.ik, self.spec,
                                        refiners=self._refiners)
        try:
            adapter.effective_config(IKRequest(position=np.asarray(WARMUP_TARGET)))
        except InvalidRequestError as exc:
            raise ParameterError(f"invalid ik.* parameters: {exc}") from exc
        return adapter

    def _warm_up(self) -> float:
        """Serve one small request so that the first real one runs at full speed.

        Early stopping is off for it, so that the adaptation (autograd, Adam) runs too: its first
        call costs seconds on a CPU.
        """
        t0 = time.perf_counter()
        adapter, defaults = self._ik, self._ik.config
        adapter.config = replace(defaults, early_stop=False)
        try:
            adapter.solve(IKRequest(position=np.asarray(WARMUP_TARGET), num_solutions=1,
                                    iterations=min(1, defaults.mace.iterations), seed=0))
        finally:
            adapter.config = defaults
        return time.perf_counter() - t0

    def _load_shape_priors(self, names: str) -> dict[str, ShapePrior]:
        """The priors named in ``shape_priors`` (comma-separated; empty: none).

        Raises:
            ModelLoadError: a name not in the registry, a missing or corrupt weights file.
        """
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        if not wanted:
            return {}
        return load_shape_priors(os.path.join(self.models_dir, SHAPE_REGISTRY), self.spec,
                                 wanted)

    def _build_shape(self, config: ShapeCompletionConfig) -> ShapeCompleter | None:
        """A completer over the loaded priors (None without priors).

        Raises:
            ParameterError: shape.* values the completer refuses (ranges are checked by
                :func:`params.validate` already).
        """
        if not self._shape_priors:
            return None
        try:
            return ShapeCompleter(self._shape_priors, config, self.spec)
        except ValueError as exc:
            raise ParameterError(f"invalid shape.* parameters: {exc}") from exc

    def _warm_up_shape(self) -> float:
        """Warm the completer up (each prior and observation kind); seconds taken."""
        if self._shape is None:
            return 0.0
        t0 = time.perf_counter()
        self._shape.warmup()
        return time.perf_counter() - t0

    def _configure_introspection(self, state: str) -> None:
        """Service introspection of the services (``service_introspection``): events on
        ``<service>/_service_event`` that ``ros2 bag record`` captures for a replay."""
        states = dict(zip(INTROSPECTION_STATES, (
            ServiceIntrospectionState.OFF, ServiceIntrospectionState.METADATA,
            ServiceIntrospectionState.CONTENTS)))
        if state not in states:
            raise ParameterError(f"parameter 'service_introspection': one of "
                                 f"{INTROSPECTION_STATES}, got {state!r}")
        # depth 100: with depth 1, events were lost (../shared/ros2-from-pypi.md)
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
        for srv in (self._adapt_ik_srv, self._adapt_ik_batch_srv, self._complete_shape_srv):
            if srv is not None:
                srv.configure_introspection(self.get_clock(), qos, states[state])

    # -- parameters at run time ------------------------------------------------------------------

    def _check_parameters(self, changed) -> SetParametersResult:
        values = params.current_values(self)
        values.update({p.name: params.as_declared(p.name, p.value) for p in changed
                       if p.name in values})
        try:
            config = params.config_from_parameters(values)
            if config.service_introspection not in INTROSPECTION_STATES:
                raise ParameterError(f"parameter 'service_introspection': one of "
                                     f"{INTROSPECTION_STATES}, got "
                                     f"{config.service_introspection!r}")
            mode = config.ik.refinement_mode
            if mode != "none" and mode not in self._ik.refiners:
                raise ParameterError(f"parameter 'ik.refinement_mode': refinement '{mode}' is "
                                     f"not available here")
        except ParameterError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, changed) -> None:
        names = sorted(p.name for p in changed)
        try:
            config = params.config_from_parameters(params.current_values(self))
            adapter = self._build_ik(config)
            completer = (self._build_shape(config.shape) if config.shape != self.config.shape
                         else self._shape)
        except MaceError as exc:
            self.get_logger().error(f"parameters {names} set, but the IK or shape defaults could "
                                    f"not be rebuilt (still serving with the previous ones): "
                                    f"{exc}")
            return
        # requests in flight keep the previous adapter / completer
        if config.service_introspection != self.config.service_introspection:
            self._configure_introspection(config.service_introspection)
        self.config, self._ik, self._shape = config, adapter, completer
        self.get_logger().info(f"parameters changed: {names}")

    # -- services ------------------------------------------------------------------------------

    def _on_adapt_ik(self, request: AdaptIK.Request,
                     response: AdaptIK.Response) -> AdaptIK.Response:
        return self._serve("adapt_ik", self._adapt_ik, request, response)

    def _adapt_ik(self, request: AdaptIK.Request, response: AdaptIK.Response,
                  arrival: float) -> str:
        adapter = self._ik  # parameter changes swap in a new adapter; this request keeps its own
        kin = adapter.kin
        ik_request = self._with_robot_state(conversions.ik_request_from_msg(request,
                                                                            kin.base_link))
        with self._gate.turn():
            _check_budget_left(arrival, ik_request.time_budget_s)
            result = adapter.solve(ik_request, start=arrival, cancel=self._cancel)
            if self._cancel.is_set():
                raise ShuttingDownError()
            conversions.ik_result_to_msg(result, response)
            if self.config.publish_markers:
                header = Header(frame_id=kin.base_link, stamp=self.get_clock().now().to_msg())
                self._markers.offer(lambda: conversions.markers_from_ik_result(
                    result, kin, header, ik_request.position))
        return (f"target {np.round(ik_request.position, 3).tolist()}, "
                f"{len(ik_request.obstacles)} obstacles: {result.message}")

    def _with_robot_state(self, request: IKRequest | str) -> IKRequest | str:
        """``request`` seeded with the robot's joints now (``joint_states_topic``, when fresh)
        where it carries no ``seed_state``; a refused batch target (its reason) as it is."""
        if isinstance(request, str) or request.seed_state is not None:
            return request
        current = self._joint_states.fresh(self.config.joint_states_max_age_s)
        return request if current is None else replace(request, seed_state=current)

    def _on_adapt_ik_batch(self, request: AdaptIKBatch.Request,
                           response: AdaptIKBatch.Response) -> AdaptIKBatch.Response:
        return self._serve("adapt_ik_batch", self._adapt_ik_batch, request, response)

    def _adapt_ik_batch(self, request: AdaptIKBatch.Request, response: AdaptIKBatch.Response,
                        arrival: float) -> str:
        adapter = self._ik  # parameter changes swap in a new adapter; this request keeps its own
        requests, budget = conversions.ik_batch_requests_from_msg(
            request, adapter.kin.base_link, adapter.config.limits.max_time_budget_s)
        requests = [self._with_robot_state(r) for r in requests]
        with self._gate.turn():
            _check_budget_left(arrival, budget)
            answers = solve_batch(adapter, requests, budget, start=arrival, cancel=self._cancel)
            if self._cancel.is_set():
                raise ShuttingDownError()
        conversions.ik_batch_answers_to_msg(answers, response)
        response.total_time = time.perf_counter() - arrival
        return f"{len(requests)} targets: {response.message}"

    def _on_complete_shape(self, request: CompleteShape.Request,
                           response: CompleteShape.Response) -> CompleteShape.Response:
        return self._serve("complete_shape", self._complete_shape, request, response)

    def _complete_shape(self, request: CompleteShape.Request,
                        response: CompleteShape.Response, arrival: float) -> str:
        completer = self._shape  # parameter changes swap in a new one; this request keeps its own
        shape_request = conversions.shape_request_from_msg(request)
        header = conversions.shape_request_header(request)
        support = conversions.support_transform(request)
        if shape_request.points is None:  # contacts carry no stamp: answer with the time now
            header.stamp = self.get_clock().now().to_msg()
        with self._gate.turn():
            _check_budget_left(arrival, shape_request.time_budget_s)
            result = completer.complete(shape_request, start=arrival, cancel=self._cancel)
            if self._cancel.is_set():
                raise ShuttingDownError()
        conversions.shape_result_to_msg(result, header, response, support)
        if shape_request.points is not None:
            n, limit = len(shape_request.points), completer.config.max_input_points
            what = f"{n}-point cloud in {quote(header.frame_id)}"
            if n > limit:
                response.message += (f"; the cloud has {n} points, more than shape."
                                     f"max_input_points = {limit}: a random subset of {limit} "
                                     f"was used")
        else:
            what = f"{len(shape_request.contacts)} contacts in {quote(header.frame_id)}"
        return f"prior {quote(shape_request.prior)}, {what}: {response.message}"

    def _serve(self, name: str, handler: Callable[[object, object, float], str], request,
               response):
        """Run ``handler(request, response, arrival)``; a failure answers a fresh response with
        success = false."""
        arrival = time.perf_counter()  # the request's time budget counts from here
        log = self.get_logger()
        with self._in_flight_lock:
            self._in_flight += 1
            self._quiet_since = None
        try:
            summary = handler(request, response, arrival)
            if self.config.request_log_level == "info":
                log.info(f"{name}: {summary}")
            else:
                log.debug(f"{name}: {summary}")
            return response
        except (BusyError, ShuttingDownError, BudgetSpentError) as exc:
            message = str(exc)
            log.warning(f"{name}: {message}")
        except MaceError as exc:
            message = str(exc)
            log.warning(f"{name}: rejected: {message}")
        except Exception as exc:  # noqa: BLE001 - keep serving; the traceback goes to the log
            message = f"internal error: {type(exc).__name__}: {exc}"
            log.error(f"{name}: internal error\n{traceback.format_exc()}")
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._quiet_since = time.monotonic()
        failed = type(response)()
        failed.success, failed.message = False, message
        return failed

    def quiet_since(self) -> float | None:
        """``time.monotonic()`` when the last request in flight ended (or the node started);
        None while one is in flight."""
        with self._in_flight_lock:
            return self._quiet_since

    @property
    def requests_in_flight(self) -> int:
        """Service callbacks running now (being served or waiting for their turn)."""
        with self._in_flight_lock:
            return self._in_flight

    # -- shutdown ------------------------------------------------------------------------------

    def shut_down(self, executor: SingleThreadedExecutor, reason: str) -> bool:
        """Cancel the request being served and the waiting ones, let their answers ("node
        shutting down") go out, stop the services' loop and ``executor`` and destroy the node.

        Returns False when a request did not end within ``SHUTDOWN_GRACE_S``; the node is then
        left to the process's exit (destroying it under a running callback can crash).
        """
        busy = self.requests_in_flight
        self.get_logger().info(f"{reason}: shutting down" + (
            f", abandoning {busy} request(s) in progress or waiting" if busy else ""))
        self._cancel.set()
        self._gate.close()
        end = time.monotonic() + SHUTDOWN_GRACE_S
        while self.requests_in_flight and time.monotonic() < end:
            time.sleep(0.01)
        if self.requests_in_flight:
            self.get_logger().warning(f"{self.requests_in_flight} request(s) still running after "
                                      f"{SHUTDOWN_GRACE_S:.1f} s; exiting without waiting")
            self._service_loop.stop(wait_for_workers=False)
            executor.shutdown(timeout_sec=0)
            return False
        self._service_loop.stop()  # joins the workers: every answer is sent
        executor.shutdown(timeout_sec=0)
        if busy:
            time.sleep(0.1)  # the last answers leave before their service is destroyed
        self.destroy_node()
        return True


def _check_budget_left(arrival: float, budget_s: float | None) -> None:
    """Raise BudgetSpentError when a request's (valid) budget ran out while it waited."""
    waited = time.perf_counter() - arrival
    if budget_s is not None and math.isfinite(budget_s) and 0 < budget_s <= waited:
        raise BudgetSpentError(f"time budget of {budget_s:.3g} s ran out while the request "
                               f"waited {waited:.2f} s for its turn (requests are served one at "
                               "a time)")


class StartInterrupted(BaseException):
    """A shutdown signal arrived while the node was still starting (not an error)."""


class ShutdownSignals:
    """SIGINT and SIGTERM for the node's process, in place of rclpy's and Python's handlers.

    While the node starts, the first signal raises :class:`StartInterrupted` (the start is
    abandoned); afterwards it only sets :attr:`requested`, which the spin loop of :func:`main`
    checks, so that shutdown runs in order (:meth:`MaceNode.shut_down`) and no
    KeyboardInterrupt can strike in the middle of it. Later signals change nothing.
    """

    def __init__(self):
        self.requested = threading.Event()  #: set by the first signal
        self.name = ""  #: that signal's name
        self.starting = True  #: while True, the first signal raises StartInterrupted

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested.is_set():
            return
        self.requested.set()
        self.name = signal.Signals(signum).name
        if self.starting:
            raise StartInterrupted(self.name)


def params_files_in(argv: list[str]) -> tuple[str, ...]:
    """The ``--params-file`` paths among the ROS arguments of ``argv``."""
    files, in_ros_args = [], False
    for i, arg in enumerate(argv):
        if arg == "--ros-args":
            in_ros_args = True
        elif arg == "--":
            in_ros_args = False
        elif in_ros_args and arg == "--params-file" and i + 1 < len(argv):
            files.append(argv[i + 1])
    return tuple(files)


def main(args: list[str] | None = None) -> int:
    """Run the node until SIGINT / SIGTERM or shutdown: exit status 0, or 1 when it cannot start.

    The spin loop wakes every 0.1 s to see whether a signal asked for shutdown.
    """
    argv = list(sys.argv if args is None else args)
    signals = ShutdownSignals()
    signals.install()
    log = rclpy.logging.get_logger("mace")
    node = None
    try:
        try:
            rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
        except _rclpy.RCLError as exc:  # e.g. a --params-file that cannot be read
            log.fatal(f"cannot start: {exc}")
            return 1
        node = MaceNode(params_files=params_files_in(argv))
        signals.starting = False
    except MaceError as exc:
        log.fatal(f"cannot start: {exc}")
        rclpy.try_shutdown()
        return 1
    except StartInterrupted as exc:
        log.info(f"{exc}: start abandoned")
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        _exit_now(0)
    executor = SingleThreadedExecutor()  # parameters and clients; the services have their loop
    executor.add_node(node)
    while not signals.requested.is_set() and rclpy.ok():
        executor.spin_once(timeout_sec=0.1)
    if node.shut_down(executor, signals.name or "rclpy shut down"):
        rclpy.try_shutdown()
        log.info("stopped")
    # Everything that needs closing is closed (or, when a callback is stuck, must not be
    # touched): skip the interpreter's teardown of the models, about a second of the 2 s that
    # a stop may take.
    _exit_now(0)
    return 0  # not reached


def _exit_now(status: int) -> None:
    """Flush the output and end the process at once (no interpreter teardown)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
