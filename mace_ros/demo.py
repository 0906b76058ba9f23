"""``mace-demo``: start the mace node, ask it for IK solutions in the box scene and for the
completions of a partial box, draw both.

1. starts ``python -m mace_ros.node --ros-args --params-file config/panda.yaml`` in its own
   process (its log goes to ``out/mace_node.log``) and waits for ``/mace/adapt_ik``;
2. calls the service through a real ROS client with the scene's obstacles and a target at the
   centre of its target region, and prints the solutions and timings;
3. writes ``out/ik_box.png`` (the arm of each solution, the scene's boxes and the target),
   then asks MoveIt's question: one solution, the hand pointing down, near the robot's ready
   pose (``seed_state``);
4. makes a test box (edges drawn from a seed training never used), keeps what a plane cut leaves
   of it, calls ``/mace/complete_shape`` with that partial cloud (and once with 0 iterations, for
   samples of the unadapted prior), prints the completions and writes ``out/shape_box.png`` (the
   paper's Fig. 16: the observation over the hidden truth, prior samples and MACE's completions);
5. puts the same box on a table seen by a camera (the table's pose in the camera's frame given
   as ``support_pose``), asks where it stands and what it is (``infer_placement``), and writes
   ``out/shape_box_on_table.png``: the completions in the camera's frame over the observation;
6. stops the node (SIGINT, then SIGKILL if it does not exit).

Without ROS_DOMAIN_ID set, the demo picks a private domain so that it talks to its own node.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import numpy as np

#: Seconds to wait for the node's service (the node loads its models and warms up first).
SERVICE_WAIT_S = 60.0


def data_file(relative: str) -> str:
    """``relative`` under the working directory (a source checkout), else in the installed
    package's share folder."""
    if os.path.exists(relative):
        return os.path.abspath(relative)
    from ament_index_python.packages import get_package_share_directory

    return os.path.join(get_package_share_directory("mace_ros"), relative)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mace-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--params-file", default=None, help="default: config/panda.yaml")
    parser.add_argument("--scene", default=None, help="default: config/scenes/box.yaml")
    parser.add_argument("--models-dir", default=None,
                        help="overrides the params file's models_dir")
    parser.add_argument("--out", default="out", help="folder of the PNG and the node's log")
    parser.add_argument("-k", "--num-solutions", type=int, default=8)
    parser.add_argument("--time-budget", type=float, default=1.0, help="s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape-cut", default="random", choices=("top", "side", "random"),
                        help="what the plane cut hides of the box: its top half, one side, or "
                             "a random part")
    parser.add_argument("--shape-k", type=int, default=8, help="K completions of the box")
    parser.add_argument("--shape-budget", type=float, default=5.0, help="s")
    return parser


def start_node(params_file: str, models_dir: str | None, log_path: str) -> subprocess.Popen:
    """Start the node in its own process, its output into ``log_path``."""
    cmd = [sys.executable, "-m", "mace_ros.node", "--ros-args", "--params-file", params_file]
    if models_dir:
        cmd += ["-p", f"models_dir:={os.path.abspath(models_dir)}"]
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def stop_node(proc: subprocess.Popen, timeout_s: float = 10.0) -> int:
    """SIGINT, wait, then SIGKILL: the node's exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _tail(path: str, lines: int = 20) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def nearest_to_the_robot(client, args: argparse.Namespace, scene, target: np.ndarray) -> bool:
    """MoveIt's question: one solution for the target, near the robot's joints now (its ready
    pose as ``seed_state``), the hand pointing down; prints it and how far the arm moves."""
    from mace_core.robot.kinematics import PANDA_READY
    from mace_ros.client import format_solutions

    ready = np.array(PANDA_READY)
    down = np.diag([1.0, -1.0, -1.0])  # the hand's z axis along the base's -z
    t0 = time.monotonic()
    response = client.adapt_ik(target, scene.obstacles, rotation=down,
                               orientation_tolerance=1e-3, num_solutions=1,
                               time_budget_s=args.time_budget, seed=args.seed, seed_state=ready)
    print(f"[demo] one solution near the ready pose (seed_state), the hand pointing down: "
          f"response after {(time.monotonic() - t0) * 1e3:.0f} ms (round trip)")
    print(format_solutions(response))
    return response.success


def grasp_candidates(client, args: argparse.Namespace, scene, target: np.ndarray) -> bool:
    """A grasp planner's question: 12 candidate grasps around the target (the hand pointing
    down, turned about the vertical 30 degrees apart) in one /mace/adapt_ik_batch call; prints
    how many are reachable with K solutions each and the call's time."""
    from mace_core.robot.rotations import matrix_to_quaternion_xyzw

    poses = []
    for angle in np.arange(12) * np.pi / 6:
        c, s = np.cos(angle), np.sin(angle)
        turned = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag(
            [1.0, -1.0, -1.0])
        poses.append(np.concatenate([target, matrix_to_quaternion_xyzw(turned)]))
    t0 = time.monotonic()
    response = client.adapt_ik_batch(np.array(poses), scene.obstacles, num_solutions=4,
                                     time_budget_s=args.time_budget, seed=args.seed)
    print(f"[demo] 12 candidate grasps (hand down, turned 30 degrees apart) in one "
          f"/mace/adapt_ik_batch call: {response.message}, K = 4 each; response after "
          f"{(time.monotonic() - t0) * 1e3:.0f} ms (round trip)")
    return response.success


