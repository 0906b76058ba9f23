"""``mace-bench fuzz``: extreme and malformed requests to the node's services, over DDS.

Every numeric field of ``/mace/adapt_ik``, ``/mace/adapt_ik_batch`` and ``/mace/complete_shape``
(and of their obstacles,
poses, clouds and contacts) is set, one at a time and then several at once, to 0, -1, NaN, ±inf,
±1e38, ±1e300 and its integer type's extremes; strings get empty, 10,000-character and
non-ASCII values. Fields with a declared limit (``config/panda.yaml``'s ``ik.limits``, ``shape``)
are also set to that limit, the most a request may ask for, so that accepted requests run as
long as their budget lets them. What must never happen is counted:

- a hang (no answer within the request's budget plus ``call_margin_s``),
- a crash (the node's process exits; it is then restarted),
- an internal error (an answer whose message starts "internal error"),
- a success answer carrying a NaN or inf number,
- a message longer than ``max_message_chars`` (rejections quote inputs briefly),

and every answer's overshoot (client-side latency minus the request's budget; a refused budget
counts as 0 s) is recorded. With ``start_node`` the fuzzer runs the node itself (it then sees
crashes); otherwise it calls a running one.

    mace-bench fuzz --requests 1000 --seed 0 --json out/fuzz.json
"""

from __future__ import annotations

import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

#: Float values every float field is tried with.
FLOATS = (0.0, -1.0, math.nan, math.inf, -math.inf, 1e38, -1e38, 1e300, -1e300)
#: Values of each integer type (its extremes, and the small ones with a meaning: 0, -1).
INTEGERS = {
    "uint8": (0, 255), "uint32": (0, 1, 4294967295),
    "int32": (-2147483648, -2, -1, 0, 2147483647),
    "int64": (-2 ** 63, -2, -1, 0, 2 ** 63 - 1),
}
#: String values every string field is tried with.
STRINGS = ("", "x" * 10_000, "\u00e9\u4e2d\u6587 /../", "dls ")
#: The largest time budget either service accepts, s (config/panda.yaml's limits).
MAX_BUDGET_S = 30.0


@dataclass
class FuzzConfig:
    """Settings of one fuzzing run."""

    requests: int = 1000  #: requests sent in all (single-field mutations first)
    seed: int = 0  #: seeds the order of the single mutations and the combined ones
    namespace: str = "/mace"  #: the node's services are ``<namespace>/adapt_ik`` ...
    ik_budget_s: float = 0.3  #: s, budget of the unmutated IK request
    shape_budget_s: float = 0.5  #: s, budget of the unmutated shape request
    call_margin_s: float = 10.0  #: s beyond the budget before an answer counts as a hang
    max_message_chars: int = 1000  #: longer messages are counted
    scene: str = "config/scenes/cabinet.yaml"  #: obstacles of the IK requests (the hardest)
    params_file: str = ""  #: the node's parameters, whose limits are tried too; "": none


@dataclass
class Mutation:
    """One field of a request set to one value."""

    service: str  #: "ik", "batch" or "shape"
    path: str  #: dotted path in the request message, with [i] indices; see :func:`set_path`
    value: Any  #: the value written

    def __str__(self) -> str:
        shown = repr(self.value)
        return f"{self.path}={shown if len(shown) <= 40 else shown[:37] + '...'}"


@dataclass
class FuzzRecord:
    """One request and what came back."""

    service: str
    mutations: list[str]
    answered: bool
    success: bool = False
    latency_s: float = math.nan
    budget_s: float = 0.0  #: the request's budget when valid, else 0 (it must be refused)
    overshoot_s: float = math.nan  #: latency - budget
    message: str = ""  #: the first 300 characters
    message_chars: int = 0
    internal_error: bool = False
    nonfinite_success: bool = False
    crashed: bool = False


@dataclass
class FuzzSummary:
    """The counts that must be 0, and the overshoot figures."""

    requests: int = 0
    answered: int = 0
    successes: int = 0
    hangs: int = 0
    crashes: int = 0
    internal_errors: int = 0
    nonfinite_successes: int = 0
    long_messages: int = 0
    longest_message_chars: int = 0
    worst_overshoot_s: float = -math.inf
    worst_overshoot_request: str = ""
    p99_overshoot_s: float = math.nan
    fields: int = 0  #: distinct fields mutated
    wall_s: float = 0.0


