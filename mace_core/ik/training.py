"""Data generation and maximum-likelihood training of the IK prior (paper App. B).

Data: configurations uniform within the Panda's joint limits that PyBullet calls free of
self-collision (exact checks on the URDF's collision meshes), with the end-effector position our
forward kinematics gives them. Training: Adam on −log p(q | p_ee), cosine-decayed step size.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import ModelLoadError
from ..robot.closed_form_ik import FREE_JOINT
from ..robot.kinematics import RobotKinematics
from ..tensor import TensorSpec
from ..training import add_config_arguments, config_from_arguments
from .conditioning import context_dim, context_of
from .prior import ARGMMConfig, ARGMMPrior
from .registry import load_ik_prior, save_ik_prior


@dataclass
class IKTrainingConfig:
    """What the IK prior's training command takes."""

    samples: int = 1_000_000  #: self-collision-free configurations generated
    epochs: int = 4  #: passes over the training split
    batch_size: int = 1024  #: configurations per Adam step
    learning_rate: float = 1e-3  #: initial Adam step size (cosine-decayed to 1 %)
    holdout_fraction: float = 0.02  #: share of the data kept for held-out figures
    seed: int = 0  #: seeds data generation and training
    workers: int = 2  #: processes for PyBullet data generation
    threads: int = 1  #: torch threads for training (one beats two on a busy 2-core machine)
    device: str = "cpu"  #: where the training runs (data generation and evaluation: the CPU)
    #: wall-clock cap of the training, min (0: none); the step size then decays with the larger
    #: of the step and the time progress, so a capped run still ends at the small step size
    time_limit_min: float = 0.0
    #: what the prior is conditioned on: "position" or "pose" (:mod:`.conditioning`)
    conditioning: str = "position"
    hidden: int = 200  #: width of each hidden layer (a stage continuing weights keeps theirs)
    layers: int = 5  #: hidden layers per joint network
    components: int = 2  #: Gaussian components per joint
    #: the factorization's joint order, 1-based joint numbers ("7,1,2,3,4,5,6": q7 first, the
    #: closed form's free joint); empty: 1 to 7
    joint_order: str = ""

    def architecture(self) -> ARGMMConfig:
        """The prior's architecture these settings ask for.

        Raises:
            ValueError: a joint order that is not comma-separated joint numbers.
        """
        order = tuple(int(n) - 1 for n in self.joint_order.split(",") if n.strip())
        return ARGMMConfig(context_dim=context_dim(self.conditioning),
                           conditioning=self.conditioning, hidden=self.hidden,
                           layers=self.layers, components=self.components, joint_order=order)


_WORKER_ROBOT: tuple[int, int] | None = None


def _free_worker(q: np.ndarray) -> np.ndarray:
    """Self-collision-free mask of ``q (n, 7)`` by PyBullet (one client per worker process)."""
    global _WORKER_ROBOT
    from ..robot.pybullet_checker import PyBulletCollisionChecker, exact_self_collision_free

    if _WORKER_ROBOT is None:
        _WORKER_ROBOT = PyBulletCollisionChecker()
    return exact_self_collision_free(q, _WORKER_ROBOT)


