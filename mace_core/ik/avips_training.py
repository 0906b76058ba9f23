"""``mace-train avips``: the Panda's IK mixture trained against its target density, and measured.

Three methods at one budget (gradient steps, contexts per step, draws per component, the same
network per component), as the aVIPS thesis compares them (Musekamp 2023, Tables 5.1 and 5.2):

- ``avips``: :class:`~.avips.AVIPSTrainer` (per-component trust regions, E-step every
  ``m_steps`` gradient steps, light components removed);
- ``vi``: the same mixture by plain amortized VI, a gradient step on the whole ELBO
  (:func:`~.avips.elbo_step`);
- ``gaussian``: one component, plain amortized VI.

Contexts are hand poses of configurations uniform in the joint limits, drawn afresh for every
step (:func:`~.avips.pose_contexts`). The figures (:func:`evaluate`): the raw samples' position
and orientation errors under the literature's protocol (:mod:`.prior_accuracy`, the thesis'
Table 5.1), and at held-out contexts the ELBO, the model's entropy E_z[−E_q log q(x|z)] and the
weights' entropy E_z[H(q(o|z))] (its Table 5.2). The weights are written as an IK prior
(:class:`~.avips.MixturePrior`, registry kind ``ik_avips``) with the architecture and the
figures in the metadata, every ``checkpoint_min`` minutes and at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..paths import default_models_dir
from ..robot.kinematics import RobotKinematics
from ..robot.scenes import load_scene
from ..robot.spheres import CollisionWorld, SphereCollisionChecker
from ..tensor import TensorSpec
from ..training import add_config_arguments, config_from_arguments
from .avips import (AVIPSConfig, AVIPSTrainer, ConditionalGMM, IKTargetDensity, MixturePrior,
                    elbo, elbo_step, pose_contexts)
from .prior_accuracy import PriorAccuracy, prior_accuracy
from .registry import ik_prior_metadata, load_ik_prior, save_mixture_prior

#: what ``--method`` takes
METHODS = ("avips", "vi", "gaussian")


@dataclass
class AVIPSTrainingConfig:
    """What ``mace-train avips`` takes (the thesis' Panda run: 70 components, 4 x 450 per
    component, gate 800, 512 contexts per step, 800 epochs of 1,000 steps, on a GPU)."""

    method: str = "avips"  #: "avips", "vi" (plain amortized VI) or "gaussian" (one component)
    components: int = 10  #: at the start ("gaussian": 1)
    hidden: int = 128  #: width of each component network's hidden layers
    layers: int = 3  #: hidden layers of each component network and of the gate
    gate_hidden: int = 128  #: width of the gate network's hidden layers
    batch: int = 64  #: contexts per gradient step
    samples: int = 8  #: draws per component and context
    steps: int = 3000  #: gradient steps (aVIPS: ``m_steps`` per E-step)
    m_steps: int = 10  #: aVIPS: gradient steps per M-step
    learning_rate: float = 3e-3  #: Adam (aVIPS: the adapted rates stay below it)
    epsilon_mu: float = 0.05  #: aVIPS: bound on the mean part of each component's KL per E-step
    epsilon_sigma: float = 0.01  #: aVIPS: bound on its covariance part
    epsilon_weights: float = 0.01  #: aVIPS: bound on the weights' KL per E-step
    #: aVIPS: the desired change of a component's KL per gradient step, as a share of its
    #: bound, towards which the learning rates adapt (Sec. 3.2.2)
    kl_change_share: float = 0.1
    #: the largest condition number of a component's covariance (Sec. 3.5.1; 0: unbounded)
    max_condition: float = 1e6
    #: the components' initial standard deviation, in the scaled joints' units ([-1, 1])
    init_std: float = 0.5
    #: aVIPS: contexts per component in the resampled M-steps (Sec. 3.3; 0: none; the thesis
    #: drew 128 of its 512) and how often an M-step is a full one (the weights' update)
    resampled_contexts: int = 0
    full_step_every: int = 4
    time_limit_min: float = 0.0  #: wall-clock cap of the training, min (0: none)
    checkpoint_min: float = 5.0  #: minutes between checkpoints
    seed: int = 0
    threads: int = 1  #: torch threads
    eval_poses: int = 10_240  #: poses of the accuracy protocol
    eval_samples: int = 25  #: draws per pose
    eval_contexts: int = 1024  #: held-out contexts of the ELBO and the entropies
    #: a scene YAML whose obstacles join the target density as a collision expert (a workcell
    #: prior, :class:`~.avips.IKTargetDensity`); empty: none
    workcell: str = ""
    #: with ``workcell``: pose targets of that scene (drawn as the pose benchmark draws them)
    #: at which the raw samples' validity is measured
    workcell_targets: int = 20
    #: weights (an ``ik_avips`` prior of the same architecture) to continue training from;
    #: empty: the networks' seeded initial weights
    init_from: str = ""

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("components", "hidden", "layers", "gate_hidden", "batch", "samples",
                     "m_steps", "eval_poses", "eval_samples", "eval_contexts", "threads",
                     "full_step_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0 or not self.learning_rate > 0:
            raise ValueError("steps must be >= 0 and learning_rate > 0")
        if min(self.epsilon_mu, self.epsilon_sigma, self.epsilon_weights) <= 0:
            raise ValueError("the trust regions' bounds must be > 0")
        if self.resampled_contexts < 0:
            raise ValueError(f"resampled_contexts must be >= 0, got {self.resampled_contexts}")
        if not 0 < self.init_std <= 2:
            raise ValueError(f"init_std must be in (0, 2], got {self.init_std}")
        if self.max_condition != 0 and not self.max_condition > 1:
            raise ValueError(f"max_condition must be > 1 (or 0: none), got {self.max_condition}")


def target_density(cfg: AVIPSTrainingConfig, kin: RobotKinematics) -> IKTargetDensity:
    """The IK target, with the workcell's collision expert when ``cfg.workcell`` names one."""
    if not cfg.workcell:
        return IKTargetDensity(kin)
    checker = SphereCollisionChecker.from_file(
        kin, kin.spec, os.path.join(default_models_dir(), "panda_spheres.yaml"))
    world = CollisionWorld.from_obstacles(load_scene(cfg.workcell).obstacles, kin.spec)
    return IKTargetDensity(kin, workcell=(checker, world))


