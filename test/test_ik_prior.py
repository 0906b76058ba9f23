"""The autoregressive GMM prior: shapes, a normalized density, masking, training, weights I/O."""

import math
import os

import pytest
import torch
from threadpoolctl import threadpool_info

from mace_core.errors import ModelLoadError
from mace_core.ik import prior as prior_module
from mace_core.ik.prior import ARGMMConfig, ARGMMPrior
from mace_core.ik.registry import load_ik_prior, save_ik_prior
from mace_core.tensor import TensorSpec

from conftest import MODELS_DIR

TINY = ARGMMConfig(num_joints=2, context_dim=3, hidden=16, layers=2)
SPEC = TensorSpec.resolve("cpu", torch.float64)


def tiny_prior(seed=0):
    torch.manual_seed(seed)
    prior = ARGMMPrior(TINY, SPEC)
    prior.set_normalization(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 0.5]),
                            torch.zeros(3), torch.ones(3))
    return prior


def test_sample_and_log_prob_shapes():
    prior = tiny_prior()
    p = torch.randn(64, 3, dtype=torch.float64)
    q = prior.sample(p, SPEC.generator(0))
    assert q.shape == (64, 2)
    lp = prior.log_prob(q, p)
    assert lp.shape == (64,) and torch.isfinite(lp).all()


def test_density_integrates_to_one():
    prior = tiny_prior()
    grid = torch.linspace(-6.0, 6.0, 301, dtype=torch.float64)
    q1, q2 = torch.meshgrid(grid, grid, indexing="ij")
    q = torch.stack([q1.reshape(-1), q2.reshape(-1)], -1)
    p = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64).expand(len(q), 3)
    with torch.no_grad():
        density = prior.log_prob(q, p).exp()
    step = float(grid[1] - grid[0])
    assert math.isclose(float(density.sum()) * step * step, 1.0, rel_tol=2e-2)


def test_samples_follow_the_density():
    """Sampling draws from the density log_prob evaluates: the marginal CDF of each joint from
    100,000 samples matches the one integrated from log_prob on a grid."""
    prior = tiny_prior(3)
    grid = torch.linspace(-6.0, 6.0, 401, dtype=torch.float64)
    q1, q2 = torch.meshgrid(grid, grid, indexing="ij")
    q = torch.stack([q1.reshape(-1), q2.reshape(-1)], -1)
    p = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)
    with torch.no_grad():
        density = prior.log_prob(q, p.expand(len(q), 3)).exp().view(401, 401)
        samples = prior.sample(p.expand(100_000, 3), SPEC.generator(5))
    density = density / density.sum()
    for joint, marginal in enumerate((density.sum(1), density.sum(0))):
        grid_cdf = marginal.cumsum(0)
        edges = grid + 0.5 * float(grid[1] - grid[0])  # the grid's cells end half a step on
        sample_cdf = (samples[:, joint, None] <= edges).double().mean(0)
        gap = float((grid_cdf - sample_cdf).abs().max())
        assert gap < 0.01, gap


def test_one_broadcast_position_samples_as_many_rows():
    """Rows that are one position broadcast (stride 0) run the first network once: the same
    draws as the same position written out row by row."""
    prior = tiny_prior(1)
    p = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)
    with torch.no_grad():
        shared = prior.sample(p.expand(64, 3), SPEC.generator(4))
        rows = prior.sample(p.repeat(64, 1), SPEC.generator(4))
    assert torch.allclose(shared, rows, atol=1e-12)
    assert shared.std(0).min() > 0  # 64 different draws, not one copied


def test_numpy_and_torch_sampling_draw_the_same():
    """Without autograd on the CPU the draw runs in NumPy, with it in torch: the same
    generator gives the same configurations, for one broadcast position and for one per row."""
    prior = tiny_prior(2)
    for p in (torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64).expand(300, 3),
              torch.randn(300, 3, dtype=torch.float64, generator=SPEC.generator(1))):
        with torch.no_grad():
            fast = prior.sample(p, SPEC.generator(6))
        reference = prior.sample(p, SPEC.generator(6)).detach()
        assert torch.allclose(fast, reference, atol=1e-12)
        assert fast.std(0).min() > 0


