"""aVIPS' conditional Gaussian mixture (mace_core/ik/avips.py): its densities by hand, the split
KL its trust regions bound, removal, and plain amortized VI finding every mode of a toy."""

from __future__ import annotations

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
def test_each_method_trains_writes_and_reloads_the_same_mixture(method, tmp_path):
    from mace_core.ik.avips_training import (AVIPSTrainingConfig, evaluate, load_mixture,
                                             save_mixture, train)
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
    save_mixture(model, path, dict(config=vars(cfg), training=figures))
    loaded, meta = load_mixture(path)
    assert meta["training"]["steps"] == 20 and meta["config"]["method"] == method
    z = torch.randn(3, 9)
    x = torch.rand(3, 5, 7) * 2 - 1
    assert torch.allclose(loaded.log_prob(x, z), model.log_prob(x, z))


def test_a_file_that_is_not_a_mixture_is_refused(tmp_path):
    from safetensors.torch import save_file

    from mace_core.errors import ModelLoadError
    from mace_core.ik.avips_training import load_mixture

    path = str(tmp_path / "other.safetensors")
    save_file({"w": torch.zeros(2)}, path, metadata={"kind": "ik_argmm"})
    with pytest.raises(ModelLoadError, match="not an aVIPS mixture"):
        load_mixture(path)
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_mixture(str(tmp_path / "missing.safetensors"))