# ------------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"([A-Za-z_]\w*)(?:\[(\d+)\])?")


def set_path(msg, path: str, value) -> None:
    """Set ``msg.<path> = value`` for a dotted path with list indices (``a.b[2].c``)."""
    parts = _TOKEN.findall(path)
    target = msg
    for k, (name, index) in enumerate(parts):
        last = k == len(parts) - 1
        if index == "":
            if last:
                setattr(target, name, value)
            else:
                target = getattr(target, name)
        else:
            seq = getattr(target, name)
            if last:
                seq[int(index)] = value
            else:
                target = seq[int(index)]


def base_ik_request(scene_path: str, budget_s: float):
    """A valid AdaptIK request: K = 16 at the centre of the scene's target region, position
    only, refinement "none": MACE alone, so that its iterations run into the budget; the robot
    at its ready pose (``seed_state``)."""
    from mace_core.ik.request import IKRequest
    from mace_core.robot.kinematics import PANDA_READY
    from mace_core.robot.scenes import load_scene
    from mace_ros.conversions import ik_request_to_msg

    scene = load_scene(scene_path)
    target = (np.asarray(scene.targets.min) + np.asarray(scene.targets.max)) / 2.0
    msg = ik_request_to_msg(IKRequest(position=target, obstacles=list(scene.obstacles),
                                      num_solutions=16, time_budget_s=budget_s, seed=0,
                                      refinement="none", seed_state=PANDA_READY))
    msg.target.pose.orientation.w = 1.0
    return msg


def base_batch_request(scene_path: str, budget_s: float):
    """A valid AdaptIKBatch request: two position targets (the centre of the scene's target
    region and 5 cm above it), K = 4, ``budget_s`` a target, the robot at its ready pose."""
    from mace_core.robot.kinematics import PANDA_READY
    from mace_core.robot.scenes import load_scene
    from mace_ros.conversions import ik_batch_request_to_msg

    scene = load_scene(scene_path)
    target = (np.asarray(scene.targets.min) + np.asarray(scene.targets.max)) / 2.0
    msg = ik_batch_request_to_msg(np.stack([target, target + [0.0, 0.0, 0.05]]),
                                  scene.obstacles, num_solutions=4, time_budget_s=budget_s,
                                  seed=0, seed_state=np.asarray(PANDA_READY))
    for t in msg.targets:
        t.pose.orientation.w = 1.0
    return msg


def base_shape_request(budget_s: float, contacts: bool):
    """A valid CompleteShape request on the boxes prior: a box's lower half, or 5 contacts."""
    from mace_core.shape.benchmark import (GRASP_CENTERS, GRASP_DIRECTIONS, grasp_contacts,
                                           partial_box)
    from mace_core.shape.completion import ShapeCompletionRequest
    from mace_core.tensor import TensorSpec
    from mace_ros.conversions import shape_request_to_msg

    case, observed = partial_box("top", 0, TensorSpec())
    if contacts:
        directions = np.asarray(GRASP_DIRECTIONS)
        center = np.asarray(GRASP_CENTERS["boxes"])
        points = grasp_contacts(case.dense, directions, 0.02, center).numpy()
        request = ShapeCompletionRequest(prior="boxes", contacts=points, directions=directions,
                                         grasp_center=center, finger_radius=0.02,
                                         num_completions=4, time_budget_s=budget_s, seed=0)
    else:
        request = ShapeCompletionRequest(prior="boxes", points=observed.numpy()[::8],
                                         num_completions=4, time_budget_s=budget_s, seed=0)
    return shape_request_to_msg(request, "object")