def test_numpy_draw_follows_weights_changed_in_place():
    """The NumPy draw reads views of the parameters that it keeps between draws: an in-place
    step (adaptation's), a restored state and new normalization show in the next draw."""
    prior, other = tiny_prior(2), tiny_prior(3)
    p = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64).expand(50, 3)

    def both():
        with torch.no_grad():
            fast = prior.sample(p, SPEC.generator(6))
        return fast, prior.sample(p, SPEC.generator(6)).detach()

    first, _ = both()
    with torch.no_grad():
        prior.weights[-1].mul_(1.5)  # an optimizer's step, in place
    stepped, reference = both()
    assert torch.allclose(stepped, reference, atol=1e-12)
    assert not torch.allclose(stepped, first)
    prior.load_state_dict(other.state_dict())  # a request's start: copied in place
    prior.set_normalization(torch.tensor([-0.5, -1.0]), torch.tensor([2.0, 0.5]),
                            torch.full((3,), 0.1), torch.full((3,), 2.0))
    restored, reference = both()
    assert torch.allclose(restored, reference, atol=1e-12)
    assert not torch.allclose(restored, stepped)


def test_shipped_prior_draws_alike_in_numpy_and_torch():
    """The shipped prior in float32: the two paths agree to float32 rounding (a component
    chosen differently by that rounding would show as a large gap)."""
    prior = load_ik_prior(os.path.join(MODELS_DIR, "panda_ik.safetensors"),
                          TensorSpec.resolve("cpu"))
    p = torch.tensor([[0.5, 0.1, 0.4]]).expand(256, 3)
    with torch.no_grad():
        fast = prior.sample(p, torch.Generator().manual_seed(0))
    reference = prior.sample(p, torch.Generator().manual_seed(0)).detach()
    assert (fast - reference).abs().max() < 1e-4


