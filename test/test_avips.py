"""aVIPS' conditional Gaussian mixture (mace_core/ik/avips.py): its densities by hand, the split
KL its trust regions bound, removal, and plain amortized VI finding every mode of a toy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.distributions import (Categorical, MixtureSameFamily, MultivariateNormal,
                                 kl_divergence)

from mace_core.ik.avips import ConditionalGMM, elbo, elbo_step, gaussian_kl_parts

#: a 4-mode toy density over x in 2-D whose modes move with the context z (B, 1)
MODES = torch.tensor([[0.5, 0.5], [-0.5, 0.5], [0.5, -0.5], [-0.5, -0.5]])


def toy_log_density(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    centres = MODES[None] + torch.cat([0.3 * z, torch.zeros_like(z)], -1)[:, None]
    d = ((x[:, :, None] - centres[:, None]) ** 2).sum(-1)
    return torch.logsumexp(-d / (2 * 0.1 ** 2), -1)


def mode_shares(model: ConditionalGMM) -> list[float]:
    """Share of 4,000 samples at context 0.3 within 0.25 of each toy mode (nearest first)."""
    x = model.sample(torch.full((1, 1), 0.3), 4000, torch.Generator().manual_seed(2))[0]
    centres = MODES + torch.tensor([0.09, 0.0])
    d = ((x[:, None] - centres[None]) ** 2).sum(-1).sqrt()
    return [float(((d.argmin(1) == k) & (d.min(1).values < 0.25)).float().mean())
            for k in range(4)]


def test_the_mixture_density_is_torchs():
    torch.manual_seed(0)
    model = ConditionalGMM(3, 4, components=5, hidden=16)
    with torch.no_grad():
        for net in model.nets:  # off-diagonal Cholesky terms and context dependence
            net[-1].weight.normal_(0.0, 0.3)
    z = torch.randn(2, 3)
    x = torch.randn(2, 7, 4)
    mean, chol = model.components_at(z)
    theirs = MixtureSameFamily(Categorical(logits=model.log_weights(z)),
                               MultivariateNormal(mean, scale_tril=chol))
    expected = torch.stack([theirs.log_prob(x[:, k]) for k in range(7)], dim=1)
    assert torch.allclose(model.log_prob(x, z), expected, atol=1e-4)
    assert torch.allclose(model.log_weights(z).exp().sum(-1), torch.ones(2))
    draws = model.sample(z, 20000, torch.Generator().manual_seed(1))
    expected_mean = (model.log_weights(z).exp()[..., None] * mean).sum(1)
    assert torch.allclose(draws.mean(1), expected_mean.detach(), atol=0.05)


def test_the_split_kl_adds_up_to_the_gaussian_kl():
    gen = torch.Generator().manual_seed(2)
    mean, old_mean = torch.randn(3, 2, 4, generator=gen), torch.randn(3, 2, 4, generator=gen)
    a, b = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    chol = torch.tril(a, -1) + torch.diag_embed(torch.rand(3, 2, 4, generator=gen) + 0.5)
    old_chol = torch.tril(b, -1) + torch.diag_embed(torch.rand(3, 2, 4, generator=gen) + 0.5)
    kl_mu, kl_sigma = gaussian_kl_parts(mean, chol, old_mean, old_chol)
    expected = kl_divergence(MultivariateNormal(mean, scale_tril=chol),
                             MultivariateNormal(old_mean, scale_tril=old_chol))
    assert torch.allclose(kl_mu + kl_sigma, expected, atol=1e-4)
    same_cov, _ = gaussian_kl_parts(mean, old_chol, old_mean, old_chol)
    assert torch.allclose(gaussian_kl_parts(mean, old_chol, old_mean, old_chol)[1],
                          torch.zeros(3, 2), atol=1e-5) and bool((same_cov > 0).all())


def test_light_components_are_removed_and_never_drawn():
    model = ConditionalGMM(1, 2, components=4, hidden=8)
    with torch.no_grad():
        model.gate[-1].bias[2] = math.pi / 2 - 1e-4  # cos² ~ 1e-8: a weight of ~0
    z = torch.rand(16, 1)
    assert model.remove_light_components(z, 5e-4) == 3
    assert bool(torch.isinf(model.log_weights(z)[:, 2]).all())
    assert bool((model.log_weights(z).exp()[:, 2] == 0.0).all())  # never drawn
    assert model.sample(z, 50).shape == (16, 50, 2)


def test_plain_amortized_vi_finds_every_mode_of_the_toy():
    """The thesis' baseline: gradient steps on the whole ELBO; the 4 modes, at a context it was
    never asked at exactly, each take a share of the samples, and the ELBO rises."""
    torch.manual_seed(0)
    model = ConditionalGMM(1, 2, components=8, hidden=32, gate_hidden=32, init_std=0.3)
    gen = torch.Generator().manual_seed(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = float(elbo(model, toy_log_density, torch.rand(64, 1, generator=gen) * 2 - 1, 32,
                        gen).mean().detach())
    for _ in range(300):
        elbo_step(model, optimizer, toy_log_density,
                  torch.rand(16, 1, generator=gen) * 2 - 1, 8, gen)
    after = float(elbo(model, toy_log_density, torch.rand(64, 1, generator=gen) * 2 - 1, 32,
                       gen).mean().detach())
    assert after > before + 1.0, (before, after)
    shares = mode_shares(model)
    assert min(shares) > 0.1, shares
    assert pytest.approx(sum(shares), abs=0.15) == 1.0


def test_avips_finds_every_mode_within_its_trust_regions():
    """The VIPS trainer on the same toy: its last M-step kept the mean and covariance parts of
    every component's KL near their bounds, enough components stay, and every mode takes a
    share of the samples."""
    from mace_core.ik.avips import AVIPSConfig, AVIPSTrainer

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = ConditionalGMM(1, 2, components=8, hidden=32, gate_hidden=32, init_std=0.3)
    config = AVIPSConfig()
    trainer = AVIPSTrainer(model, toy_log_density, config)
    for _ in range(30):
        left = trainer.iteration(lambda: torch.rand(16, 1, generator=gen) * 2 - 1, gen)
    assert 4 <= left["alive"] <= 8  # light ones may go; enough stay for the 4 modes
    assert float(trainer.last_kl["mu"].max()) < 1.5 * config.epsilon_mu
    assert float(trainer.last_kl["sigma"].max()) < 1.5 * config.epsilon_sigma
    shares = mode_shares(model)
    assert min(shares) > 0.1, shares


def test_the_ik_target_peaks_where_the_hand_is_on_the_pose():
    from mace_core.ik.avips import IKTargetDensity, pose_contexts
    from mace_core.ik.conditioning import context_of
    from mace_core.robot.kinematics import RobotKinematics
    from mace_core.tensor import TensorSpec

    kin = RobotKinematics.panda(TensorSpec.resolve("cpu"))
    target = IKTargetDensity(kin)
    gen = torch.Generator().manual_seed(3)
    x = 0.8 * (2.0 * torch.rand(4, 7, generator=gen) - 1.0)  # away from the limits
    q = target.joints(x)
    z = context_of("pose", kin.ee_pose(q))
    assert torch.allclose(target.joints(x), q, atol=1e-5)
    on = target(x[:, None], z)[:, 0]
    assert bool((on > -1e-3).all()), on  # on the pose and inside the limits: log p̃ ~ 0
    off = target((x + 0.05 * torch.randn(4, 7, generator=gen))[:, None], z)[:, 0]
    assert bool((off < on - 1.0).all())
    edge = x.clone()
    edge[:, 0] = 1.0  # at a joint's limit, half of the expert's Gaussian is outside
    at_limit = target(edge[:, None], context_of("pose", kin.ee_pose(target.joints(edge))))
    assert torch.allclose(at_limit[:, 0], torch.full((4,), math.log(0.5)), atol=1e-3)
    assert pose_contexts(kin, 5, gen).shape == (5, 9)


# ------------------------------------------------------------------------------------------------
# mace-train avips: the Panda's mixture, its baselines at one budget, weights and figures
# ------------------------------------------------------------------------------------------------

TINY = dict(steps=20, m_steps=5, batch=8, samples=2, components=4, hidden=16, layers=1,
            gate_hidden=16, eval_poses=32, eval_samples=2, eval_contexts=16)


@pytest.mark.parametrize("method", ["avips", "vi", "gaussian"])
def test_each_method_trains_writes_and_reloads_the_same_prior(method, tmp_path):
    from mace_core.ik.avips_training import AVIPSTrainingConfig, evaluate, save, train
    from mace_core.ik.registry import ik_prior_metadata, load_ik_prior
    from mace_core.robot.kinematics import RobotKinematics
    from mace_core.tensor import TensorSpec

    kin = RobotKinematics.panda(TensorSpec())
    cfg = AVIPSTrainingConfig(method=method, **TINY)
    model, figures = train(cfg, kin)
    assert figures["steps"] == 20
    figures_out = evaluate(model, kin, cfg, method)
    assert figures_out["components_left"] == (1 if method == "gaussian" else
                                              int(model.alive.sum()))
    for key in ("elbo", "model_entropy", "weight_entropy"):
        assert math.isfinite(figures_out[key]), key
    accuracy = figures_out["accuracy"]
    assert accuracy["poses"] == 32 and accuracy["samples_per_pose"] == 2
    assert accuracy["mean_position_error_mm"] > 0.0
    path = str(tmp_path / f"{method}.safetensors")
    save(model, kin, path, dict(config=vars(cfg), training=figures))
    prior = load_ik_prior(path, kin.spec)
    meta = ik_prior_metadata(path)
    assert meta["training"]["steps"] == 20 and meta["config"]["method"] == method
    assert prior.config.conditioning == "pose"
    z = torch.randn(3, 9)
    x = torch.rand(3, 5, 7) * 2 - 1
    assert torch.allclose(prior.model.log_prob(x, z), model.log_prob(x, z))


def test_a_later_stage_starts_from_the_given_weights(tmp_path):
    """``init_from``: training continues from a saved prior (0 steps: it is that prior, its
    removed components still removed)."""
    from dataclasses import replace

    from mace_core.ik.avips_training import AVIPSTrainingConfig, save, train
    from mace_core.robot.kinematics import RobotKinematics
    from mace_core.tensor import TensorSpec

    kin = RobotKinematics.panda(TensorSpec())
    first, _ = train(AVIPSTrainingConfig(**TINY), kin)
    with torch.no_grad():
        first.alive[0] = False
    path = str(tmp_path / "first.safetensors")
    save(first, kin, path, {})
    again, figures = train(replace(AVIPSTrainingConfig(**TINY), steps=0, seed=1,
                                   init_from=path), kin)
    assert figures["steps"] == 0 and not bool(again.alive[0])
    z, x = torch.randn(3, 9), torch.rand(3, 5, 7) * 2 - 1
    assert torch.allclose(again.log_prob(x, z), first.log_prob(x, z))
    fresh, _ = train(replace(AVIPSTrainingConfig(**TINY), steps=0, seed=1), kin)
    assert not torch.allclose(fresh.log_prob(x, z), first.log_prob(x, z))


def test_the_mixture_prior_samples_and_rates_joint_angles():
    """MixturePrior maps the mixture's scaled joints to radians and back: its samples are the
    mixture's, its log-density the mixture's plus the scaling's Jacobian, the same for one
    context broadcast (a request) as for the rows spelled out."""
    from mace_core.ik.avips import MixturePrior
    from mace_core.robot.kinematics import RobotKinematics
    from mace_core.tensor import TensorSpec

    kin = RobotKinematics.panda(TensorSpec())
    torch.manual_seed(0)
    model = ConditionalGMM(context_dim=9, dim=7, components=3, hidden=8, layers=1,
                           gate_hidden=8)
    prior = MixturePrior(model, kin.lower, kin.upper)
    z = torch.randn(1, 9)
    q = prior.sample(z.expand(6, -1), torch.Generator().manual_seed(1))
    x = model.sample(z, 6, torch.Generator().manual_seed(1))[0]
    assert torch.allclose(2 * (q - kin.lower) / (kin.upper - kin.lower) - 1, x, atol=1e-5)
    jac = torch.log(2 / (kin.upper - kin.lower)).sum()
    broadcast = prior.log_prob(q, z.expand(6, -1))
    spelled = prior.log_prob(q, z.repeat(6, 1))
    assert torch.allclose(broadcast, spelled, atol=1e-5)
    assert torch.allclose(broadcast, model.log_prob(x[None], z)[0] + jac, atol=1e-4)


def test_mace_adapts_every_weight_of_the_mixture_prior():
    """Algorithm 1 on the aVIPS prior at one pose (as the adapter runs it): the elites' log-
    likelihood rises and the component networks and the gate all move."""
    from mace_core.ik.avips import MixturePrior
    from mace_core.ik.conditioned import _ConditionedPrior
    from mace_core.mace import MACEConfig, adapt
    from mace_core.robot.kinematics import RobotKinematics
    from mace_core.tensor import TensorSpec

    kin = RobotKinematics.panda(TensorSpec())
    torch.manual_seed(0)
    model = ConditionalGMM(context_dim=9, dim=7, components=3, hidden=8, layers=1,
                           gate_hidden=8)
    prior = MixturePrior(model, kin.lower, kin.upper).requires_grad_(True)
    initial = MixturePrior(copy.deepcopy(model), kin.lower, kin.upper)
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    conditioned = _ConditionedPrior(prior, initial, torch.randn(9), kin.lower, kin.upper)

    def score(q):  # elites: configurations with joint 1 high
        return (q[:, 0] > 1.0).float()

    trace = adapt(conditioned, score, MACEConfig(num_samples=256, quantile=0.25,
                                                 gradient_steps=8, iterations=6,
                                                 learning_rate=1e-2, keep_best=False),
                  torch.Generator().manual_seed(0))
    assert trace.iterations_run == 6
    first, last = trace.iterations[0].positive_fraction, trace.iterations[-1].positive_fraction
    assert last > first + 0.1, (first, last)
    moved = [k for k, v in prior.state_dict().items()
             if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any(k.startswith("model.gate") for k in moved)
    assert any(k.startswith("model.nets") for k in moved)


def test_a_file_that_is_not_an_ik_prior_is_refused(tmp_path):
    from safetensors.torch import save_file

    from mace_core.errors import ModelLoadError
    from mace_core.ik.registry import load_ik_prior
    from mace_core.tensor import TensorSpec

    path = str(tmp_path / "other.safetensors")
    save_file({"w": torch.zeros(2)}, path, metadata={"kind": "shape_vae"})
    with pytest.raises(ModelLoadError, match="not an IK prior"):
        load_ik_prior(path, TensorSpec())
    save_file({"w": torch.zeros(2)}, path, metadata={"kind": "ik_avips", "architecture": "{}"})
    with pytest.raises(ModelLoadError, match="do not match"):
        load_ik_prior(path, TensorSpec())
    with pytest.raises(ModelLoadError, match="not found"):
        load_ik_prior(str(tmp_path / "missing.safetensors"), TensorSpec())


def test_the_service_answers_full_poses_with_an_avips_pose_prior(tmp_path):
    """``ik.pose_prior`` may name an ``ik_avips`` entry: full-pose requests then draw from the
    mixture (projected by the closed form, adapted by MACE when rounds run dry)."""
    import os
    from dataclasses import replace

    import numpy as np
    import yaml

    from conftest import MODELS_DIR
    from mace_core.ik.adapter import IKAdapter
    from mace_core.ik.avips import MixturePrior
    from mace_core.ik.registry import save_mixture_prior
    from mace_core.ik.request import IKAdaptConfig, IKRequest
    from mace_core.tensor import TensorSpec

    for name in os.listdir(MODELS_DIR):
        os.symlink(os.path.join(MODELS_DIR, name), tmp_path / name)
    os.remove(tmp_path / "registry.yaml")
    with open(os.path.join(MODELS_DIR, "registry.yaml")) as f:
        registry = yaml.safe_load(f)
    registry["models"]["tiny_avips"] = dict(kind="ik_avips", file="tiny_avips.safetensors")
    with open(tmp_path / "registry.yaml", "w") as f:
        yaml.safe_dump(registry, f)
    spec = TensorSpec()
    torch.manual_seed(0)
    model = ConditionalGMM(context_dim=9, dim=7, components=3, hidden=8, layers=1,
                           gate_hidden=8)
    from mace_core.robot.kinematics import RobotKinematics

    kin = RobotKinematics.panda(spec)
    save_mixture_prior(MixturePrior(model, kin.lower, kin.upper),
                       str(tmp_path / "tiny_avips.safetensors"))
    adapter = IKAdapter.from_models(str(tmp_path), "panda_ik",
                                    replace(IKAdaptConfig(), pose_prior="tiny_avips"), spec)
    assert isinstance(adapter.pose_prior, MixturePrior)
    ready = torch.tensor([[0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785]])
    pose = kin.ee_pose(ready)[0].double().numpy()
    result = adapter.solve(IKRequest(position=pose[:3, 3], rotation=pose[:3, :3],
                                     orientation_tolerance=1e-3, num_solutions=4,
                                     time_budget_s=1.0, seed=0))
    assert result.num_found == 4, result.message
    for sol in result.solutions:
        reached = kin.ee_pose(torch.as_tensor(sol.q[None], dtype=torch.float32))[0].numpy()
        assert np.abs(reached[:3, 3] - pose[:3, 3]).max() < 2e-4


def test_the_workcell_expert_lowers_the_density_inside_obstacles_with_its_gradient():
    """``IKTargetDensity(workcell=...)``: a configuration whose spheres sink into an obstacle
    loses P / collision_scale_m of log-density, and autograd's gradient of it is the analytic
    one (finite differences agree)."""
    import os

    from conftest import MODELS_DIR
    from mace_core.ik.avips import IKTargetDensity
    from mace_core.robot.kinematics import RobotKinematics
    from mace_core.robot.scenes import Obstacle
    from mace_core.robot.spheres import CollisionWorld, SphereCollisionChecker
    from mace_core.tensor import TensorSpec

    spec = TensorSpec(torch.device("cpu"), torch.float64)
    kin = RobotKinematics.panda(spec)
    checker = SphereCollisionChecker.from_file(kin, spec,
                                               os.path.join(MODELS_DIR, "panda_spheres.yaml"))
    ready = torch.tensor([[0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785]], dtype=torch.float64)
    hand = kin.ee_pose(ready)[0, :3, 3].tolist()
    world = CollisionWorld.from_obstacles([Obstacle(name="block", kind="box",
                                                    size=(0.1, 0.1, 0.1),
                                                    position=tuple(hand))], spec)
    plain, cell = IKTargetDensity(kin), IKTargetDensity(kin, workcell=(checker, world))
    x = cell.scaled(ready)[None].clone().requires_grad_(True)  # (1, 1, 7)
    z = torch.zeros(1, 9, dtype=torch.float64)
    depth, _ = checker.penetration_gradient(ready, world, cell.collision_margin_m)
    assert float(depth) > 0.01
    drop = plain(x, z) - cell(x, z)
    assert torch.allclose(drop.detach(), depth / cell.collision_scale_m)
    (grad,) = torch.autograd.grad(cell(x, z).sum(), x)
    step = 1e-6
    for j in range(7):
        e = torch.zeros_like(x)
        e[..., j] = step
        with torch.no_grad():
            numeric = (cell(x + e, z) - cell(x - e, z)).sum() / (2 * step)
        analytic = float(grad[0, 0, j].detach())
        assert abs(float(numeric) - analytic) <= 1e-3 * max(1.0, abs(float(numeric)))


def test_the_weights_trust_region_holds_on_a_sharp_target():
    """A target 300 times as sharp as the toy (rewards in the thousands, as the IK target's):
    the weights' objective is scaled as the components' targets are, so no M-step moves
    q(o|z) by more than a few times its bound and no component is lost (unscaled: 0.12 and
    0.15 nats in the first two M-steps)."""
    from mace_core.ik.avips import AVIPSConfig, AVIPSTrainer

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = ConditionalGMM(1, 2, components=8, hidden=32, gate_hidden=32, init_std=0.3)
    config = AVIPSConfig()
    trainer = AVIPSTrainer(model, lambda x, z: 300 * toy_log_density(x, z)
                           - 2000 * (x ** 2).sum(-1), config)
    for _ in range(5):
        left = trainer.iteration(lambda: torch.rand(16, 1, generator=gen) * 2 - 1, gen)
        assert float(trainer.last_kl["weights"]) < 7 * config.epsilon_weights
        assert left["alive"] == 8


def test_the_covariance_regularization_bounds_the_condition_number():
    """Sec. 3.5.1: an ill-conditioned factor gets the offset that bounds its covariance's
    condition number (checked with its eigenvalues), a well-conditioned one passes unchanged,
    and gradients flow through the offset."""
    from mace_core.ik.avips import regularised_cholesky

    bad = torch.tensor([[1.0, 0.0, 0.0], [0.999, 0.01, 0.0], [0.3, 0.2, 1e-3]],
                       dtype=torch.float64, requires_grad=True)
    good = torch.tensor([[0.5, 0.0, 0.0], [0.1, 0.4, 0.0], [0.0, 0.1, 0.3]], dtype=torch.float64)
    both = torch.stack([bad, good])
    out = regularised_cholesky(both, 100.0)
    eig = torch.linalg.eigvalsh((out @ out.transpose(-1, -2)).detach())
    assert float(eig[0, -1] / eig[0, 0]) <= 100.0 + 1e-9
    eig_before = torch.linalg.eigvalsh((bad @ bad.T).detach())
    assert float(eig_before[-1] / eig_before[0]) > 1e5
    torch.testing.assert_close(out[1], good)
    out[0].diagonal().log().sum().backward()
    assert bad.grad is not None and bool(torch.isfinite(bad.grad).all())
    model = ConditionalGMM(2, 3, components=4, max_condition=50.0)
    _, chol = model.components_at(torch.randn(5, 2))
    eig = torch.linalg.eigvalsh((chol @ chol.transpose(-1, -2)).detach().double())
    assert float((eig[..., -1] / eig[..., 0]).max()) <= 50.0 * (1 + 1e-4)
    assert model.architecture["max_condition"] == 50.0


def test_a_component_at_its_own_contexts_is_rewarded_as_at_the_shared_ones():
    """Sec. 3.3's per-component contexts: given every component the batch's contexts, the
    rewards, parameters and responsibilities equal the shared-context path's (same draws)."""
    from mace_core.ik.avips import AVIPSConfig, AVIPSTrainer

    torch.manual_seed(0)
    model = ConditionalGMM(1, 2, components=4, hidden=16, gate_hidden=16, init_std=0.3)
    trainer = AVIPSTrainer(model, toy_log_density, AVIPSConfig())
    frozen = copy.deepcopy(model).requires_grad_(False)
    z = torch.rand(6, 1) * 2 - 1
    shared = trainer._rewards(frozen, z, torch.Generator().manual_seed(3))
    own = trainer._rewards(frozen, z.expand(4, 6, 1), torch.Generator().manual_seed(3))
    for a, b in zip(shared[:5], own[:5]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_context_resampling_trains_each_component_where_it_has_weight():
    """Sec. 3.3: each component's contexts are drawn from the batch in proportion to its weight
    there (a gate that gives z > 0 to one component, z < 0 to the other); one M-step in four
    is full; on the toy every mode is still found."""
    from mace_core.ik.avips import AVIPSConfig, AVIPSTrainer

    class SplitGate:
        def log_weights(self, z):
            first = torch.sigmoid(20 * z[:, 0])
            return torch.stack([first, 1 - first], -1).log()

    two = AVIPSTrainer(ConditionalGMM(1, 2, components=2), toy_log_density,
                       AVIPSConfig(resampled_contexts=400))
    gen = torch.Generator().manual_seed(1)
    drawn = two._resampled(SplitGate(), torch.rand(64, 1, generator=gen) * 2 - 1, gen)
    assert drawn.shape == (2, 400, 1)
    assert float((drawn[0] > 0).float().mean()) > 0.9
    assert float((drawn[1] < 0).float().mean()) > 0.9

    torch.manual_seed(0)
    model = ConditionalGMM(1, 2, components=8, hidden=32, gate_hidden=32, init_std=0.3)
    trainer = AVIPSTrainer(model, toy_log_density, AVIPSConfig(resampled_contexts=8))
    steps = [trainer.iteration(lambda: torch.rand(16, 1, generator=gen) * 2 - 1, gen)
             for _ in range(40)]
    assert [s["resampled"] for s in steps[:5]] == [False, True, True, True, False]
    assert 4 <= steps[-1]["alive"] <= 8
    assert min(mode_shares(model)) > 0.1, mode_shares(model)


def test_the_training_sets_the_components_initial_width():
    """``init_std`` is each component's initial standard deviation (scaled joints) at any
    pose, and a width outside (0, 2] is refused."""
    from mace_core.ik.avips_training import AVIPSTrainingConfig, build_model

    for width in (0.5, 0.1):
        model = build_model(AVIPSTrainingConfig(init_std=width, **TINY))
        _, chol = model.components_at(torch.randn(3, 9))
        std = torch.linalg.diagonal(chol)
        assert torch.allclose(std, torch.full_like(std, width), rtol=1e-4)
    with pytest.raises(ValueError, match="init_std"):
        AVIPSTrainingConfig(init_std=0.0).validate()
