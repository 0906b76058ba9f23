"""A small Python API and CLI for the mace node's ``/mace/adapt_ik`` and ``/mace/complete_shape``.

    client = MaceClient()                      # after rclpy.init()
    response = client.adapt_ik([0.55, 0.0, 0.12], scene="config/scenes/box.yaml", num_solutions=4)
    response = client.complete_shape(points=partial_cloud, prior="boxes", num_completions=8)

    mace-client ik --scene config/scenes/box.yaml --target 0.55 0 0.12 -k 8
    mace-client ik --scene config/scenes/box.yaml --target 0.55 0 0.12 --seed-from /joint_states
    mace-client ik --target 0.5 0 0.4 --orientation 1 0 0 0 --ik-link panda_link8
    mace-client ik --scene config/scenes/box.yaml --targets-file grasps.yaml -k 4
    mace-client shape --prior boxes --cut top -k 8 --png out/shape.png
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

import numpy as np
import rclpy
from rclpy.node import Node
from rclpy.utilities import remove_ros_args
from rclpy.wait_for_message import wait_for_message
from sensor_msgs.msg import JointState

from mace_core.errors import InvalidRequestError, MaceError
from mace_core.ik.request import IKRequest
from mace_core.robot.scenes import Obstacle, load_scene, quaternion_xyzw_to_matrix
from mace_core.shape.benchmark import (BOX_CUTS, GRASP_CENTERS, GRASP_DIRECTIONS, grasp_contacts,
                                       partial_box)
from mace_core.shape.completion import ShapeCompletionRequest
from mace_core.tensor import TensorSpec
from mace_ros.conversions import (BASE_FRAME, ik_batch_request_to_msg, ik_request_to_msg,
                                  points_from_cloud, pose_msg, seed_state_from_msg,
                                  shape_request_to_msg)
from mace_ros import serving
from mace_ros.srv import AdaptIK, AdaptIKBatch, CompleteShape

#: Seconds a call may wait beyond its time budget (queueing behind other requests, transport).
CALL_MARGIN_S = 30.0
#: Frame of the clouds and contacts the CLI sends (the prior's frame: see the registry).
OBJECT_FRAME = "object"
#: Finger radius of ``mace-client shape --grasp`` on a box, m (the boxes prior's default).
BOX_FINGER_RADIUS_M = 0.02


class MaceClient:
    """Calls ``/mace/adapt_ik``, ``/mace/adapt_ik_batch`` and ``/mace/complete_shape`` from its
    own node, no executor (safe to use one per thread).

    Call :func:`rclpy.init` first; :meth:`close` destroys the node.
    """

    def __init__(self, service: str = "/mace/adapt_ik", node_name: str = "mace_client",
                 base_frame: str = BASE_FRAME, shape_service: str | None = None):
        """``shape_service`` defaults to ``complete_shape`` next to ``service``; the batch
        service is ``service`` + ``_batch``."""
        self.node = Node(node_name)
        self.base_frame = base_frame
        if shape_service is None:
            shape_service = service.rsplit("/", 1)[0] + "/complete_shape"
        # no executor: each call waits on its own client (mace_ros.serving.call)
        group = serving.NeverExecutedGroup()
        self._client = self.node.create_client(AdaptIK, service, callback_group=group)
        self._shape_client = self.node.create_client(CompleteShape, shape_service,
                                                     callback_group=group)
        self._batch_client = self.node.create_client(AdaptIKBatch, service + "_batch",
                                                     callback_group=group)

    def wait(self, timeout_s: float = 30.0, shape: bool = False) -> bool:
        """True once ``adapt_ik`` (or ``complete_shape`` with ``shape``) is available (False
        after ``timeout_s``)."""
        client = self._shape_client if shape else self._client
        return client.wait_for_service(timeout_sec=timeout_s)

    def call(self, request: AdaptIK.Request | AdaptIKBatch.Request | CompleteShape.Request,
             timeout_s: float):
        """Send a ready-made request (any of the three services') and wait for its response.

        Waits for the service first: a request sent before the server is discovered is lost.

        Raises:
            TimeoutError: no service, or no response within ``timeout_s``.
        """
        client = (self._shape_client if isinstance(request, CompleteShape.Request)
                  else self._batch_client if isinstance(request, AdaptIKBatch.Request)
                  else self._client)
        if not client.wait_for_service(timeout_sec=timeout_s):
            raise TimeoutError(f"{client.srv_name} is not available (is the node running, "
                               f"with the same ROS_DOMAIN_ID?)")
        return serving.call(client, request, timeout_s)

    def joint_state(self, topic: str = "/joint_states", timeout_s: float = 5.0) -> np.ndarray:
        """The arm's ``(7,)`` joints (panda_joint1..7, rad) from the next ``JointState`` on
        ``topic`` (a robot's ``/joint_states``: joints by name, the fingers ignored), for
        ``adapt_ik(..., seed_state=...)``.

        Raises:
            TimeoutError: no message within ``timeout_s``.
            InvalidRequestError: the message lacks an arm joint.
        """
        got, msg = wait_for_message(JointState, self.node, topic, time_to_wait=timeout_s)
        if not got:
            raise TimeoutError(f"no sensor_msgs/JointState on {topic} within {timeout_s:g} s")
        state = seed_state_from_msg(msg)
        if state is None:
            raise InvalidRequestError(f"the JointState on {topic} holds no position")
        return state

    def adapt_ik(self, position: Sequence[float], obstacles: Sequence[Obstacle] = (),
                 scene: str | None = None, rotation: np.ndarray | None = None,
                 num_solutions: int = 8, time_budget_s: float = 1.0,
                 **overrides) -> AdaptIK.Response:
        """Ask for ``num_solutions`` configurations reaching ``position`` (base frame, m).

        Args:
            position: (3,) target of the end effector.
            obstacles: obstacles in the base frame; a ``scene`` file's obstacles are added.
            scene: path of a scene YAML (``config/scenes/*.yaml``).
            rotation: (3, 3) target orientation, or None for position-only.
            num_solutions: K.
            time_budget_s: wall-clock budget of the request, s.
            **overrides: other :class:`~mace_core.ik.request.IKRequest` fields (iterations,
                refinement, objective, num_samples, quantile, gradient_steps, learning_rate,
                seed, orientation_tolerance, seed_state, ik_link).
        """
        obstacles = list(obstacles) + (list(load_scene(scene).obstacles) if scene else [])
        request = IKRequest(position=np.asarray(position, dtype=float), obstacles=obstacles,
                            rotation=rotation, num_solutions=num_solutions,
                            time_budget_s=time_budget_s, **overrides)
        return self.call(ik_request_to_msg(request, self.base_frame),
                         timeout_s=time_budget_s + CALL_MARGIN_S)

    def adapt_ik_batch(self, targets: np.ndarray, obstacles: Sequence[Obstacle] = (),
                       scene: str | None = None, num_solutions: int = 8,
                       time_budget_s: float = 1.0, **fields) -> AdaptIKBatch.Response:
        """Ask for ``num_solutions`` configurations at each of ``targets`` in one call
        (``/mace/adapt_ik_batch``, next to ``adapt_ik``): ``(N, 3)`` positions or ``(N, 7)``
        poses (x, y, z, qx, qy, qz, qw), base frame; ``time_budget_s`` per target. ``fields``:
        total_time_budget_s (the whole batch's; 0: the node's default), orientation_tolerance,
        ik_link, seed, seed_state (:func:`~mace_ros.conversions.ik_batch_request_to_msg`).
        One answer per target."""
        obstacles = list(obstacles) + (list(load_scene(scene).obstacles) if scene else [])
        msg = ik_batch_request_to_msg(targets, obstacles, num_solutions, time_budget_s,
                                      base_frame=self.base_frame, **fields)
        whole = msg.total_time_budget or len(msg.targets) * time_budget_s
        return self.call(msg, timeout_s=whole + CALL_MARGIN_S)

    def complete_shape(self, points=None, viewpoint=None, contacts=None, directions=None,
                       prior: str = "boxes", num_completions: int = 8,
                       time_budget_s: float = 5.0, frame_id: str = OBJECT_FRAME,
                       support_pose: np.ndarray | None = None,
                       **overrides) -> CompleteShape.Response:
        """Ask for ``num_completions`` full shapes that explain one observation.

        Give either ``points`` (a partial cloud, optionally with the camera's ``viewpoint``) or
        ``contacts`` with ``directions``, in ``frame_id``: the prior's frame and units (boxes:
        metres, standing on the xy plane centred on the z axis; see
        ``models/shape_registry.yaml``). The completions come back in the same frame.

        Args:
            points: (P, 3) partial cloud.
            viewpoint: (3,) camera position, or None.
            contacts: (k, 3) fingertip contact points.
            directions: (k, 3) finger motion directions.
            prior: registry name of the prior.
            num_completions: K.
            time_budget_s: wall-clock budget of the request, s.
            frame_id: frame of the observation (echoed on the completions).
            support_pose: (4, 4) pose of the table the object stands on, in ``frame_id``: the
                cloud may then be in any frame, and where the object stands is inferred
                (``infer_placement``; the response's ``placements`` and ``scales``).
            **overrides: other :class:`~mace_core.shape.completion.ShapeCompletionRequest`
                fields (grasp_center, finger_radius, iterations, seed).
        """
        request = ShapeCompletionRequest(prior=prior, points=points, viewpoint=viewpoint,
                                         contacts=contacts, directions=directions,
                                         num_completions=num_completions,
                                         time_budget_s=time_budget_s, **overrides)
        msg = shape_request_to_msg(request, frame_id)
        if support_pose is not None:
            msg.infer_placement, msg.support_pose = True, pose_msg(support_pose)
        return self.call(msg, timeout_s=time_budget_s + CALL_MARGIN_S)

    def close(self) -> None:
        """Destroy the client's node."""
        self.node.destroy_node()


def format_solutions(response: AdaptIK.Response) -> str:
    """A text table of a response: one row per solution, then the stage timings."""
    lines = [f"success: {response.success}  message: {response.message}"]
    if not response.solutions:
        return lines[0]
    lines.append(f"{'#':>2} {'free':>5} {'pos err mm':>10} {'rot err deg':>11} "
                 f"{'clear mm':>8}  joints (rad)")
    for i, sol in enumerate(response.solutions):
        joints = " ".join(f"{v:+.3f}" for v in sol.positions)
        lines.append(f"{i + 1:>2} {str(sol.collision_free):>5} "
                     f"{sol.position_error * 1e3:>10.4f} "
                     f"{np.degrees(sol.orientation_error):>11.3f} "
                     f"{sol.clearance * 1e3:>8.1f}  {joints}")
    lines.append(
        f"valid fraction: prior {response.valid_fraction_prior:.3f} -> adapted "
        f"{response.valid_fraction_adapted:.3f} ({response.iterations_run} MACE iterations)")
    lines.append(f"{'stage':<11} {'ms':>7}")
    for stage in ("sampling", "adaptation", "refinement", "total"):
        lines.append(f"{stage:<11} {getattr(response, stage + '_time') * 1e3:>7.1f}")
    return "\n".join(lines)


def format_batch_answers(response: AdaptIKBatch.Response) -> str:
    """A text table of an AdaptIKBatch response: one row per target (its best solution)."""
    lines = [f"success: {response.success}  message: {response.message}  "
             f"({response.total_time * 1e3:.1f} ms)"]
    for i, answer in enumerate(response.answers):
        best = (" ".join(f"{v:+.3f}" for v in answer.solutions[0].positions)
                if answer.solutions else "-")
        lines.append(f"{i:>3} {str(answer.success):>5} {len(answer.solutions):>2} solutions, "
                     f"{answer.total_time * 1e3:6.1f} ms  best: {best}  ({answer.message})")
    return "\n".join(lines)


def format_shape_response(response: CompleteShape.Response) -> str:
    """A text table of a CompleteShape response: one row per completion (its score and the
    extent of its bounding box in the observation's frame), then the stage timings."""
    lines = [f"success: {response.success}  message: {response.message}"]
    if not response.completions:
        return lines[0]
    frame = response.completions[0].header.frame_id
    lines.append(f"{'#':>2} {'score':>6} {'points':>6}  bounding box extent x, y, z "
                 f"(frame '{frame}')")
    for i, (cloud, score) in enumerate(zip(response.completions, response.scores)):
        pts = points_from_cloud(cloud)
        extent = pts.max(axis=0) - pts.min(axis=0)
        lines.append(f"{i + 1:>2} {score:>6.3f} {len(pts):>6}  "
                     + " ".join(f"{v:.3f}" for v in extent))
    lines.append(f"{response.iterations_run} MACE iterations")
    lines.append(f"{'stage':<11} {'ms':>7}")
    for stage in ("sampling", "adaptation", "total"):
        lines.append(f"{stage:<11} {getattr(response, stage + '_time') * 1e3:>7.1f}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mace-client", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ik = sub.add_parser("ik", help="call /mace/adapt_ik and print the solutions")
    ik.add_argument("--scene", help="scene YAML: its obstacles (and its targets' centre)")
    ik.add_argument("--target", type=float, nargs=3, metavar=("X", "Y", "Z"),
                    help="end-effector target in panda_link0, m (default: the scene's centre)")
    ik.add_argument("--orientation", type=float, nargs=4, metavar=("QX", "QY", "QZ", "QW"),
                    help="target orientation (x, y, z, w); default: position-only")
    ik.add_argument("--orientation-tolerance", type=float, default=0.0, help="rad")
    ik.add_argument("-k", "--num-solutions", type=int, default=8)
    ik.add_argument("--time-budget", type=float, default=1.0, help="s")
    ik.add_argument("--iterations", type=int, help="MACE iterations T (0: prior only)")
    ik.add_argument("--refinement", choices=("none", "dls", "tracik", "moveit"))
    ik.add_argument("--seed", type=int)
    ik.add_argument("--seed-state", type=float, nargs=7, metavar="Q",
                    help="the robot's joints now, rad (panda_joint1..7): the nearest solution "
                         "first, the rest by their distance from it")
    ik.add_argument("--seed-from", metavar="TOPIC",
                    help="take the seed state from the next sensor_msgs/JointState on TOPIC "
                         "(e.g. /joint_states)")
    ik.add_argument("--targets-file", metavar="FILE",
                    help="YAML list of poses [x, y, z, qx, qy, qz, qw] in panda_link0: all asked "
                         "for in one /mace/adapt_ik_batch call, --time-budget each")
    ik.add_argument("--ik-link", default="",
                    help="the link --target (and --orientation) is for: a link rigidly "
                         "attached to the end effector, e.g. panda_link8 (needs --orientation)")
    ik.add_argument("--service", default="/mace/adapt_ik")
    ik.add_argument("--wait", type=float, default=10.0, help="s to wait for the service")
    shape = sub.add_parser(
        "shape", help="call /mace/complete_shape on a partial cloud and print the completions",
        description="The observation is a partial cloud of a random test box cut by a plane "
                    "(--cut, boxes prior), a .npy file of points (--points), or the contacts of "
                    "5 fingers on the box (--grasp). Coordinates are in the prior's frame.")
    shape.add_argument("--prior", default="boxes", help="registry name of the shape prior")
    shape.add_argument("--cut", choices=BOX_CUTS, default="random",
                       help="which part of the box stays visible: top hides the top half, side "
                            "one side of a vertical plane, random a random plane's far side")
    shape.add_argument("--edges", type=float, nargs=3, metavar=("X", "Y", "Z"),
                       help="box edge lengths, m (default: random in 0.1-0.5 m)")
    shape.add_argument("--box-seed", type=int, default=0, help="seeds the box and the cut")
    shape.add_argument("--points", help=".npy file of a (P, 3) partial cloud, instead of a box")
    shape.add_argument("--viewpoint", type=float, nargs=3, metavar=("X", "Y", "Z"),
                       help="camera position sent with --points")
    shape.add_argument("--grasp", action="store_true",
                       help="send the contacts of 5 fingers on the box (paper Sec. 4.1)")
    shape.add_argument("--frame", default=OBJECT_FRAME, help="frame_id of the observation")
    shape.add_argument("-k", "--num-completions", type=int, default=8)
    shape.add_argument("--time-budget", type=float, default=5.0, help="s")
    shape.add_argument("--iterations", type=int, help="MACE iterations T (0: prior only)")
    shape.add_argument("--seed", type=int)
    shape.add_argument("--png", help="draw the observation over the completions to this PNG")
    shape.add_argument("--service", default="/mace/complete_shape")
    shape.add_argument("--wait", type=float, default=10.0, help="s to wait for the service")
    return parser


def _shape_observation(args: argparse.Namespace) -> tuple[dict, np.ndarray | None]:
    """The observation fields of ``mace-client shape`` and the hidden truth (None for a file)."""
    if args.points:
        points = np.load(args.points)
        obs = dict(points=points)
        if args.viewpoint is not None:
            obs["viewpoint"] = np.asarray(args.viewpoint, dtype=float)
        return obs, None
    case, observed = partial_box(args.cut, args.box_seed, TensorSpec(), edges=args.edges)
    print(f"box edges {case.info['edges_m']} m, rotated {case.info['angle_rad']:.2f} rad about "
          f"z; {'5-finger grasp' if args.grasp else f'{args.cut} cut'}: "
          f"{len(observed) if not args.grasp else 5} "
          f"{'contacts' if args.grasp else 'points'} sent")
    if args.grasp:
        directions = np.asarray(GRASP_DIRECTIONS)
        center = np.asarray(GRASP_CENTERS["boxes"])
        contacts = grasp_contacts(case.dense, directions, BOX_FINGER_RADIUS_M, center)
        return dict(contacts=contacts.numpy(), directions=directions, grasp_center=center,
                    finger_radius=BOX_FINGER_RADIUS_M), case.truth.numpy()
    return dict(points=observed.numpy()), case.truth.numpy()


def _main_shape(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        obs, truth = _shape_observation(args)
    except (MaceError, OSError, ValueError) as exc:
        print(f"mace-client: {exc}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("iterations", args.iterations), ("seed", args.seed))
                 if v is not None}

    def ask(client: MaceClient) -> int:
        response = client.complete_shape(prior=args.prior, num_completions=args.num_completions,
                                         time_budget_s=args.time_budget, frame_id=args.frame,
                                         **obs, **overrides)
        print(format_shape_response(response))
        if args.png and response.completions:
            from mace_ros.plotting import plot_shape_completions

            clouds = np.stack([points_from_cloud(c) for c in response.completions])
            observed = obs.get("points", obs.get("contacts"))
            plot_shape_completions(args.png, clouds, list(response.scores), observed,
                                   truth=truth, contact_directions=obs.get("directions"),
                                   title=f"/mace/complete_shape, prior '{args.prior}': "
                                         f"{response.message[:90]}")
            print(f"wrote {args.png}")
        return 0 if response.success else 1
    return _with_service(argv, args.service, args.wait, shape=True, ask=ask)


def _with_service(argv: list[str], service: str, wait_s: float, shape: bool,
                  ask: Callable[[MaceClient], int]) -> int:
    """Start rclpy, wait for ``service``, run ``ask`` with the client and shut down: its exit
    status, or 2 when the service is missing, the call times out or is interrupted, or what it
    read is refused."""
    rclpy.init(args=argv)
    client = MaceClient(shape_service=service) if shape else MaceClient(service)
    try:
        if not client.wait(wait_s, shape=shape):
            print(f"mace-client: {service} is not available (is the node running, "
                  f"with the same ROS_DOMAIN_ID?)", file=sys.stderr)
            return 2
        return ask(client)
    except (TimeoutError, KeyboardInterrupt, MaceError) as exc:
        print(f"mace-client: {exc or 'interrupted'}", file=sys.stderr)
        return 2
    finally:
        client.close()
        rclpy.try_shutdown()


def main(argv: list[str] | None = None) -> int:
    """``mace-client ik|shape ...``: exit status 0 on success, 1 on a failed request, 2
    otherwise."""
    argv = sys.argv if argv is None else argv
    args = _parser().parse_args(remove_ros_args(argv)[1:])
    if args.command == "shape":
        return _main_shape(args, argv)
    try:
        scene = load_scene(args.scene) if args.scene else None
        targets = None
        if args.targets_file:
            from mace_core.ik.benchmark import load_pose_targets

            targets = load_pose_targets(args.targets_file)
        elif args.target is None and scene is None:
            print("mace-client: give --target, --scene or --targets-file", file=sys.stderr)
            return 2
        target = args.target if args.target is not None or scene is None else (
            (np.asarray(scene.targets.min) + np.asarray(scene.targets.max)) / 2.0)
        rotation = (None if args.orientation is None
                    else np.asarray(quaternion_xyzw_to_matrix(args.orientation)))
    except MaceError as exc:
        print(f"mace-client: {exc}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("iterations", args.iterations),
                                   ("refinement", args.refinement), ("seed", args.seed),
                                   ("seed_state", args.seed_state),
                                   ("ik_link", args.ik_link or None))
                 if v is not None}

    def ask(client: MaceClient) -> int:
        if args.seed_from:
            overrides["seed_state"] = client.joint_state(args.seed_from)
        if args.targets_file:
            batch = client.adapt_ik_batch(
                targets, obstacles=scene.obstacles if scene else (),
                num_solutions=args.num_solutions, time_budget_s=args.time_budget,
                orientation_tolerance=args.orientation_tolerance or 1e-3,
                **{k: v for k, v in overrides.items() if k in ("seed", "seed_state", "ik_link")})
            print(format_batch_answers(batch))
            return 0 if batch.success else 1
        response = client.adapt_ik(
            target, obstacles=scene.obstacles if scene else (), rotation=rotation,
            orientation_tolerance=args.orientation_tolerance, num_solutions=args.num_solutions,
            time_budget_s=args.time_budget, **overrides)
        print(format_solutions(response))
        return 0 if response.success else 1
    return _with_service(argv, args.service, args.wait, shape=False, ask=ask)


if __name__ == "__main__":
    sys.exit(main())