def raw_sample_validity(prior, kin: RobotKinematics, scene_path: str, targets: int,
                        samples: int, seed: int = 0) -> float:
    """Share of a prior's raw samples that are valid (within the limits, free of self- and
    scene collision by the exact MuJoCo checker) at ``targets`` pose targets of the scene,
    drawn as ``mace-bench ik --target-kind pose --seed`` draws them, ``samples`` each."""
    from ..robot.backends import exact_checker
    from ..robot.pybullet_checker import PyBulletCollisionChecker
    from .benchmark import pose_matrix, sample_pose_targets
    from .conditioning import context_of

    scene = load_scene(scene_path)
    with PyBulletCollisionChecker(scene.obstacles) as referee:
        poses = sample_pose_targets(scene, targets, seed, referee)  # (T, 7)
    pose = kin.spec.tensor(np.stack([pose_matrix(p) for p in poses]))  # (T, 4, 4)
    context = context_of(prior.config.conditioning, pose).repeat_interleave(samples, 0)
    with torch.no_grad():
        q = prior.sample(context, kin.spec.generator(seed))
    checker = exact_checker("mujoco", "cpu")
    checker.set_obstacles(CollisionWorld.from_obstacles(scene.obstacles, kin.spec).obstacles)
    return float(np.mean(checker.valid(q.cpu().numpy())))


def build_model(cfg: AVIPSTrainingConfig) -> ConditionalGMM:
    """The untrained mixture over the 7 scaled joints, given a pose context (9)."""
    components = 1 if cfg.method == "gaussian" else cfg.components
    torch.manual_seed(cfg.seed)  # the networks' initial weights
    return ConditionalGMM(context_dim=9, dim=7, components=components, hidden=cfg.hidden,
                          layers=cfg.layers, gate_hidden=cfg.gate_hidden,
                          init_std=cfg.init_std, max_condition=cfg.max_condition)


def evaluate(model: ConditionalGMM, kin: RobotKinematics, cfg: AVIPSTrainingConfig,
             name: str) -> dict:
    """The figures of the module docstring; held-out contexts from seed ``cfg.seed + 1``;
    with a workcell, the raw samples' validity at its pose targets too."""
    density = target_density(cfg, kin)
    gen = kin.spec.generator(cfg.seed + 1)
    with torch.no_grad():
        z = pose_contexts(kin, cfg.eval_contexts, gen)
        bound = float(elbo(model, density, z, cfg.samples, gen).mean())
        x = model.sample(z, cfg.samples, gen)  # (B, n, 7)
        model_entropy = float(-model.log_prob(x, z).mean())
        logw = model.log_weights(z)
        w = logw.exp()
        weight_entropy = float(-(w * torch.where(model.alive, logw, torch.zeros_like(logw))
                                 ).sum(-1).mean())
    prior = MixturePrior(model, kin.lower, kin.upper)
    accuracy: PriorAccuracy = prior_accuracy(prior, kin, name, poses=cfg.eval_poses,
                                             samples=cfg.eval_samples, seed=cfg.seed + 2)
    figures = dict(elbo=bound, model_entropy=model_entropy, weight_entropy=weight_entropy,
                   components_left=int(model.alive.sum()), accuracy=asdict(accuracy))
    if cfg.workcell:
        figures["workcell_valid_fraction"] = raw_sample_validity(
            prior, kin, cfg.workcell, cfg.workcell_targets, cfg.eval_samples)
    return figures


