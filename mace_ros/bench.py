"""``mace-bench``: benchmarks of the mace core, one subcommand per capability.

``mace-bench ik --scene config/scenes/box.yaml --targets 20 --seed 0 --json out/bench_box.json``
runs MACE and the TRAC-IK restarts baseline on one scene (see :mod:`mace_core.ik.benchmark`);
``--protocol table1`` runs the paper's Table 1 protocol instead.
``mace-bench shape --prior boxes --cases 20 --seed 0 --json out/bench_shape_boxes.json`` runs
shape completion (MACE-VAE against the prior) on held-out shapes (see
:mod:`mace_core.shape.benchmark`). Both run in-process, without ROS.
``mace-bench record --scene config/scenes/box.yaml --targets 20 --out BAG`` writes a bag of
``/mace/adapt_ik`` request events (MCAP, as ``ros2 bag record`` captures them from the node's
service introspection) for targets drawn like the benchmark's (see :mod:`mace_ros.bags`).
``mace-bench paper --table 2`` runs the paper's Table 2 (IK against MoveIt in the box scene) and
prints it beside the paper's figures (see :mod:`mace_core.ik.paper_tables`); ``--table 1`` the
same for Table 1.
``mace-bench fuzz --requests 1000 --seed 0 --json out/fuzz.json`` starts the node and sends it
extreme and malformed requests over DDS, counting hangs, crashes, internal errors and non-finite
answers (see :mod:`mace_ros.fuzz`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

from mace_core.config import ServiceConfig, load_service_config
from mace_core.errors import MaceError
from mace_core.ik.adapter import IKAdapter
from mace_core.ik.baselines import TRACIK_ORIENTATIONS
from mace_core.ik.benchmark import (METHODS, POSE_METHODS, PROTOCOLS, TABLE1_METHODS,
                                    TARGET_KINDS, IKBenchmarkConfig, run_benchmark,
                                    table1_service_config)
from mace_core.ik.benchmark_report import format_table
from mace_core.ik.request import IKAdaptConfig
from mace_core.robot.kinematics import PANDA_READY
from mace_core.robot.scenes import load_scene
from mace_core.tensor import TensorSpec
from mace_ros import fuzz
from mace_ros import shipped

#: the IK prior of the paper's architecture (App. B: 5 x 200 per joint), the paper tables'
PAPER_IK_PRIOR = "panda_ik"


def _add_ik_parser(sub) -> None:
    d = IKBenchmarkConfig()
    p = sub.add_parser("ik", help="collision-aware IK: MACE vs TRAC-IK restarts on a scene",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scene", default="",
                   help="scene YAML (format of config/scenes/); every protocol but "
                        "prior-accuracy needs one")
    p.add_argument("--targets", type=int, default=d.num_targets, help="number of targets")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds targets and requests")
    p.add_argument("--json", default="", help="write the report to this file")
    p.add_argument("--protocol", choices=PROTOCOLS + ("prior-accuracy", "batch"),
                   default=d.protocol,
                   help="requests: K solutions per target; table1: the paper's Table 1; "
                        "prior-accuracy: raw samples of --ik-prior (comma-separated names) "
                        "at uniform configurations' hand poses (aVIPS thesis Table 5.1); "
                        "batch: --targets in one batch (/mace/adapt_ik_batch's path, in "
                        "process), valid solutions per second")
    p.add_argument("--poses", type=int, default=10_240, help="prior-accuracy: target poses")
    p.add_argument("--samples-per-pose", type=int, default=25,
                   help="prior-accuracy: draws per pose")
    p.add_argument("--figure", default="",
                   help="prior-accuracy: PNG of each prior's raw samples at one hand pose (the "
                        "ready pose's), arms drawn (aVIPS thesis Fig. 5.1); <stem>_<prior>.png")
    p.add_argument("--methods", default="",
                   help=f"comma-separated subset (requests: {','.join(METHODS)}; "
                        f"table1: {','.join(TABLE1_METHODS)})")
    p.add_argument("--models-dir", default="",
                   help="folder of registry.yaml, the weights and panda_spheres.yaml "
                        "(default: the source tree's models/, else the installed package's)")
    p.add_argument("--ik-prior", "--model", dest="model", default="",
                   help="registry name of the IK prior (models/registry.yaml; default: the "
                        f"service's ik_model, {ServiceConfig.ik_model}, or --config's; for "
                        f"--protocol table1 the paper's architecture, {PAPER_IK_PRIOR})")
    p.add_argument("--config", default=None,
                   help="service parameters YAML (config/panda.yaml) for the IK defaults")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default; 1 is fastest on a shared 2-core "
                        "machine)")
    p.add_argument("--num-solutions", type=int, default=d.num_solutions, help="K")
    p.add_argument("--budget", type=float, default=d.time_budget_s,
                   help="s per MACE request")
    p.add_argument("--tracik-timeout", type=float, default=d.tracik_timeout_s,
                   help="s per target for the TRAC-IK restarts")
    p.add_argument("--tracik-orientation", choices=TRACIK_ORIENTATIONS,
                   default=d.tracik_orientation, help="orientation asked of TRAC-IK")
    p.add_argument("--tracik-jacobian-steps", type=int, default=d.tracik_jacobian_steps,
                   help="position-only steps before reading the orientation")
    p.add_argument("--table1-samples", type=int, default=d.table1_samples,
                   help="samples judged per adapted model")
    p.add_argument("--table1-budget", type=float, default=d.table1_budget_s,
                   help="s of adaptation per target")
    p.add_argument("--extra-obstacles", type=int, default=d.extra_obstacles,
                   help="requests: boxes added near each target (a changed workcell; every "
                        "method and the judge see them)")
    p.add_argument("--seed-state", type=float, nargs=7, metavar="Q", default=None,
                   help="requests: the robot's joints at every request, rad: MACE's requests "
                        "carry it, TRAC-IK's first attempt starts there (MoveIt's robot_state)")
    p.add_argument("--seed-near", type=float, default=d.seed_near_rad, metavar="SIGMA",
                   help="pose targets: each request's seed state is the configuration its "
                        "target was drawn from plus N(0, SIGMA^2) rad per joint")
    p.add_argument("--table1-iterations", type=int, default=d.table1_iterations,
                   help="MACE iterations at most per target")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run")
    p.add_argument("--target-kind", choices=TARGET_KINDS, default=d.target_kind,
                   help="position: uniform in the scene's region; pose: hand poses of valid "
                        "configurations with the hand there (methods "
                        f"{', '.join(POSE_METHODS)})")
    p.add_argument("--orientation-tolerance", type=float, default=d.orientation_tolerance,
                   help="rad, pose targets")
    p.add_argument("--targets-file", default="",
                   help="YAML list of [x, y, z, qx, qy, qz, qw] poses (base frame) to use as "
                        "the targets (implies --target-kind pose)")
    p.add_argument("--collision-backend", default="",
                   help="comma-separated ik.collision.backend values (spheres, mujoco, "
                        "mjwarp): the first serves the MACE methods, each other one runs them "
                        "again as <method>@<backend> in the same turns (default: the config's)")
    p.add_argument("--pose-prior", default="",
                   help="comma-separated ik.pose_prior values (registry names; 'none': the "
                        "position prior): the first serves the MACE methods, each other one "
                        "runs them again as <method>@<name> in the same turns (default: the "
                        "config's)")
    p.set_defaults(func=_run_ik)


def _service_ik_model(args: argparse.Namespace) -> str:
    """The IK prior the node serves with: ``--config``'s ``ik_model``, else the default's."""
    return (load_service_config(args.config) if args.config else ServiceConfig()).ik_model


def _run_ik(args: argparse.Namespace) -> int:
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.model = args.model or (PAPER_IK_PRIOR if args.protocol == "table1"
                                else _service_ik_model(args))
    if args.protocol == "prior-accuracy":
        return _run_prior_accuracy(args)
    if not args.scene:
        raise SystemExit("mace-bench ik: --scene is required by this protocol")
    if args.protocol == "batch":
        return _run_batch(args)
    pose = args.target_kind == "pose" or bool(args.targets_file)
    protocol_methods = (TABLE1_METHODS if args.protocol != "requests"
                        else POSE_METHODS if pose else METHODS)
    methods = tuple(m for m in args.methods.split(",") if m) or protocol_methods
    cfg = IKBenchmarkConfig(
        num_targets=args.targets, seed=args.seed, protocol=args.protocol, methods=methods,
        target_kind="pose" if args.targets_file else args.target_kind,
        orientation_tolerance=args.orientation_tolerance, targets_file=args.targets_file,
        num_solutions=args.num_solutions, time_budget_s=args.budget,
        warmup=not args.no_warmup, tracik_timeout_s=args.tracik_timeout,
        tracik_orientation=args.tracik_orientation,
        tracik_jacobian_steps=args.tracik_jacobian_steps, table1_samples=args.table1_samples,
        table1_budget_s=args.table1_budget, table1_iterations=args.table1_iterations,
        extra_obstacles=args.extra_obstacles, seed_state=tuple(args.seed_state or ()),
        seed_near_rad=args.seed_near)
    cfg.validate()
    service = load_service_config(args.config).ik if args.config else IKAdaptConfig()
    if cfg.protocol == "table1":
        service = table1_service_config(service)
    scene = load_scene(args.scene)
    models_dir = shipped.models_dir(args.models_dir)
    spec = TensorSpec.resolve(args.device)
    backends = [b for b in args.collision_backend.split(",") if b] or [
        service.collision.backend]
    pose_priors = [("" if n == "none" else n) for n in args.pose_prior.split(",") if n] or [
        service.pose_prior]
    if len(backends) > 1 and len(pose_priors) > 1:
        raise SystemExit("mace-bench ik: compare collision backends or pose priors, one at a "
                         "time")

    def adapter_for(backend: str, pose_prior: str) -> IKAdapter:
        config = replace(service, pose_prior=pose_prior,
                         collision=replace(service.collision, backend=backend))
        return IKAdapter.from_models(models_dir, args.model, config, spec)

    adapter = adapter_for(backends[0], pose_priors[0])
    others = {b: adapter_for(b, pose_priors[0]) for b in backends[1:]}
    others.update({(n or "none"): adapter_for(backends[0], n) for n in pose_priors[1:]})
    report = run_benchmark(adapter, scene, cfg, models_dir=models_dir,
                           log=lambda s: print(s, file=sys.stderr, flush=True), others=others)
    report["scene_file"] = os.path.abspath(args.scene)
    report["ik_prior"] = args.model
    report["pose_prior"] = pose_priors[0] or "none"
    return _report(format_table(report), report, args.json)


def _run_batch(args: argparse.Namespace) -> int:
    """``--protocol batch``: one batch of ``--targets`` (see
    :mod:`mace_core.ik.batch_benchmark`)."""
    from mace_core.ik.batch_benchmark import format_batch, run_batch_benchmark

    service = load_service_config(args.config).ik if args.config else IKAdaptConfig()
    adapter = IKAdapter.from_models(shipped.models_dir(args.models_dir), args.model, service,
                                    TensorSpec.resolve(args.device))
    report = run_batch_benchmark(adapter, load_scene(args.scene), args.targets, args.seed,
                                 args.target_kind, args.num_solutions, args.budget,
                                 orientation_tolerance=args.orientation_tolerance,
                                 log=lambda s: print(s, file=sys.stderr, flush=True))
    report["ik_prior"] = args.model
    return _report(format_batch(report), report, args.json)


def _run_prior_accuracy(args: argparse.Namespace) -> int:
    """``--protocol prior-accuracy``: each named prior's raw samples (see
    :mod:`mace_core.ik.prior_accuracy`)."""
    from mace_core.ik.prior_accuracy import format_table as accuracy_table
    from mace_core.ik.prior_accuracy import prior_accuracy, report
    from mace_core.ik.registry import IK_KINDS, load_ik_prior, load_registry
    from mace_core.robot.kinematics import RobotKinematics

    if args.poses < 1 or args.samples_per_pose < 1:
        raise SystemExit("mace-bench ik: --poses and --samples-per-pose must be >= 1")
    models_dir = shipped.models_dir(args.models_dir)
    entries = load_registry(os.path.join(models_dir, "registry.yaml"))
    spec = TensorSpec.resolve(args.device)
    kin = RobotKinematics.panda(spec)
    results = []
    for name in [n for n in args.model.split(",") if n]:
        entry = entries.get(name)
        if entry is None or entry.kind not in IK_KINDS:
            raise SystemExit(f"mace-bench ik: no IK prior named '{name}' in the registry "
                             f"(known: {sorted(entries)})")
        prior = load_ik_prior(os.path.join(models_dir, entry.file), spec)
        results.append(prior_accuracy(prior, kin, name, args.poses, args.samples_per_pose,
                                      args.seed))
        if args.figure:
            print(f"wrote {_prior_samples_figure(args.figure, name, prior, kin, args)}")
    return _report(accuracy_table(results), report(results), args.json)


def _prior_samples_figure(path: str, name: str, prior, kin, args: argparse.Namespace) -> str:
    """``--figure``: ``--samples-per-pose`` raw samples of ``prior`` at the ready pose's hand
    pose, arms drawn; dashed where a sample leaves the joint limits."""
    import torch

    from mace_core.ik.conditioning import context_of
    from mace_ros.conversions import arm_points
    from mace_ros.plotting import plot_ik_solutions

    pose = kin.ee_pose(kin.spec.tensor([PANDA_READY]))  # (1, 4, 4)
    n = args.samples_per_pose
    with torch.no_grad():
        q = prior.sample(context_of(prior.config.conditioning, pose).expand(n, -1),
                         kin.spec.generator(args.seed))
    stem, ext = os.path.splitext(path)
    return plot_ik_solutions(
        f"{stem}_{name}{ext or '.png'}", arm_points(kin, q.cpu().numpy()),
        kin.within_limits(q).tolist(), [], pose[0, :3, 3].tolist(),
        title=f"{name}: {n} raw samples at one hand pose (the star); dashed: outside the "
              f"joint limits", legend=False)


def _add_shape_parser(sub) -> None:
    from mace_core.shape.benchmark import METHODS as SHAPE_METHODS, ShapeBenchmarkConfig

    d = ShapeBenchmarkConfig()
    p = sub.add_parser("shape", help="shape completion: MACE-VAE vs the prior on held-out shapes",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prior", required=True, help="boxes or objects")
    p.add_argument("--cases", type=int, default=d.num_cases,
                   help="held-out shapes, each observed once per mode")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds shapes, cuts and requests")
    p.add_argument("--json", default="", help="write the report to this file")
    p.add_argument("--modes", default="", help="comma-separated subset (boxes: random_cut,"
                   "top_cut,grasp,grasp_ood; objects: random_cut,view,grasp,grasp_ood)")
    p.add_argument("--methods", default="",
                   help=f"comma-separated subset of {','.join(SHAPE_METHODS)}")
    p.add_argument("-k", "--num-completions", type=int, default=d.num_completions, help="K")
    p.add_argument("--budget", type=float, default=d.time_budget_s, help="s per MACE request")
    p.add_argument("--iterations", type=int, default=d.iterations,
                   help="MACE iterations per request (-1: the service's default)")
    p.add_argument("--models-dir", default=None,
                   help="folder of shape_registry.yaml (default: the checkout's or the installed "
                        "package's models/)")
    p.add_argument("--config", default=None,
                   help="service parameters YAML (config/panda.yaml) for the shape.* settings")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up")
    p.add_argument("--placement", choices=("canonical", "random"), default="canonical",
                   help="random: each shape placed at random on a table and observed there, "
                        "sent in the support frame (methods prior, align_then_complete, "
                        "mace_rule: MACE with the placement started by rule, mace)")
    p.set_defaults(func=_run_shape)


def _run_shape(args: argparse.Namespace) -> int:
    import torch

    from mace_core.shape.vae import load_shape_priors
    from mace_core.shape.benchmark import (ShapeBenchmarkConfig, format_shape_table,
                                           run_shape_benchmark)
    from mace_core.shape.completion import ShapeCompletionConfig

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = ShapeBenchmarkConfig(
        prior=args.prior, num_cases=args.cases, seed=args.seed,
        modes=tuple(m for m in args.modes.split(",") if m),
        methods=tuple(m for m in args.methods.split(",") if m) or ShapeBenchmarkConfig.methods,
        num_completions=args.num_completions, time_budget_s=args.budget,
        iterations=args.iterations, warmup=not args.no_warmup)
    completion = load_service_config(args.config).shape if args.config else \
        ShapeCompletionConfig()
    spec = TensorSpec.resolve(args.device)
    registry = os.path.join(shipped.models_dir(args.models_dir), "shape_registry.yaml")
    priors = load_shape_priors(registry, spec, [args.prior])
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.placement == "random":
        from mace_core.shape.placed_benchmark import format_placed_table, run_placed_benchmark

        report = run_placed_benchmark(priors, completion, cfg, spec, log=log)
        return _report(format_placed_table(report), report, args.json)
    report = run_shape_benchmark(priors, completion, cfg, spec, log=log)
    return _report(format_shape_table(report), report, args.json)


def build_parser() -> argparse.ArgumentParser:
    """The ``mace-bench`` parser; each capability adds one subcommand."""
    parser = argparse.ArgumentParser(prog="mace-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_ik_parser(sub)
    _add_shape_parser(sub)
    _add_record_parser(sub)
    _add_replay_parser(sub)
    _add_paper_parser(sub)
    fuzz.add_parser(sub)
    return parser


def _add_paper_parser(sub) -> None:
    from mace_core.ik.paper_tables import Table2Config

    d = Table2Config()
    p = sub.add_parser("paper", help="the paper's IK tables, run here and printed beside its "
                                     "figures",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--table", type=int, choices=(1, 2), required=True,
                   help="2: IK against MoveIt in the box scene; 1: MACE, IS and the prior in "
                        "the wall scene")
    p.add_argument("--scene", default="", help="scene YAML (default: config/scenes/box.yaml "
                                               "for 2, wall.yaml for 1)")
    p.add_argument("--targets", type=int, default=0, help="targets (default: 20 for 2, the "
                                                          "paper's 10 for 1)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batches", type=int, default=d.batches, help="table 2: prior batches")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="table 2: per batch")
    p.add_argument("--seeds", type=int, default=d.seeds,
                   help="table 2: best prior samples seeding TRAC-IK (MACE + MoveIt)")
    p.add_argument("--timeout", type=float, default=d.timeout_s,
                   help="table 2: s, TRAC-IK's restarts give up after this")
    p.add_argument("--models-dir", default="", help="as for mace-bench ik")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", default="", help="write the report to this file")
    p.set_defaults(func=_run_paper)


def _run_paper(args: argparse.Namespace) -> int:
    """``mace-bench paper --table N``: :mod:`mace_core.ik.paper_tables`."""
    import torch

    from mace_core.ik.benchmark import run_table1
    from mace_core.ik.paper_tables import (Table2Config, format_table1_beside_paper,
                                           format_table2, run_table2)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    default_scene = "box.yaml" if args.table == 2 else "wall.yaml"
    scene = load_scene(args.scene or os.path.join(shipped.scenes_dir(), default_scene))
    service = IKAdaptConfig() if args.table == 2 else table1_service_config(IKAdaptConfig())
    adapter = IKAdapter.from_models(shipped.models_dir(args.models_dir), PAPER_IK_PRIOR, service,
                                    TensorSpec.resolve(args.device))
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.table == 2:
        cfg = Table2Config(num_targets=args.targets or 20, seed=args.seed,
                           batches=args.batches, batch_size=args.batch_size, seeds=args.seeds,
                           timeout_s=args.timeout)
        report = run_table2(adapter, scene, cfg, log)
        return _report(format_table2(report), report, args.json)
    cfg = IKBenchmarkConfig(num_targets=args.targets or 10, seed=args.seed, protocol="table1",
                            methods=TABLE1_METHODS)
    report = dict(scene=scene.name, protocol="table1", **run_table1(adapter, scene, cfg, log))
    return _report(format_table1_beside_paper(report), report, args.json)


def _add_record_parser(sub) -> None:
    p = sub.add_parser("record", help="write a bag of /mace/adapt_ik calls for a replay",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scene", default="", help="scene YAML (format of config/scenes/): "
                   "write drawn requests without a node")
    p.add_argument("--live", action="store_true",
                   help="instead, record a running node's service events for --duration s")
    p.add_argument("--duration", type=float, default=60.0, help="s of --live recording")
    p.add_argument("--targets", type=int, default=20, help="requests to write")
    p.add_argument("--seed", type=int, default=0, help="seeds the targets and the requests")
    p.add_argument("--target-kind", choices=TARGET_KINDS, default="position",
                   help="as mace-bench ik draws them")
    p.add_argument("--num-solutions", type=int, default=8, help="K of every request")
    p.add_argument("--budget", type=float, default=1.0, help="s, every request's budget")
    p.add_argument("--seed-near", type=float, default=0.0, metavar="SIGMA",
                   help="pose targets: each request carries a seed state, its target's own "
                        "configuration plus N(0, SIGMA^2) rad per joint (as mace-bench ik)")
    p.add_argument("--as-moveit", action="store_true",
                   help="write the drawn pose targets as a MoveIt pipeline's recording: "
                        "/compute_ik calls for panda_link8 and /monitored_planning_scene")
    p.add_argument("--out", required=True, help="the bag folder to create (MCAP)")
    p.set_defaults(func=_run_record)


def _add_replay_parser(sub) -> None:
    p = sub.add_parser("replay", help="replay a bag of /mace/adapt_ik calls against mace and "
                                      "its baselines (in process), and its /mace/complete_shape "
                                      "calls (in process and, with --node, to the node)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("bag", help="bag folder (MCAP or sqlite3) with /mace/adapt_ik/_service_event")
    p.add_argument("--methods", default="mace_refine,tracik_restarts",
                   help="comma-separated methods (each group runs those of its target kind)")
    p.add_argument("--models-dir", default="", help="as for mace-bench ik")
    p.add_argument("--ik-prior", dest="model", default="",
                   help="registry name (default: the service's ik_model, or --config's)")
    p.add_argument("--config", default=None, help="service parameters YAML")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seeds the baselines' restarts")
    p.add_argument("--node", action="store_true",
                   help="also send every request to the running node (/mace/adapt_ik and "
                        "/mace/complete_shape, method mace_node, end-to-end time)")
    p.add_argument("--node-batch", action="store_true",
                   help="with --node: also send each group's requests in one "
                        "/mace/adapt_ik_batch call (method mace_node_batch, the call's time "
                        "over its requests)")
    p.add_argument("--json", default="",
                   help="write the report to this file (every request's record and solutions)")
    p.add_argument("--markdown", default="", help="write a Markdown table per group here")
    p.add_argument("--plots", default="",
                   help="write PNG plots per group into this folder (success against time "
                        "budget, time to the first valid solution)")
    p.set_defaults(func=_run_replay)


def _replay_shape_calls(args: argparse.Namespace, client, log) -> dict | None:
    """The bag's ``/mace/complete_shape`` calls through :mod:`mace_ros.shape_replay` (None when
    it has none): in process with the priors they name, and to the node with ``--node``."""
    from mace_core.shape.completion import ShapeCompleter, ShapeCompletionConfig
    from mace_core.shape.vae import load_shape_priors, load_shape_registry
    from mace_ros.bags import read_shape_requests
    from mace_ros.shape_replay import replay_shape_calls

    messages = read_shape_requests(args.bag)
    if not messages:
        return None
    config = load_service_config(args.config).shape if args.config else ShapeCompletionConfig()
    registry = os.path.join(shipped.models_dir(args.models_dir), "shape_registry.yaml")
    known = load_shape_registry(registry)
    # the priors the calls name (one at least: a call naming an unknown one is refused in turn)
    names = sorted({m.prior for m in messages} & set(known)) or sorted(known)[:1]
    spec = TensorSpec.resolve(args.device)
    completer = ShapeCompleter(load_shape_priors(registry, spec, names), config, spec)
    completer.warmup()
    return replay_shape_calls(messages, completer, client, log)


def _run_replay(args: argparse.Namespace) -> int:
    """``mace-bench replay``: the bag's requests through :mod:`mace_ros.replay`."""
    import torch

    from mace_ros.replay import format_replay, replay_bag, write_outputs

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    service = load_service_config(args.config).ik if args.config else IKAdaptConfig()
    adapter = IKAdapter.from_models(shipped.models_dir(args.models_dir),
                                    args.model or _service_ik_model(args), service,
                                    TensorSpec.resolve(args.device))
    client = None
    if args.node:
        import rclpy

        from mace_ros.client import MaceClient

        rclpy.init()
        client = MaceClient(node_name="mace_replay")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    try:
        report = replay_bag(args.bag, adapter, tuple(m for m in args.methods.split(",") if m),
                            IKBenchmarkConfig(seed=args.seed), log=log, client=client,
                            node_batch=args.node_batch)
        report["shape"] = _replay_shape_calls(args, client, log)
    finally:
        if client is not None:
            client.close()
            rclpy.shutdown()
    for path in write_outputs(report, args.markdown, args.plots):
        print(f"written: {path}")
    return _report(format_replay(report), report, args.json)