def _ik_fields() -> list[tuple[str, str]]:
    """(path, type) of every AdaptIK request field fuzzed."""
    fields = [(f"target.pose.position.{a}", "float") for a in "xyz"]
    fields += [(f"target.pose.orientation.{a}", "float") for a in "xyzw"]
    fields += [("orientation_tolerance", "float"), ("time_budget", "float"),
               ("quantile", "float"), ("learning_rate", "float"),
               ("num_solutions", "uint32"), ("num_samples", "uint32"),
               ("gradient_steps", "uint32"), ("iterations", "int32"), ("seed", "int64"),
               ("refinement", "string"), ("objective", "string"),
               ("target.header.frame_id", "string"), ("obstacles[1].id", "string"),
               ("obstacles[1].header.frame_id", "string")]
    fields += [(f"obstacles[1].primitives[0].dimensions[{j}]", "float") for j in range(3)]
    fields += [(f"obstacles[1].primitive_poses[0].position.{a}", "float") for a in "xyz"]
    fields += [(f"obstacles[1].primitive_poses[0].orientation.{a}", "float") for a in "xw"]
    fields += [("obstacles[1].primitives[0].type", "uint8")]
    fields += [(f"seed_state.position[{j}]", "float") for j in (0, 3)]
    fields += [("seed_state.name[6]", "string"), ("ik_link_name", "string")]
    return fields


def _batch_fields() -> list[tuple[str, str]]:
    """(path, type) of every AdaptIKBatch request field fuzzed."""
    fields = [(f"targets[0].pose.position.{a}", "float") for a in "xyz"]
    fields += [(f"targets[1].pose.orientation.{a}", "float") for a in "xw"]
    fields += [("orientation_tolerance", "float"), ("time_budget", "float"),
               ("total_time_budget", "float"), ("num_solutions", "uint32"), ("seed", "int64"),
               ("ik_link_name", "string"), ("targets[1].header.frame_id", "string"),
               ("obstacles[1].primitives[0].dimensions[0]", "float"),
               ("seed_state.position[3]", "float")]
    return fields


def _shape_fields() -> list[tuple[str, str]]:
    """(path, type) of every CompleteShape request field fuzzed; ``cloud*`` and ``cloud.point``
    are the whole cloud scaled by the value and one point's z set to it."""
    fields = [("cloud*", "float"), ("cloud.point", "float"),
              ("cloud.width", "uint32"), ("cloud.height", "uint32"),
              ("cloud.point_step", "uint32"), ("cloud.row_step", "uint32"),
              ("cloud.fields[2].offset", "uint32"), ("cloud.fields[0].datatype", "uint8"),
              ("cloud.fields[1].count", "uint32"), ("cloud.header.frame_id", "string"),
              ("time_budget", "float"), ("num_completions", "uint32"),
              ("iterations", "int32"), ("seed", "int64"), ("prior", "string")]
    fields += [(f"viewpoint.{a}", "float") for a in "xyz"]
    fields += [(f"contact_points[0].{a}", "float") for a in "xyz"]
    fields += [(f"contact_directions[1].{a}", "float") for a in "xyz"]
    fields += [(f"grasp_center.{a}", "float") for a in "xyz"]
    fields += [("finger_radius", "float"), ("contacts_frame", "string")]
    return fields


def _values(kind: str) -> tuple:
    return FLOATS if kind == "float" else STRINGS if kind == "string" else INTEGERS[kind]


def limit_values(params_file: str) -> dict[tuple[str, str], tuple]:
    """``{(service, path): values}``: the largest value each limited field accepts, read
    from the node's parameters file, and the other choices of string fields (the base IK
    request refines with "none"; objective "is" weighs every sample). The request's
    own budget is kept: a 30 s budget with a K the node cannot find would last 30 s."""
    from mace_core.config import load_service_config

    config = load_service_config(params_file)
    ik, shape = config.ik.limits, config.shape
    return {("ik", "num_solutions"): (ik.max_solutions,),
            ("ik", "num_samples"): (ik.max_samples,),
            ("ik", "iterations"): (ik.max_iterations,),
            ("ik", "gradient_steps"): (ik.max_gradient_steps,),
            ("ik", "learning_rate"): (ik.max_learning_rate,),
            ("ik", "refinement"): ("dls", "tracik"), ("ik", "objective"): ("is",),
            ("ik", "ik_link_name"): ("panda_link8", "panda_grasptarget"),
            ("batch", "num_solutions"): (ik.max_solutions,),
            ("batch", "time_budget"): (ik.max_time_budget_s,),
            ("batch", "total_time_budget"): (ik.max_time_budget_s,),
            ("shape", "num_completions"): (shape.max_completions,),
            ("shape", "iterations"): (shape.max_iterations,),
            ("shape", "finger_radius"): (shape.max_finger_radius,)}