def save(model: ConditionalGMM, kin: RobotKinematics, path: str, metadata: dict) -> None:
    """Write ``model`` as the IK prior :class:`~.avips.MixturePrior` on ``kin``'s limits."""
    save_mixture_prior(MixturePrior(model, kin.lower, kin.upper), path, metadata)


def train(cfg: AVIPSTrainingConfig, kin: RobotKinematics, out: str | None = None,
          log=print) -> tuple[ConditionalGMM, dict]:
    """Train by ``cfg.method`` for ``cfg.steps`` gradient steps (or the time limit), writing
    checkpoints to ``out``; returns the model and the training figures."""
    cfg.validate()
    model = build_model(cfg)
    if cfg.init_from:  # a later stage: its removed components stay removed
        model.load_state_dict(load_ik_prior(cfg.init_from, kin.spec).model.state_dict())
    density = target_density(cfg, kin)
    gen = kin.spec.generator(cfg.seed)

    def contexts() -> torch.Tensor:
        return pose_contexts(kin, cfg.batch, gen)

    start = last_checkpoint = time.perf_counter()
    limit_s = cfg.time_limit_min * 60.0 if cfg.time_limit_min > 0 else math.inf
    steps, trace = 0, []
    if cfg.method == "avips":
        trainer = AVIPSTrainer(model, density, AVIPSConfig(
            samples=cfg.samples, m_steps=cfg.m_steps, learning_rate=cfg.learning_rate,
            max_learning_rate=cfg.learning_rate, epsilon_mu=cfg.epsilon_mu,
            epsilon_sigma=cfg.epsilon_sigma, epsilon_weights=cfg.epsilon_weights,
            resampled_contexts=cfg.resampled_contexts, full_step_every=cfg.full_step_every,
            kl_change_share=cfg.kl_change_share))
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    while steps < cfg.steps and time.perf_counter() - start < limit_s:
        if cfg.method == "avips":
            alive = trainer.iteration(contexts, gen)["alive"]
            steps += cfg.m_steps
        else:
            elbo_step(model, optimizer, density, contexts(), cfg.samples, gen)
            alive = int(model.alive.sum())
            steps += 1
        now = time.perf_counter()
        if out and now - last_checkpoint >= cfg.checkpoint_min * 60.0:
            with torch.no_grad():
                value = float(elbo(model, density, contexts(), cfg.samples, gen).mean())
            trace.append(dict(steps=steps, seconds=round(now - start, 1), elbo=value,
                              components=alive))
            log(f"[avips {cfg.method}] {steps} steps, {now - start:.0f} s, ELBO {value:.2f}, "
                f"{alive} components")
            save(model, kin, out, dict(config=asdict(cfg), training=dict(
                steps=steps, train_time_s=now - start, trace=trace, checkpoint=True)))
            last_checkpoint = now
    return model, dict(steps=steps, train_time_s=time.perf_counter() - start, trace=trace)


def main_avips(argv: list[str] | None = None) -> int:
    """``mace-train avips``: train one method, write its weights and figures (JSON)."""
    ap = argparse.ArgumentParser(prog="mace-train avips", description=__doc__.split("\n")[0])
    add_config_arguments(ap, AVIPSTrainingConfig())
    ap.add_argument("--out", default="out/avips/panda_avips.safetensors",
                    help="weights (safetensors); the figures go beside it as .json")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="measure the weights at --out instead of training")
    args = ap.parse_args(argv)
    cfg = config_from_arguments(AVIPSTrainingConfig, args)
    try:
        cfg.validate()
    except ValueError as exc:
        ap.error(str(exc))
    torch.set_num_threads(cfg.threads)
    kin = RobotKinematics.panda(TensorSpec.resolve("cpu"))
    if args.evaluate_only:
        model = load_ik_prior(args.out, kin.spec).model.requires_grad_(True)
        figures = ik_prior_metadata(args.out).get("training", {})
    else:
        model, figures = train(cfg, kin, args.out)
    name = os.path.splitext(os.path.basename(args.out))[0]
    report = dict(config=asdict(cfg), training=figures, evaluation=evaluate(model, kin, cfg,
                                                                            name))
    save(model, kin, args.out, dict(config=asdict(cfg), training=figures,
                                    evaluation=report["evaluation"]))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(report, f, indent=1)
    acc = report["evaluation"]["accuracy"]
    print(f"{cfg.method}: {figures['steps']} steps in {figures['train_time_s']:.0f} s; ELBO "
          f"{report['evaluation']['elbo']:.2f}, weight entropy "
          f"{report['evaluation']['weight_entropy']:.3f}, model entropy "
          f"{report['evaluation']['model_entropy']:.2f}, "
          f"{report['evaluation']['components_left']} components; raw samples "
          f"{acc['mean_position_error_mm']:.1f} mm / {acc['mean_orientation_error_deg']:.1f} deg "
          f"({acc['samples_per_pose']} x {acc['poses']} poses); wrote {args.out}")
    return 0