def complete_box(client, args: argparse.Namespace, num_samples: int) -> bool:
    """Complete a partial test box through ``/mace/complete_shape``; draw it with 3 samples of
    the prior (the node's ``shape.num_samples`` is ``num_samples``). True on success."""
    from mace_core.shape.benchmark import partial_box
    from mace_core.tensor import TensorSpec
    from mace_ros.client import format_shape_response
    from mace_ros.conversions import shape_result_from_msg
    from mace_ros.plotting import plot_shape_completions

    if not client.wait(SERVICE_WAIT_S, shape=True):
        print("[demo] /mace/complete_shape is not offered (shape_priors empty?)", file=sys.stderr)
        return False
    case, observed = partial_box(args.shape_cut, args.seed, TensorSpec())
    hidden = {"top": "its top half", "side": "one side", "random": "a random part"}
    print(f"[demo] test box {case.info['edges_m']} m (x, y, z), rotated "
          f"{case.info['angle_rad']:.2f} rad about z; a plane cut hides {hidden[args.shape_cut]}"
          f": {len(observed)} of {len(case.dense)} points observed, frame 'object'")
    obs = observed.numpy()
    t0 = time.monotonic()
    response = client.complete_shape(points=obs, prior="boxes", num_completions=args.shape_k,
                                     time_budget_s=args.shape_budget, seed=args.seed)
    print(f"[demo] response after {(time.monotonic() - t0) * 1e3:.0f} ms (round trip)")
    print(format_shape_response(response))
    # With 0 iterations and K = N the node answers all N prior draws (sorted by score): three
    # of them, picked at random, are plain samples of the prior p(x; θ_0) (Fig. 16a).
    prior = client.complete_shape(points=obs, prior="boxes", num_completions=num_samples,
                                  iterations=0, time_budget_s=args.shape_budget, seed=args.seed)
    if not (response.success and prior.success):
        print(f"[demo] completion failed: {response.message} / prior samples: {prior.message}",
              file=sys.stderr)
        return False
    result, prior_result = shape_result_from_msg(response), shape_result_from_msg(prior)
    pick = np.sort(np.random.default_rng(args.seed).choice(len(prior_result.scores), 3,
                                                           replace=False))
    png = plot_shape_completions(
        os.path.join(args.out, "shape_box.png"), result.completions.numpy(),
        result.scores.tolist(), obs, prior_samples=prior_result.completions.numpy()[pick],
        prior_scores=prior_result.scores.numpy()[pick].tolist(), truth=case.truth.numpy(),
        title=f"/mace/complete_shape: a box with {hidden[args.shape_cut]} hidden "
              f"(orange: observed points, grey: shape); edges "
              f"{', '.join(f'{e:.2f}' for e in case.info['edges_m'])} m; "
              f"{response.iterations_run} MACE iterations, {response.total_time:.1f} s")
    print(f"[demo] wrote {png}")
    return complete_box_on_table(client, args, case, observed.numpy())


