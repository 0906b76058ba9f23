"""Collision backends versus PyBullet on the benchmark scenes: counts and timings.

For every scene and every configuration set, PyBullet (exact, on the collision meshes) is the
ground truth; each backend (``--backends``: ``spheres``, the batched conservative sphere model;
``mujoco``, exact checks in MuJoCo; ``mjwarp``, the same batched in MuJoCo Warp) must call no
PyBullet-colliding configuration free (``false free`` = 0) and as few PyBullet-free ones
colliding as it can (``false colliding``, as a share of the PyBullet-free ones). An exact
backend's disputes (it calls a configuration colliding, PyBullet free) are refereed by a third
measure, :mod:`.hull_distance`: how many are PyBullet's own distance error, how many the
backend's declared safety margin. Timings: the
median wall time of one ``valid`` call on a batch of 48, 256 and 4,096 uniform configurations
(``--batches``), forward kinematics included.

Configuration sets (``--configs`` each):
- ``uniform``: uniform within the joint limits;
- ``near``: PyBullet-valid uniform configurations moved by N(0, ``--sigma``) per joint (clipped to
  the limits), so that many lie close to a contact;
- ``ik``: configurations whose end effector reaches the scene's target region (damped
  least-squares IK from uniform starts to uniform targets), the distribution the service sees.

``python -m mace_core.robot.collision_benchmark --backends spheres,mujoco --configs 10000
--json out.json`` (``--device cuda --backends spheres,mjwarp --batches 4096,65536`` on a GPU)
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
from .backends import exact_checker
from .collision import COLLISION_BACKENDS as BACKENDS
from .collision import PYBULLET_MESH_MARGIN, SceneCollisionChecker
from .hull_distance import HullDistanceReference
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


class _Backend:
    """One backend's verdicts in a scene: ``collisions(q) -> (B, 2)`` bool numpy (self,
    world) and ``valid(q) -> (B,)``, forward kinematics included."""

    def __init__(self, name: str, kin: RobotKinematics, spheres: SphereCollisionChecker):
        self.name, self.kin, self.spheres = name, kin, spheres
        #: the backend's exact checker (None: the spheres)
        self.exact: SceneCollisionChecker | None = exact_checker(name, str(kin.spec.device))
        self.world: CollisionWorld | None = None

    def set_scene(self, scene: Scene) -> None:
        if self.exact is None:
            self.world = CollisionWorld.from_obstacles(scene.obstacles, self.kin.spec)
        else:
            self.exact.set_obstacles(scene.obstacles)

    def collisions(self, q: torch.Tensor) -> np.ndarray:
        if self.exact is not None:
            return self.exact.collisions(q)
        poses = self.kin.link_poses(q)
        return np.stack([self.spheres.self_collision(q, poses).cpu().numpy(),
                         self.spheres.world_collision(q, self.world, poses).cpu().numpy()], 1)

    def valid(self, q: torch.Tensor) -> np.ndarray:
        if self.exact is not None:
            return self.exact.valid(q)
        return self.spheres.valid(q, self.world).cpu().numpy()


def configuration_sets(kin: RobotKinematics, scene: Scene, pb: PyBulletCollisionChecker,
                       configs: int, sigma: float, gen: torch.Generator) -> dict:
    """The three sets of the module docstring, ``(configs, 7)`` each (``ik``: up to that)."""
    spec = kin.spec
    uniform = kin.sample_uniform(configs, gen)
    free = uniform[torch.from_numpy(pb.valid(uniform))]
    pick = torch.randint(free.shape[0], (configs,), generator=gen)
    noise = sigma * torch.randn(configs, 7, generator=gen, dtype=spec.dtype)
    near = torch.maximum(torch.minimum(free[pick] + noise, kin.upper), kin.lower)
    return {"uniform": uniform, "near": near,
            "ik": ik_configurations(kin, scene, configs, gen)}


def evaluate_scene(scene: Scene, kin: RobotKinematics, backends: list[_Backend], configs: int,
                   sigma: float, seed: int, referee: HullDistanceReference | None = None) -> dict:
    """Count each backend's agreement with PyBullet on every configuration set of one scene;
    with a ``referee``, an exact backend's disputes are refereed
    (:func:`referee_disputes`)."""
    gen = kin.spec.generator(seed)
    for backend in backends:
        backend.set_scene(scene)
    rows = {}
    with PyBulletCollisionChecker(scene.obstacles) as pb:
        for name, q in configuration_sets(kin, scene, pb, configs, sigma, gen).items():
            start = time.perf_counter()
            pb_pair = pb.collisions(q)  # (self, world) per configuration
            pb_ms = (time.perf_counter() - start) / q.shape[0] * 1e3
            truth = pb.within_limits(q) & ~pb_pair.any(1)
            row = {"configs": int(q.shape[0]), "pybullet_free": int(truth.sum()),
                   "pybullet_colliding": int((~truth).sum()), "pybullet_ms_per_config": pb_ms,
                   "backends": {}}
            for backend in backends:
                pair = backend.collisions(q)
                ours = backend.valid(q)
                false_coll = ~ours & truth
                row["backends"][backend.name] = {
                    "false_free": int((ours & ~truth).sum()),
                    "false_colliding": int(false_coll.sum()),
                    "false_colliding_rate": float(false_coll.sum() / max(int(truth.sum()), 1)),
                    "false_self": int((pair[:, 0] & ~pb_pair[:, 0]).sum()),
                    "false_world": int((pair[:, 1] & ~pb_pair[:, 1]).sum()),
                }
                if backend.exact is not None and referee is not None:
                    row["backends"][backend.name].update(referee_disputes(
                        referee, scene, q, pair, pb_pair, backend.exact.safety_margin_m))
            rows[name] = row
    return rows


#: at most this many disputed configurations per set are refereed (tens of ms each)
MAX_REFEREED = 100


def referee_disputes(referee: HullDistanceReference, scene: Scene, q: torch.Tensor,
                     ours: np.ndarray, theirs: np.ndarray, safety_margin_m: float) -> dict:
    """Referee the configurations an exact backend calls colliding and PyBullet free with the
    convex-optimization distances (:mod:`.hull_distance`); ``ours``/``theirs`` ``(B, 2)``:
    (self, world) verdicts of the backend and of PyBullet. A configuration counts as
    ``pybullet_error`` where every part in dispute (self, world) is within PyBullet's own
    margins (2 mm between links, 1 mm to obstacles: PyBullet's GJK is wrong), as
    ``safety_margin`` where it is within the backend's extra safety margin beyond them (its
    declared caution), else ``unexplained``."""
    disputed = (ours & ~theirs).any(1) & ~theirs.any(1)
    rows = np.flatnonzero(disputed)[:MAX_REFEREED]
    out = {"refereed": int(rows.size), "pybullet_error": 0, "safety_margin": 0,
           "unexplained": 0}
    for k in rows:
        verdict = "pybullet_error"
        for part, margin in ((0, 2 * PYBULLET_MESH_MARGIN), (1, PYBULLET_MESH_MARGIN)):
            if not ours[k, part]:
                continue
            gap = (referee.self_distance(q[k], reach_m=0.01) if part == 0
                   else referee.world_distance(q[k], scene.obstacles, reach_m=0.01))
            if gap > margin + safety_margin_m + 1e-6:
                verdict = "unexplained"
            elif gap > margin and verdict == "pybullet_error":
                verdict = "safety_margin"
        out[verdict] += 1
    return out


def time_backends(kin: RobotKinematics, backends: list[_Backend], scene: Scene,
                  batches: list[int], repeats: int, seed: int) -> dict:
    """Median wall time (ms) of one ``valid`` call per backend and batch size (uniform
    configurations, forward kinematics included)."""
    out = {}
    for backend in backends:
        backend.set_scene(scene)
        out[backend.name] = {}
        for batch in batches:
            q = kin.sample_uniform(batch, kin.spec.generator(seed))
            out[backend.name][str(batch)] = _median_ms(lambda: backend.valid(q), repeats)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="spheres",
                        help=f"comma-separated, of {', '.join(BACKENDS)}")
    parser.add_argument("--configs", type=int, default=10000, help="configurations per set")
    parser.add_argument("--scenes", nargs="*", default=None, help="scene YAML files")
    parser.add_argument("--spheres", default=None, help="robot spheres YAML")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (spheres)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--sigma", type=float, default=0.1, help="rad, 'near' perturbation")
    parser.add_argument("--batches", default="48,256,4096", help="batch sizes of the timings")
    parser.add_argument("--repeats", type=int, default=20, help="timing repetitions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown or not names:
        parser.error(f"--backends: unknown {unknown}; choose from {', '.join(BACKENDS)}")
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    spec = TensorSpec.resolve(args.device)
    kin = RobotKinematics.panda(spec)
    spheres = SphereCollisionChecker(kin, RobotSpheres.load(args.spheres), spec)
    backends = [_Backend(n, kin, spheres) for n in names]
    referee = HullDistanceReference(kin) if any(b.exact is not None for b in backends) else None
    scenes = [load_scene(p) for p in (args.scenes or default_scene_paths())]
    results = {"device": str(spec.device), "threads": args.threads, "backends": names,
               "spheres": spheres.num_spheres, "groups": spheres.num_groups, "scenes": {}}
    print(f"{'scene':8s} {'set':8s} {'backend':8s} {'configs':>7s} {'pb free':>7s} "
          f"{'pb coll':>7s} {'false free':>10s} {'false coll':>10s} {'rate':>7s} "
          f"{'(self':>6s} {'world)':>6s} {'pb ms/cfg':>9s}  refereed: pb error / safety / other")
    for k, scene in enumerate(scenes):
        rows = evaluate_scene(scene, kin, backends, args.configs, args.sigma, args.seed + k,
                              referee)
        timing = time_backends(kin, backends, scene, batches, args.repeats, args.seed)
        results["scenes"][scene.name] = {"sets": rows, "timing_ms": timing}
        for name, r in rows.items():
            for backend, b in r["backends"].items():
                print(f"{scene.name:8s} {name:8s} {backend:8s} {r['configs']:7d} "
                      f"{r['pybullet_free']:7d} {r['pybullet_colliding']:7d} "
                      f"{b['false_free']:10d} {b['false_colliding']:10d} "
                      f"{b['false_colliding_rate']:7.4f} {b['false_self']:6d} "
                      f"{b['false_world']:6d} {r['pybullet_ms_per_config']:9.3f}"
                      + (f"  {b['refereed']}: {b['pybullet_error']} / {b['safety_margin']} / "
                         f"{b['unexplained']}" if "refereed" in b else ""), flush=True)
        for backend, times in timing.items():
            shown = ", ".join(f"B={b}: {ms:.2f} ms" for b, ms in times.items())
            print(f"{scene.name:8s} timing {backend:8s} valid() {shown}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