def single_mutations(limits: dict[tuple[str, str], tuple] | None = None) -> list[Mutation]:
    """Every fuzzed field of both services with every value of its type, and with its limit
    where ``limits`` (see :func:`limit_values`) has one."""
    limits = limits or {}
    out = []
    for service, fields in (("ik", _ik_fields()), ("batch", _batch_fields()),
                            ("shape", _shape_fields())):
        for path, kind in fields:
            values = _values(kind) + limits.get((service, path), ())
            out += [Mutation(service, path, v) for v in values]
    return out


def schedule(config: FuzzConfig) -> list[list[Mutation]]:
    """``config.requests`` requests: the single mutations in a seeded order, then random
    combinations of 2 or 3 mutations of one service."""
    rng = random.Random(config.seed)
    singles = single_mutations(limit_values(config.params_file) if config.params_file else None)
    rng.shuffle(singles)
    plan = [[m] for m in singles[:config.requests]]
    by_service = {s: [m for m in singles if m.service == s] for s in ("ik", "batch", "shape")}
    while len(plan) < config.requests:
        pool = by_service[rng.choice(("ik", "batch", "shape"))]
        plan.append(rng.sample(pool, rng.choice((2, 3))))
    return plan


class RequestBuilder:
    """Fresh base requests with mutations applied (the bases are built once and copied)."""

    def __init__(self, config: FuzzConfig):
        self.config = config
        self._ik = base_ik_request(config.scene, config.ik_budget_s)
        self._batch = base_batch_request(config.scene, config.ik_budget_s)
        self._cloud = base_shape_request(config.shape_budget_s, contacts=False)
        self._contacts = base_shape_request(config.shape_budget_s, contacts=True)

    def build(self, mutations: list[Mutation]):
        """The service, request and applied mutations of one plan entry.

        Shape requests on contact fields use the contacts base, where cloud fields do not
        exist (those mutations are left out); a viewpoint field sets ``has_viewpoint``, an
        orientation one ``use_orientation``."""
        import copy

        from mace_core.errors import InvalidRequestError
        from mace_ros.conversions import cloud_from_points, points_from_cloud

        service = mutations[0].service
        if service in ("ik", "batch"):
            msg = copy.deepcopy(self._ik if service == "ik" else self._batch)
        else:
            contact = any(m.path.startswith(("contact", "grasp", "finger")) for m in mutations)
            msg = copy.deepcopy(self._contacts if contact else self._cloud)
        applied: list[Mutation] = []
        for m in mutations:
            if "pose.orientation" in m.path or m.path == "orientation_tolerance":
                msg.use_orientation = True
            if m.path.startswith("viewpoint"):
                msg.has_viewpoint = True
                msg.viewpoint.x, msg.viewpoint.y, msg.viewpoint.z = 1.0, 0.5, 0.8
            if m.path in ("cloud*", "cloud.point"):
                try:
                    points = points_from_cloud(msg.cloud, skip_nans=False)
                except InvalidRequestError:  # an earlier mutation broke (or emptied) the cloud
                    continue
                if len(points) == 0:
                    continue
                with np.errstate(all="ignore"):  # 1e300 (inf in float32), inf * 0: as meant
                    if m.path == "cloud*":
                        points = points * m.value
                    else:
                        points[0, 2] = m.value
                    msg.cloud = cloud_from_points(points, msg.cloud.header)
            else:
                try:
                    set_path(msg, m.path, m.value)
                except (IndexError, AttributeError):  # a cloud field of a contacts request
                    continue
            applied.append(m)
        return service, msg, applied


# ------------------------------------------------------------------------------------------------
# Judging answers
# ------------------------------------------------------------------------------------------------

def request_budget(msg) -> float:
    """The budget a valid request runs under, s; 0 for a budget the node must refuse (and the
    node's default of 1 s for IK is never in play here: the base requests set one)."""
    from mace_core.ik.batch import default_total_budget

    budget = float(msg.time_budget)
    if hasattr(msg, "total_time_budget"):  # a batch: the whole call's
        budget = (float(msg.total_time_budget)
                  or (default_total_budget(len(msg.targets), budget, MAX_BUDGET_S) if budget > 0
                      else budget))
    return budget if 0.0 < budget <= MAX_BUDGET_S else 0.0