def test_numpy_sampling_runs_its_blas_on_torchs_threads(monkeypatch):
    """The NumPy draw's matrix products use as many threads as torch is set to (NumPy's BLAS
    would otherwise take every core, and stall when another process holds one)."""
    seen = []
    inner = prior_module._sample_numpy

    def spy(*args):
        seen.append([lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"])
        return inner(*args)

    monkeypatch.setattr(prior_module, "_sample_numpy", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            tiny_prior().sample(torch.zeros(4, 3, dtype=torch.float64), SPEC.generator(0))
    finally:
        torch.set_num_threads(before)
    assert seen and seen[0] and all(n == 1 for n in seen[0])


def test_joint_i_does_not_see_later_joints():
    prior = tiny_prior()
    p = torch.randn(1, 3, dtype=torch.float64)
    q = torch.tensor([[0.1, 0.2]], dtype=torch.float64, requires_grad=True)
    out = prior._forward_all(torch.cat([p, q], -1))  # (J, 1, 3K)
    out[0].sum().backward()  # joint 0's mixture must not depend on q
    assert q.grad.abs().max() == 0


def test_training_raises_likelihood_of_data():
    prior = tiny_prior()
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(512, 3, generator=gen, dtype=torch.float64)
    q = torch.stack([0.5 * torch.tanh(p[:, 0]), -1.0 + 0.3 * p[:, 1].sin()], -1)
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    before = -prior.log_prob(q, p).mean().item()
    for _ in range(100):
        loss = -prior.log_prob(q, p).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < before - 1.0


def test_weights_round_trip_and_bad_files(tmp_path):
    prior = tiny_prior()
    path = tmp_path / "prior.safetensors"
    save_ik_prior(prior, str(path))
    loaded = load_ik_prior(str(path), SPEC)
    q, p = torch.zeros(3, 2, dtype=torch.float64), torch.ones(3, 3, dtype=torch.float64)
    assert torch.allclose(loaded.log_prob(q, p), prior.log_prob(q, p))
    with pytest.raises(ModelLoadError, match="not found"):
        load_ik_prior(str(tmp_path / "missing.safetensors"), SPEC)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_ik_prior(str(corrupt), SPEC)


@pytest.mark.parametrize("time_limit_min", [0.0, 1e-9])
def test_training_lowers_the_held_out_nll_and_honours_its_time_limit(time_limit_min):
    """``train_ik_prior`` on Panda configurations: the held-out NLL falls below the untrained
    prior's; a time limit ends the run early, after less than one epoch."""
    from mace_core.ik.training import IKTrainingConfig, train_ik_prior
    from mace_core.robot.kinematics import RobotKinematics

    kin = RobotKinematics.panda(SPEC)
    q = kin.sample_uniform(4000, SPEC.generator(0))
    p = kin.ee_position(q)
    arch = ARGMMConfig(hidden=32, layers=2)
    cfg = IKTrainingConfig(samples=4000, epochs=3, batch_size=256, learning_rate=3e-3,
                           holdout_fraction=0.1, time_limit_min=time_limit_min)
    torch.manual_seed(cfg.seed)
    untrained = ARGMMPrior(arch, SPEC)
    untrained.set_normalization(kin.lower, kin.upper, p.mean(0), p.std(0))
    prior, figures = train_ik_prior(q, p, cfg, SPEC, arch=arch, log=lambda _s: None)
    assert figures["heldout_size"] == 400 and figures["train_size"] == 3600
    if time_limit_min:
        assert figures["epochs_run"] < 1.0
        return
    assert figures["epochs_run"] == 3.0
    with torch.no_grad():
        start_nll = -untrained.log_prob(q, p).mean().item()
    assert figures["heldout_nll"] < start_nll - 1.0


def test_a_pose_conditioned_prior_reads_the_orientation():
    """``conditioning = "pose"``: 9 context numbers (position, two rotation columns); training
    takes them, and at one position two orientations give other samples and likelihoods."""
    from mace_core.ik.conditioning import context_of
    from mace_core.ik.training import IKTrainingConfig, train_ik_prior
    from mace_core.robot.kinematics import RobotKinematics

    kin = RobotKinematics.panda(SPEC)
    q = kin.sample_uniform(2000, SPEC.generator(1))
    poses = kin.ee_pose(q)
    cfg = IKTrainingConfig(samples=2000, epochs=2, batch_size=256, learning_rate=3e-3,
                           holdout_fraction=0.1, hidden=32, layers=2, conditioning="pose")
    c = context_of("pose", poses)
    assert c.shape == (2000, 9) and torch.equal(c[:, :3], poses[:, :3, 3])
    assert torch.equal(context_of("position", poses), poses[:, :3, 3])
    prior, figures = train_ik_prior(q, c, cfg, SPEC, log=lambda _s: None)
    assert prior.config.conditioning == "pose" and prior.config.context_dim == 9
    assert math.isfinite(figures["heldout_nll"])
    turned = poses.clone()
    turned[:, :3, :3] = turned[:, :3, :3] @ torch.tensor(
        [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)  # Rz(90°)
    c_turned = context_of("pose", turned)
    with torch.no_grad():
        a = prior.sample(c[:64], SPEC.generator(3))
        b = prior.sample(c_turned[:64], SPEC.generator(3))
        assert not torch.allclose(a, b)
        assert not torch.allclose(prior.log_prob(q[:64], c[:64]),
                                  prior.log_prob(q[:64], c_turned[:64]))
    with pytest.raises(ModelLoadError, match="reads 9 numbers"):
        ARGMMConfig.from_dict({"context_dim": 3, "conditioning": "pose"})
    with pytest.raises(ModelLoadError, match="unknown IK prior conditioning"):
        ARGMMConfig.from_dict({"conditioning": "joint"})


def _three_joint_priors():
    """The same weights read in two orders: natural (joints 0, 1, 2) and (2, 0, 1), whose
    normalization is the natural one's joints in that order."""
    natural, turned = (ARGMMConfig(num_joints=3, context_dim=3, hidden=16, layers=2,
                                   components=3, joint_order=order)
                       for order in ((), (2, 0, 1)))
    torch.manual_seed(4)
    a = ARGMMPrior(natural, SPEC)
    b = ARGMMPrior(turned, SPEC)
    b.load_state_dict(a.state_dict())
    low, high = torch.tensor([-1.0, 10.0, -5.0]), torch.tensor([1.0, 12.0, -4.0])
    # b's joint 2 is a's first joint: a reads in b's factorization order
    a.set_normalization(low[[2, 0, 1]], high[[2, 0, 1]], torch.zeros(3), torch.ones(3))
    b.set_normalization(low, high, torch.zeros(3), torch.ones(3))
    return a, b


@pytest.mark.parametrize("grad", [False, True])  # NumPy's draw, torch's
def test_a_joint_order_factorizes_in_that_order(grad):
    """A prior whose factorization takes joint 2 first is the natural-order prior of the
    joints reordered: the same density and the same draws, returned in the joints' own order
    and ranges; ``sample_leading`` draws the first joints of its order alone, and all of them
    as ``sample`` does."""
    a, b = _three_joint_priors()
    p = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64).expand(200, 3)
    with torch.set_grad_enabled(grad):
        qa = a.sample(p, SPEC.generator(7)).detach()
        qb = b.sample(p, SPEC.generator(7)).detach()
        assert torch.allclose(qb, qa[:, [1, 2, 0]], atol=1e-12)  # b's joint k is a's rank(k)
        mean = qb.mean(0)  # each joint about its own range's middle
        assert abs(mean[0]) < 2.0 and abs(mean[1] - 11.0) < 2.0 and abs(mean[2] + 4.5) < 1.0
        assert torch.allclose(b.log_prob(qb, p), a.log_prob(qa, p), atol=1e-10)
        lead = b.sample_leading(p, SPEC.generator(7), 3).detach()
        assert torch.allclose(lead, qb[:, [2, 0, 1]], atol=1e-12)
        first = b.sample_leading(p, SPEC.generator(8), 1).detach()
    assert first.shape == (200, 1) and first.std() > 0
    assert abs(first.mean() + 4.5) < 1.0  # joint 2's range, not joint 0's


def test_leading_joint_follows_its_marginal():
    """The first joint drawn alone follows the same marginal as in whole draws (CDFs of
    20,000 draws each within 0.03)."""
    _, b = _three_joint_priors()
    p = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64).expand(20_000, 3)
    with torch.no_grad():
        alone = b.sample_leading(p, SPEC.generator(1), 1)[:, 0]
        whole = b.sample(p, SPEC.generator(2))[:, 2]
    edges = torch.linspace(-6.0, -3.0, 61, dtype=torch.float64)
    gap = ((alone[:, None] <= edges).double().mean(0)
           - (whole[:, None] <= edges).double().mean(0)).abs().max()
    assert gap < 0.03, float(gap)


def test_joint_order_is_kept_with_the_weights_and_checked(tmp_path):
    _, b = _three_joint_priors()
    path = tmp_path / "turned.safetensors"
    save_ik_prior(b, str(path))
    loaded = load_ik_prior(str(path), SPEC)
    assert loaded.config.order == (2, 0, 1)
    q, p = torch.zeros(3, 3, dtype=torch.float64), torch.ones(3, 3, dtype=torch.float64)
    assert torch.allclose(loaded.log_prob(q, p), b.log_prob(q, p))
    for order in ([0, 1], [0, 0, 1], [0, 1, 3]):
        with pytest.raises(ModelLoadError, match="not an order"):
            ARGMMConfig.from_dict({"num_joints": 3, "joint_order": order})