def _run_record(args: argparse.Namespace) -> int:
    """``mace-bench record``: drawn requests as the service events a recorded bag holds, or
    (``--live``) a running node's events."""
    from mace_ros.bags import record_drawn_requests, record_live

    if args.live:
        counts = record_live(args.out, args.duration)
        print(f"recorded {counts} events in {args.duration:g} s to {args.out}")
        return 0
    if not args.scene:
        raise SystemExit("mace-bench record: --scene (drawn requests) or --live")
    if args.as_moveit:
        from mace_core.robot.kinematics import RobotKinematics
        from mace_ros.bags import draw_requests
        from mace_ros.moveit_bags import write_moveit_style_bag

        if args.target_kind != "pose":
            raise SystemExit("mace-bench record --as-moveit: MoveIt asks for full poses "
                             "(--target-kind pose)")
        drawn = draw_requests(load_scene(args.scene), args.targets, args.seed, "pose",
                              seed_near_rad=args.seed_near)
        write_moveit_style_bag(args.out, drawn, RobotKinematics.panda(TensorSpec.resolve("cpu")))
        print(f"wrote {len(drawn)} /compute_ik requests (MoveIt's types) to {args.out}")
        return 0
    if args.seed_near and args.target_kind != "pose":
        raise SystemExit("mace-bench record --seed-near: pose targets (--target-kind pose)")
    requests = record_drawn_requests(args.out, load_scene(args.scene), args.targets, args.seed,
                                     args.target_kind, args.num_solutions, args.budget,
                                     seed_near_rad=args.seed_near)
    print(f"wrote {len(requests)} /mace/adapt_ik requests to {args.out}")
    return 0


def _report(table: str, report: dict, path: str) -> int:
    """Print the table, and write the report as JSON when a path is given."""
    print(table)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"report written to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mace-bench`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (MaceError, ValueError, OSError) as exc:
        print(f"mace-bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