def complete_box_on_table(client, args: argparse.Namespace, case, observed: np.ndarray) -> bool:
    """The test box put at (0.15, -0.1) on a table whose pose in the camera's frame is turned by
    30 degrees about z and 0.4 m up: the cloud goes in the camera's frame with the table's pose,
    and the completions come back there with where each one stands. True on success."""
    from mace_ros.conversions import shape_result_from_msg
    from mace_ros.plotting import plot_shape_completions

    yaw = np.radians(30.0)
    table = np.eye(4)
    table[:3, :3] = [[np.cos(yaw), -np.sin(yaw), 0.0], [np.sin(yaw), np.cos(yaw), 0.0],
                     [0.0, 0.0, 1.0]]
    table[:3, 3] = (0.3, -0.2, 0.4)
    where = np.array([0.15, -0.1, 0.0])

    def to_camera(points: np.ndarray) -> np.ndarray:
        return (points + where) @ table[:3, :3].T + table[:3, 3]

    response = client.complete_shape(points=to_camera(observed), prior="boxes",
                                     num_completions=4, time_budget_s=args.shape_budget,
                                     seed=args.seed, frame_id="camera", support_pose=table)
    if not response.success:
        print(f"[demo] completion on the table failed: {response.message}", file=sys.stderr)
        return False
    spot = response.placements[0].position
    truth = to_camera(np.zeros((1, 3)))[0]
    print(f"[demo] on the table: {response.message}; the best stands at ({spot.x:.3f}, "
          f"{spot.y:.3f}, {spot.z:.3f}) in 'camera', the box at ({truth[0]:.3f}, {truth[1]:.3f}, "
          f"{truth[2]:.3f})")
    result = shape_result_from_msg(response)
    off_mm = 1e3 * float(np.linalg.norm([spot.x - truth[0], spot.y - truth[1]]))
    png = plot_shape_completions(
        os.path.join(args.out, "shape_box_on_table.png"), result.completions.numpy(),
        result.scores.tolist(), to_camera(observed), truth=to_camera(case.truth.numpy()),
        title=f"/mace/complete_shape with infer_placement: the box on a table, in the camera's "
              f"frame; the best stands {off_mm:.0f} mm from the box; {response.total_time:.1f} s")
    print(f"[demo] wrote {png}")
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit status 0 when the node answered with collision-free solutions and
    shape completions."""
    args = _parser().parse_args(argv)
    if "ROS_DOMAIN_ID" not in os.environ:
        os.environ["ROS_DOMAIN_ID"] = str(os.getpid() % 90 + 10)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    # ROS and torch are imported after the environment is set, for the node and this client.
    import rclpy

    from mace_core.config import load_service_config
    from mace_core.robot.kinematics import RobotKinematics
    from mace_core.robot.scenes import load_scene
    from mace_core.tensor import TensorSpec
    from mace_ros.client import MaceClient, format_solutions
    from mace_ros.conversions import arm_points, ik_result_from_msg
    from mace_ros.plotting import plot_ik_solutions

    params_file = args.params_file or data_file("config/panda.yaml")
    scene_path = args.scene or data_file("config/scenes/box.yaml")
    scene = load_scene(scene_path)
    target = (np.asarray(scene.targets.min) + np.asarray(scene.targets.max)) / 2.0
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "mace_node.log")
    print(f"[demo] ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']}; starting the mace node "
          f"({params_file}), log: {log_path}")
    proc = start_node(params_file, args.models_dir, log_path)
    rclpy.init()
    client = MaceClient(node_name="mace_demo")
    try:
        t0 = time.monotonic()
        while not client.wait(0.5):
            if proc.poll() is not None:
                print(f"[demo] the node exited with status {proc.returncode}:\n"
                      f"{_tail(log_path)}", file=sys.stderr)
                return 1
            if time.monotonic() - t0 > SERVICE_WAIT_S:
                print(f"[demo] /mace/adapt_ik did not appear within {SERVICE_WAIT_S:.0f} s:\n"
                      f"{_tail(log_path)}", file=sys.stderr)
                return 1
        print(f"[demo] /mace/adapt_ik is up after {time.monotonic() - t0:.1f} s")
        print(f"[demo] scene '{scene.name}' ({len(scene.obstacles)} boxes), target "
              f"{np.round(target, 3).tolist()} (centre of its target region), "
              f"K={args.num_solutions}, budget {args.time_budget} s")
        t1 = time.monotonic()
        response = client.adapt_ik(target, scene.obstacles, num_solutions=args.num_solutions,
                                   time_budget_s=args.time_budget, seed=args.seed)
        print(f"[demo] response after {(time.monotonic() - t1) * 1e3:.0f} ms (round trip)")
        print(format_solutions(response))
        result = ik_result_from_msg(response)
        if result.solutions:
            kin = RobotKinematics.panda(TensorSpec())
            arms = arm_points(kin, np.stack([s.q for s in result.solutions]))
            labels = [f"#{i + 1} {'free' if s.collision_free else 'COLLIDES'}, "
                      f"error {s.position_error * 1e6:.1f} µm"
                      for i, s in enumerate(result.solutions)]
            png = plot_ik_solutions(
                os.path.join(args.out, f"ik_{scene.name}.png"), arms,
                [s.collision_free for s in result.solutions], scene.obstacles, target,
                title=f"MACE IK in scene '{scene.name}': {response.message}", labels=labels)
            print(f"[demo] wrote {png}")
        seeded_ok = nearest_to_the_robot(client, args, scene, target)
        batch_ok = grasp_candidates(client, args, scene, target)
        shape_ok = complete_box(client, args, load_service_config(params_file).shape.num_samples)
        return 0 if response.success and seeded_ok and batch_ok and shape_ok else 1
    except (TimeoutError, KeyboardInterrupt) as exc:
        print(f"[demo] {exc or 'interrupted'}", file=sys.stderr)
        return 1
    finally:
        client.close()
        rclpy.try_shutdown()
        print(f"[demo] node stopped (exit status {stop_node(proc)})")


if __name__ == "__main__":
    sys.exit(main())