def generate_ik_dataset(n: int, seed: int, workers: int, spec: TensorSpec,
                        log=print) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``n`` self-collision-free configurations ``(n, 7)``, their EE positions ``(n, 3)`` and
    the share of uniform samples that were free."""
    kin = RobotKinematics.panda(spec)
    gen = spec.generator(seed)
    kept: list[torch.Tensor] = []
    total, free_total = 0, 0
    start = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        while free_total < n:
            need = int((n - free_total) * 1.4) + 1000
            q = kin.sample_uniform(need, gen).cpu().numpy().astype(np.float64)
            chunks = np.array_split(q, max(1, workers * 8))
            masks = pool.map(_free_worker, chunks)
            mask = np.concatenate(masks)
            kept.append(torch.from_numpy(q[mask]))
            total += len(q)
            free_total += int(mask.sum())
            log(f"  generated {free_total}/{n} free configurations "
                f"({free_total / total:.3f} of random ones, {time.perf_counter() - start:.0f} s)")
    q = torch.cat(kept)[:n].to(device=spec.device, dtype=spec.dtype)
    with torch.no_grad():
        p = torch.cat([kin.ee_position(c) for c in q.split(65536)])
    return q, p, free_total / total


def train_ik_prior(q: torch.Tensor, p: torch.Tensor, cfg: IKTrainingConfig, spec: TensorSpec,
                   arch: ARGMMConfig | None = None, log=print,
                   init: ARGMMPrior | None = None) -> tuple[ARGMMPrior, dict]:
    """Fit an :class:`ARGMMPrior` to ``q (n, 7)`` given contexts ``p (n, C)`` (the
    conditioning's: positions, or poses as :func:`.conditioning.context_of` writes them);
    returns it and its figures.

    ``arch``: the architecture (default: ``init``'s, else ``cfg``'s). ``init`` continues
    training from existing weights (same data, so the same normalization).
    """
    arch = arch or (init.config if init is not None else cfg.architecture())
    torch.manual_seed(cfg.seed)
    kin = RobotKinematics.panda(spec)
    q, p = spec.tensor(q), spec.tensor(p)
    n_hold = max(1, int(len(q) * cfg.holdout_fraction))
    perm = torch.randperm(len(q), generator=torch.Generator().manual_seed(cfg.seed))
    hold, train = perm[:n_hold].to(spec.device), perm[n_hold:].to(spec.device)
    prior = ARGMMPrior(arch, spec)
    prior.set_normalization(kin.lower, kin.upper, p[train].mean(0), p[train].std(0))
    if init is not None:
        prior.load_state_dict(init.state_dict())
    opt = torch.optim.Adam(prior.parameters(), lr=cfg.learning_rate, fused=True)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    limit_s = cfg.time_limit_min * 60 or math.inf
    start = time.perf_counter()
    done, epochs_run = 0, 0.0
    for epoch in range(cfg.epochs):
        order = train[torch.randperm(len(train), device=spec.device)]
        total, seen = 0.0, 0
        for step, idx in enumerate(order.split(cfg.batch_size)):
            elapsed = time.perf_counter() - start
            if elapsed > limit_s:
                break
            progress = max(done / steps, elapsed / limit_s)
            lr = cfg.learning_rate * (0.01 + 0.495 * (1 + math.cos(math.pi * progress)))
            for group in opt.param_groups:
                group["lr"] = lr
            if step % 200 == 0:
                log(f"    epoch {epoch + 1} step {step} ({elapsed:.0f} s)")
            loss = -prior.log_prob(q[idx], p[idx]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        epochs_run += seen / len(train)
        with torch.no_grad():
            nll = -prior.log_prob(q[hold], p[hold]).mean().item()
        log(f"  epoch {epoch + 1}/{cfg.epochs}: train NLL {total / max(seen, 1):.3f}, "
            f"held-out NLL {nll:.3f} ({time.perf_counter() - start:.0f} s)")
        if seen < len(train):
            log(f"  time limit of {cfg.time_limit_min} min reached after {epochs_run:.2f} epochs")
            break
    figures = {"heldout_nll": nll, "train_time_s": time.perf_counter() - start,
               "epochs_run": round(epochs_run, 3),
               "heldout_size": int(n_hold), "train_size": int(len(train))}
    return prior, figures


def evaluate_prior(prior: ARGMMPrior, poses: torch.Tensor, spec: TensorSpec, seed: int) -> dict:
    """Raw-sample figures at hand poses ``(n, 4, 4)`` (the prior reads their position, or the
    whole pose): EE position error (and orientation error for a pose prior, rad), joint-limit
    and self-collision rates."""
    from ..robot.pybullet_checker import exact_self_collision_free
    from ..robot.rotations import geodesic_distance

    kin = RobotKinematics.panda(spec)
    with torch.no_grad():
        q = prior.sample(context_of(prior.config.conditioning, poses), spec.generator(seed))
        reached = kin.ee_pose(q)
        err = (reached[:, :3, 3] - poses[:, :3, 3]).norm(dim=-1)
        turn = geodesic_distance(reached[:, :3, :3], poses[:, :3, :3])
    inside = kin.within_limits(q)
    free = torch.from_numpy(exact_self_collision_free(q))
    return {"samples": int(len(poses)),
            "mean_ee_error_m": float(err.mean()), "median_ee_error_m": float(err.median()),
            "mean_orientation_error_rad": float(turn.mean()),
            "within_limits_fraction": float(inside.float().mean()),
            "self_collision_free_fraction": float(free.float().mean()),
            "valid_fraction": float((free & inside.cpu()).float().mean())}


MODEL_CARD = """# IK prior `{name}`: autoregressive Gaussian mixture over the 7 Panda joints

p(q | c) = Π_i p(q_i | q_<i, c), each factor a {components}-component Gaussian mixture \
from its own MLP ({layers} hidden layers of {hidden}, LeakyReLU), as in the MACE paper (App. B).
Conditioning c: {conditioning_text}
Joints in the factorization's order: {order_text}.

| | |
|---|---|
| weights | `{file}` (safetensors, {size_mb:.1f} MB, {params:,} parameters, float32) |
| data | {samples:,} configurations uniform within the URDF joint limits and free of \
self-collision by PyBullet's exact mesh checks ({free_rate:.3f} of uniform samples are), \
pybullet_data `franka_panda/panda.urdf`, fingers open at 0.04 m |
| split | {train_size:,} training / {heldout_size:,} held out |
| data generation | {data_time_s:.0f} s ({workers} processes) |
| training | {stages_table} total {train_time_s:.0f} s of training (on the stage's \
`--device`; `cpu`: a 2-core machine shared with other jobs) |
| held-out negative log-likelihood | {heldout_nll:.3f} nats per configuration \
(joint angles in rad) |
| raw samples at held-out hand poses ({eval_samples:,}; a position prior reads their \
positions) | mean end-effector error \
{mean_ee_error_m:.4f} m (median {median_ee_error_m:.4f} m), mean orientation error \
{mean_orientation_deg:.2f} deg; within joint limits \
{within_limits_fraction:.3f}; free of self-collision {self_collision_free_fraction:.3f}; both \
{valid_fraction:.3f} |

The paper used 10M samples and a GPU. A stage's command names the device it trained on \
(`--device`; a stage without it ran on the CPU). Reproduce with the commands above, in order \
(same seed; each stage continues from the weights the previous one wrote, and generates its \
own `--samples` unless `--data-cache` holds them).
"""


#: the card's words for each conditioning
CONDITIONING_TEXT = {
    "position": "the position of `panda_grasptarget` in the `panda_link0` frame (m).",
    "pose": "the pose of `panda_grasptarget` in the `panda_link0` frame: its position (m) and "
            "the first two columns of its rotation matrix (Zhou et al., CVPR 2019).",
}


def main_ik(argv: list[str] | None = None) -> int:
    """``mace-train ik``: generate data, train the IK prior, write weights, registry and card."""
    ap = argparse.ArgumentParser(prog="mace-train ik", description=main_ik.__doc__)
    defaults = IKTrainingConfig()
    add_config_arguments(ap, defaults)
    ap.add_argument("--name", default="panda_ik")
    ap.add_argument("--models-dir", default="models")
    ap.add_argument("--data-cache", default="data/ik_dataset.pt",
                    help="reuse generated data when this file matches --samples and --seed")
    ap.add_argument("--eval-samples", type=int, default=10000)
    ap.add_argument("--init-from", default="",
                    help="continue training from these weights (recorded in the card)")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="skip training: evaluate the existing weights and rewrite the card")
    args = ap.parse_args(argv)
    cfg = config_from_arguments(IKTrainingConfig, args)
    try:
        cfg.architecture().validate()
    except (ValueError, ModelLoadError) as exc:
        ap.error(f"--joint-order {cfg.joint_order!r}: {exc}")
    torch.set_num_threads(cfg.threads)
    spec = TensorSpec.resolve("cpu")
    path = os.path.join(args.models_dir, f"{args.name}.safetensors")
    if not args.evaluate_only:
        start = time.perf_counter()
        q, p, free_rate, data_time = _dataset(cfg, args.data_cache, spec)
        p = _contexts(cfg.conditioning, q, spec)
        print(f"training on {len(q)} configurations ...")
        init, history = None, []
        if args.init_from:
            init = load_ik_prior(args.init_from, spec)
            history = _training_history(args.init_from)
        prior, figures = train_ik_prior(q, p, cfg, TensorSpec.resolve(cfg.device), init=init)
        figures.update(free_rate=free_rate, data_time_s=data_time, samples=len(q),
                       stages=history + [dict(asdict(cfg), heldout_nll=figures["heldout_nll"],
                                              train_time_s=figures["train_time_s"],
                                              epochs_run=figures["epochs_run"])])
        figures["train_time_s"] = sum(s["train_time_s"] for s in figures["stages"])
        figures["epochs_total"] = sum(s.get("epochs_run", s["epochs"]) for s in figures["stages"])
        save_ik_prior(prior, path, metadata={"training": json.dumps(dict(asdict(cfg),
                                                                         **figures))})
        print(f"wrote {path} ({time.perf_counter() - start:.0f} s)")
    prior = load_ik_prior(path, spec)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        card = json.loads(f.metadata()["training"])
    kin = RobotKinematics.panda(spec)
    gen = spec.generator(cfg.seed + 1)
    with torch.no_grad():  # held-out poses: those of fresh uniform self-collision-free data
        q_eval, _, _ = generate_ik_dataset(args.eval_samples, cfg.seed + 1, cfg.workers, spec)
        poses = kin.ee_pose(q_eval)
    del q_eval, kin, gen
    evaluation = evaluate_prior(prior, poses, spec, cfg.seed)
    print("evaluation:", json.dumps(evaluation))
    card.update({("eval_samples" if k == "samples" else k): v for k, v in evaluation.items()})
    stages = card.get("stages") or [card]
    rows = []
    for k, stage in enumerate(stages):
        cmd = "mace-train ik " + " ".join(
            f"--{name.replace('_', '-')} {stage[name]}" for name in asdict(defaults)
            if name in stage and stage[name] != "")  # an empty value is the default
        if k > 0:
            cmd += f" --init-from {args.models_dir}/{args.name}.safetensors"
        epochs = stage.get("epochs_run", stage["epochs"])
        rows.append(f"stage {k + 1}: `{cmd}` ({epochs} epochs, Adam lr "
                    f"{stage['learning_rate']} cosine-decayed, {stage['train_time_s']:.0f} s, "
                    f"held-out NLL {stage['heldout_nll']:.3f});")
    with open(os.path.join(args.models_dir, f"{args.name}.md"), "w") as f:
        f.write(MODEL_CARD.format(
            name=args.name, file=os.path.basename(path), size_mb=os.path.getsize(path) / 2**20,
            params=sum(t.numel() for t in prior.parameters()), stages_table=" ".join(rows),
            conditioning_text=CONDITIONING_TEXT[prior.config.conditioning],
            order_text=", ".join(f"q{i + 1}" for i in prior.config.order) + (
                " (q7, the closed form's free joint, first: its marginal is one network's "
                "draw)" if prior.config.order[0] == FREE_JOINT else ""),
            mean_orientation_deg=math.degrees(card["mean_orientation_error_rad"]),
            **{**card, **asdict(prior.config)}))
    print(f"wrote the model card {args.name}.md")
    return 0


def _training_history(path: str) -> list[dict]:
    """Training stages recorded in a weights file's metadata (for continued training)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("training", "{}"))
    if "stages" in meta:
        return meta["stages"]
    keys = set(asdict(IKTrainingConfig())) | {"heldout_nll", "train_time_s"}
    return [{k: v for k, v in meta.items() if k in keys}] if meta else []


def _contexts(conditioning: str, q: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """The contexts ``(n, C)`` of configurations ``q (n, 7)``: their hand poses as the
    conditioning reads them (computed here, so one cached data set serves every kind)."""
    kin = RobotKinematics.panda(spec)
    with torch.no_grad():
        return torch.cat([context_of(conditioning, kin.ee_pose(c)) for c in q.split(65536)])


def _dataset(cfg: IKTrainingConfig, cache: str, spec: TensorSpec):
    """Generated (or cached) training data: q, p, free rate, generation time."""
    if cache and os.path.exists(cache):
        data = torch.load(cache, weights_only=True)
        if data.get("samples") == cfg.samples and data.get("seed") == cfg.seed:
            print(f"using cached data {cache}")
            return data["q"], data["p"], data["free_rate"], data["data_time_s"]
    print(f"generating {cfg.samples} configurations with PyBullet ...")
    start = time.perf_counter()
    q, p, free_rate = generate_ik_dataset(cfg.samples, cfg.seed, cfg.workers, spec)
    data_time = time.perf_counter() - start
    if cache:
        os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
        torch.save({"q": q, "p": p, "free_rate": free_rate, "data_time_s": data_time,
                    "samples": cfg.samples, "seed": cfg.seed}, cache)
    return q, p, free_rate, data_time