def nonfinite_numbers(service: str, response) -> bool:
    """Whether a response carries a NaN or inf anywhere (joint values, scores, times, points)."""
    from mace_ros.conversions import points_from_cloud

    values = [response.total_time]
    if service == "batch":
        for answer in response.answers:
            values.append(answer.total_time)
            for sol in answer.solutions:
                values += list(sol.positions) + [sol.score, sol.position_error,
                                                 sol.orientation_error, sol.clearance]
    elif service == "ik":
        values += [response.valid_fraction_prior, response.valid_fraction_adapted,
                   response.sampling_time, response.adaptation_time, response.refinement_time]
        for sol in response.solutions:
            values += list(sol.positions) + [sol.score, sol.position_error,
                                             sol.orientation_error, sol.clearance]
    else:
        values += list(response.scores) + [response.sampling_time, response.adaptation_time]
        for cloud in response.completions:
            if not np.isfinite(points_from_cloud(cloud, skip_nans=False)).all():
                return True
    return not all(math.isfinite(float(v)) for v in values)


def summarize(records: list[FuzzRecord], config: FuzzConfig, wall_s: float) -> FuzzSummary:
    """The counts over ``records``."""
    answered = [r for r in records if r.answered]
    over = sorted(r.overshoot_s for r in answered)
    worst = max(answered, key=lambda r: r.overshoot_s, default=None)
    fields = {m.split("=")[0] for r in records for m in r.mutations}
    return FuzzSummary(
        requests=len(records), answered=len(answered),
        successes=sum(r.success for r in answered),
        hangs=sum(not r.answered and not r.crashed for r in records),
        crashes=sum(r.crashed for r in records),
        internal_errors=sum(r.internal_error for r in answered),
        nonfinite_successes=sum(r.nonfinite_success for r in answered),
        long_messages=sum(r.message_chars > config.max_message_chars for r in answered),
        longest_message_chars=max((r.message_chars for r in answered), default=0),
        worst_overshoot_s=worst.overshoot_s if worst else math.nan,
        worst_overshoot_request=(f"{worst.service}: {', '.join(worst.mutations)}"
                                 if worst else ""),
        p99_overshoot_s=over[min(len(over) - 1, int(0.99 * len(over)))] if over else math.nan,
        fields=len(fields), wall_s=wall_s)


def format_summary(s: FuzzSummary) -> str:
    """The summary as a few lines."""
    return "\n".join([
        f"fuzz: {s.requests} requests over {s.fields} fields in {s.wall_s:.0f} s: "
        f"{s.answered} answered ({s.successes} success, {s.answered - s.successes} refused or "
        f"not found)",
        f"  hangs {s.hangs}, crashes {s.crashes}, internal errors {s.internal_errors}, "
        f"success with NaN/inf {s.nonfinite_successes}, messages over the limit "
        f"{s.long_messages} (longest {s.longest_message_chars} characters)",
        f"  overshoot beyond the budget: worst {s.worst_overshoot_s * 1e3:.0f} ms "
        f"({s.worst_overshoot_request}), p99 {s.p99_overshoot_s * 1e3:.0f} ms",
    ])


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------

class FuzzedNode:
    """The node in a child process (``python -m mace_ros.node``), restarted after a crash."""

    def __init__(self, params_file: str, namespace: str, log_path: str):
        self.cmd = [sys.executable, "-m", "mace_ros.node", "--ros-args", "--params-file",
                    params_file, "-r", f"__ns:={namespace.rsplit('/', 1)[0] or '/'}"]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None


