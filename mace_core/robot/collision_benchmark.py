"""Sphere checker versus PyBullet on the benchmark scenes: counts and timings.

For every scene and every configuration set, PyBullet (exact, on the collision meshes) is the
ground truth; the sphere checker must call no PyBullet-colliding configuration free (``false
free`` = 0) and call colliding at most 5 % of the PyBullet-free ones (``false colliding``).

Configuration sets (``--configs`` each):
- ``uniform``: uniform within the joint limits;
- ``near``: PyBullet-valid uniform configurations moved by N(0, ``--sigma``) per joint (clipped to
  the limits), so that many lie close to a contact;
- ``ik``: configurations whose end effector reaches the scene's target region (damped
  least-squares IK from uniform starts to uniform targets), the distribution the service sees.

``python -m mace_core.robot.collision_benchmark --configs 10000 --json out.json``
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np
import torch

from ..paths import SOURCE_ROOT
from ..tensor import TensorSpec
from .kinematics import RobotKinematics, damped_least_squares
from .pybullet_checker import PyBulletCollisionChecker
from .scenes import Scene, load_scene
from .spheres import CollisionWorld, RobotSpheres, SphereCollisionChecker


def default_scene_paths() -> list[str]:
    """``config/scenes/*.yaml`` of this repository."""
    return sorted(glob.glob(os.path.join(SOURCE_ROOT, "config", "scenes", "*.yaml")))


def ik_configurations(kin: RobotKinematics, scene: Scene, n: int, generator: torch.Generator,
                      iterations: int = 60, tolerance: float = 0.01) -> torch.Tensor:
    """Up to ``n`` configurations ``(n', 7)`` whose end effector reaches the target region.

    Within the joint limits, end effector within ``tolerance`` (m) of a target drawn in the
    scene's region (position-only damped least squares from uniform starts).
    """
    out, total = [], 0
    while total < n:
        q = kin.sample_uniform(2 * n, generator)
        target = scene.sample_targets(2 * n, generator, kin.spec)
        for _ in range(iterations):
            poses = kin.link_poses(q)
            err = target - poses[:, kin.ee_index, :3, 3]  # (B, 3)
            jac = kin.jacobian(q, poses)[:, :3]  # (B, 3, 7)
            step = damped_least_squares(jac, err.unsqueeze(-1), 1e-2)
            q = torch.maximum(torch.minimum(q + step.squeeze(-1), kin.upper), kin.lower)
        err = (target - kin.ee_position(q)).norm(dim=-1)
        q = q[err < tolerance]
        out.append(q)
        total += q.shape[0]
    return torch.cat(out)[:n]


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def evaluate_scene(scene: Scene, kin: RobotKinematics, checker: SphereCollisionChecker,
                   configs: int, sigma: float, seed: int) -> dict:
    """Count agreements (and PyBullet's cost) on every configuration set of one scene."""
    spec = kin.spec
    gen = spec.generator(seed)
    world = CollisionWorld.from_obstacles(scene.obstacles, spec)
    rows = {}
    with PyBulletCollisionChecker(scene.obstacles) as pb:
        uniform = kin.sample_uniform(configs, gen)
        sets = {"uniform": uniform}
        pb_uniform = None
        for name in ("uniform", "near", "ik"):
            if name == "near":
                free = sets["uniform"][torch.from_numpy(pb_uniform)]
                pick = torch.randint(free.shape[0], (configs,), generator=gen)
                noise = sigma * torch.randn(configs, 7, generator=gen, dtype=spec.dtype)
                sets[name] = torch.maximum(torch.minimum(free[pick] + noise, kin.upper),
                                           kin.lower)
            elif name == "ik":
                sets[name] = ik_configurations(kin, scene, configs, gen)
            q = sets[name]
            start = time.perf_counter()
            pb_pair = pb.collisions(q)  # (self, world) per configuration
            pb_ms = (time.perf_counter() - start) / q.shape[0] * 1e3
            truth = pb.within_limits(q) & ~pb_pair.any(1)
            if name == "uniform":
                pb_uniform = truth
            poses = kin.link_poses(q)
            ours = checker.valid(q, world, poses).cpu().numpy()
            ours_self = checker.self_collision(q, poses).cpu().numpy()
            ours_world = checker.world_collision(q, world, poses).cpu().numpy()
            false_coll = ~ours & truth
            rows[name] = {
                "configs": int(q.shape[0]), "pybullet_free": int(truth.sum()),
                "pybullet_colliding": int((~truth).sum()),
                "false_free": int((ours & ~truth).sum()),
                "false_colliding": int(false_coll.sum()),
                "false_colliding_rate": float(false_coll.sum() / max(int(truth.sum()), 1)),
                "false_self": int((ours_self & ~pb_pair[:, 0]).sum()),
                "false_world": int((ours_world & ~pb_pair[:, 1]).sum()),
                "pybullet_ms_per_config": pb_ms,
            }
    return rows


def time_sphere_checker(kin: RobotKinematics, checker: SphereCollisionChecker, scene: Scene,
                        batch: int, repeats: int, seed: int) -> dict:
    """Median wall time (ms) of one batch: FK, valid() given poses, and both together."""
    spec = kin.spec
    world = CollisionWorld.from_obstacles(scene.obstacles, spec)
    q = kin.sample_uniform(batch, spec.generator(seed))
    poses = kin.link_poses(q)
    return {
        "batch": batch,
        "fk_ms": _median_ms(lambda: kin.link_poses(q), repeats),
        "valid_given_poses_ms": _median_ms(lambda: checker.valid(q, world, poses), repeats),
        "self_given_poses_ms": _median_ms(lambda: checker.self_collision(q, poses), repeats),
        "world_given_poses_ms": _median_ms(lambda: checker.world_collision(q, world, poses),
                                           repeats),
        "valid_with_fk_ms": _median_ms(lambda: checker.valid(q, world), repeats),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=10000, help="configurations per set")
    parser.add_argument("--scenes", nargs="*", default=None, help="scene YAML files")
    parser.add_argument("--spheres", default=None, help="robot spheres YAML")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--sigma", type=float, default=0.1, help="rad, 'near' perturbation")
    parser.add_argument("--batch", type=int, default=4096, help="batch size of the timings")
    parser.add_argument("--repeats", type=int, default=20, help="timing repetitions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = TensorSpec.resolve(args.device)
    kin = RobotKinematics.panda(spec)
    checker = SphereCollisionChecker(kin, RobotSpheres.load(args.spheres), spec)
    scenes = [load_scene(p) for p in (args.scenes or default_scene_paths())]
    results = {"device": str(spec.device), "threads": args.threads,
               "spheres": checker.num_spheres, "groups": checker.num_groups, "scenes": {}}
    header = (f"{'scene':8s} {'set':8s} {'configs':>7s} {'pb free':>7s} {'pb coll':>7s} "
              f"{'false free':>10s} {'false coll':>10s} {'rate':>6s} {'(self':>6s} "
              f"{'world)':>6s} {'pb ms/cfg':>9s}")
    print(header)
    for k, scene in enumerate(scenes):
        rows = evaluate_scene(scene, kin, checker, args.configs, args.sigma, args.seed + k)
        timing = time_sphere_checker(kin, checker, scene, args.batch, args.repeats, args.seed)
        results["scenes"][scene.name] = {"sets": rows, "timing": timing}
        for name, r in rows.items():
            print(f"{scene.name:8s} {name:8s} {r['configs']:7d} {r['pybullet_free']:7d} "
                  f"{r['pybullet_colliding']:7d} {r['false_free']:10d} "
                  f"{r['false_colliding']:10d} {r['false_colliding_rate']:6.3f} "
                  f"{r['false_self']:6d} {r['false_world']:6d} "
                  f"{r['pybullet_ms_per_config']:9.3f}", flush=True)
        print(f"{scene.name:8s} timing B={timing['batch']}: FK {timing['fk_ms']:.1f} ms, "
              f"valid given poses {timing['valid_given_poses_ms']:.1f} ms (self "
              f"{timing['self_given_poses_ms']:.1f}, world {timing['world_given_poses_ms']:.1f})"
              f", valid with FK {timing['valid_with_fk_ms']:.1f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