def run_fuzz(config: FuzzConfig, node: FuzzedNode | None = None,
             log: Callable[[str], None] = print) -> tuple[FuzzSummary, list[FuzzRecord]]:
    """Send the plan's requests one at a time (rclpy must be initialised) and judge each."""
    from mace_ros.client import MaceClient

    client = MaceClient(f"{config.namespace}/adapt_ik", node_name="mace_fuzz")
    builder = RequestBuilder(config)
    records: list[FuzzRecord] = []
    t_run = time.monotonic()
    try:
        if not (client.wait(120.0) and client.wait(120.0, shape=True)):
            raise TimeoutError(f"{config.namespace} services are not available")
        for n, mutations in enumerate(schedule(config)):
            service, msg, applied = builder.build(mutations)
            budget = request_budget(msg)
            record = FuzzRecord(service=service, mutations=[str(m) for m in applied],
                                answered=False, budget_s=budget)
            t0 = time.monotonic()
            try:
                response = client.call(msg, timeout_s=budget + config.call_margin_s)
            except TimeoutError:
                response = None
            record.latency_s = time.monotonic() - t0
            if response is not None:
                record.answered = True
                record.success = bool(response.success)
                record.overshoot_s = record.latency_s - budget
                record.message_chars = len(response.message)
                record.message = response.message[:300]
                record.internal_error = response.message.startswith("internal error")
                record.nonfinite_success = record.success and nonfinite_numbers(service,
                                                                                response)
            if node is not None and not node.alive():
                record.crashed = True
                log(f"[fuzz] the node exited (status {node.proc.returncode}) on request {n}: "
                    f"{record.mutations}; restarting it")
                node.start()
                client.wait(120.0)
                client.wait(120.0, shape=True)
            records.append(record)
            if not record.answered and not record.crashed:
                log(f"[fuzz] no answer in {budget + config.call_margin_s:.0f} s to {service}: "
                    f"{record.mutations}")
            if (n + 1) % 100 == 0:
                log(f"[fuzz] {n + 1} requests, {time.monotonic() - t_run:.0f} s")
    finally:
        client.close()
    return summarize(records, config, time.monotonic() - t_run), records


def _default_params_file() -> str:
    local = os.path.join("config", "panda.yaml")
    if os.path.isfile(local):
        return local
    from ament_index_python.packages import get_package_share_directory

    return os.path.join(get_package_share_directory("mace_ros"), "config", "panda.yaml")


def add_parser(sub) -> None:
    """The ``fuzz`` subcommand of ``mace-bench``."""
    import argparse

    d = FuzzConfig()
    p = sub.add_parser("fuzz", help="extreme and malformed requests to the node, over DDS",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", default="", help="write the summary and every request here")
    p.add_argument("--namespace", default="/mace",
                   help="with --no-start: the running node's services are "
                        "<namespace>/adapt_ik, ... (a node started here serves /fuzz/mace/)")
    p.add_argument("--no-start", action="store_true",
                   help="call a running node (--namespace /mace) instead of starting one")
    p.add_argument("--params-file", default="", help="the node's parameters, whose limits "
                   "are tried as values (default: config/panda.yaml here, else the installed "
                   "package's)")
    p.add_argument("--node-log", default="", help="the started node's output (default: a "
                   "temporary file)")
    p.add_argument("--scene", default=d.scene)
    p.set_defaults(func=run_command)


def run_command(args) -> int:
    """Run ``mace-bench fuzz``: exit status 0 when every count that must be 0 is 0."""
    import json

    import rclpy

    namespace = args.namespace if args.no_start else "/fuzz/mace"
    params_file = args.params_file or _default_params_file()
    config = FuzzConfig(requests=args.requests, seed=args.seed, namespace=namespace,
                        scene=args.scene, params_file=params_file)
    node = None
    if not args.no_start:
        log_path = args.node_log or tempfile.mkstemp(prefix="mace_fuzz_", suffix=".log")[1]
        node = FuzzedNode(params_file, namespace, log_path)
        print(f"[fuzz] started the node (output in {log_path})")
    rclpy.init()
    try:
        summary, records = run_fuzz(config, node)
    finally:
        rclpy.try_shutdown()
        status = node.stop() if node is not None else None
    print(format_summary(summary))
    if node is not None:
        print(f"[fuzz] the node exited with status {status} on SIGINT")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": asdict(config), "summary": asdict(summary),
                       "records": [asdict(r) for r in records]}, f, indent=1)
        print(f"[fuzz] wrote {args.json}")
    bad = (summary.hangs + summary.crashes + summary.internal_errors
           + summary.nonfinite_successes + summary.long_messages)
    return 0 if bad == 0 else 1


__all__ = ["FuzzConfig", "FuzzRecord", "FuzzSummary", "Mutation", "add_parser",
           "format_summary", "limit_values", "run_fuzz", "schedule", "single_mutations"]
