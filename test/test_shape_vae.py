"""Point-cloud VAE, Chamfer distances, box data, registry and weights (core, CPU, tiny)."""

import pytest
import torch

from mace_core.errors import ModelLoadError
from mace_core.shape.data import random_box_edges, rotate_z, sample_box_clouds
from mace_core.shape.observations import REFERENCE_POINTS, chamfer_k
from mace_core.shape.training import chamfer_loss, main_shape
from mace_core.shape.vae import (PointCloudVAE, PointCloudVAEConfig, ShapePriorEntry,
                                 fit_latent_prior, gaussian_kl, load_shape_priors, load_vae,
                                 parse_shape_registry, save_vae_weights)
from mace_core.tensor import TensorSpec

SPEC = TensorSpec(torch.device("cpu"), torch.float32)
TINY = PointCloudVAEConfig(num_points=64, latent_dim=8, encoder_widths=(16, 32),
                           encoder_hidden=32, decoder_widths=(32,), encoder_points=32,
                           length_scale=0.5, prior_std=1.0)


def test_vae_shapes_and_length_scale():
    torch.manual_seed(0)
    vae = PointCloudVAE(TINY, SPEC)
    x = torch.randn(5, 100, 3)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (5, 8)
    assert vae.decode(mu).shape == (5, 64, 3)
    assert vae.sample(3, SPEC.generator(0)).shape == (3, 64, 3)
    # the networks see clouds in units of length_scale: scaling both is the identity
    big = PointCloudVAE(PointCloudVAEConfig(**{**TINY.__dict__, "length_scale": 1.0}), SPEC)
    big.load_state_dict(vae.state_dict())
    torch.testing.assert_close(big.encode(x / 0.5)[0], mu)
    torch.testing.assert_close(big.decode(mu) * 0.5, vae.decode(mu))


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mu_q, logvar_q = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mu_p, log_std_p = torch.randn(6, generator=g), 0.3 * torch.randn(6, generator=g)
    q = torch.distributions.Normal(mu_q, torch.exp(0.5 * logvar_q))
    p = torch.distributions.Normal(mu_p, torch.exp(log_std_p))
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu_q, logvar_q, mu_p, log_std_p), expected)
    same = gaussian_kl(mu_p[None], 2 * log_std_p[None], mu_p, log_std_p)
    torch.testing.assert_close(same, torch.zeros(1), atol=1e-6, rtol=0)


def test_chamfer_k_hand_computed():
    x = torch.tensor([[0.0, 0.0, 0.0]])
    y = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    # k=1: x->y 1; y->x mean(1, 9) = 5
    assert chamfer_k(x, y, k=1).item() == pytest.approx(6 * REFERENCE_POINTS)
    # k=2: x->y (1 + 9) / 2 = 5; y->x only one point in x, k clipped to 1: 5
    assert chamfer_k(x, y, k=2).item() == pytest.approx(10 * REFERENCE_POINTS)
    assert chamfer_k(x, y, k=1, one_sided=True).item() == pytest.approx(REFERENCE_POINTS)
    # units of the length scale: distances halve when ℓ = 2, squared distances quarter
    assert chamfer_k(x, y, k=1, length_scale=2.0).item() == pytest.approx(1.5 * REFERENCE_POINTS)
    # masked points of y do not take part
    mask = torch.tensor([[True, False]])
    assert chamfer_k(x, y, k=1, y_mask=mask).item() == pytest.approx(2 * REFERENCE_POINTS)


def test_training_chamfer_loss_equals_chamfer_k_and_has_gradients():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 40, 3, generator=g, requires_grad=True)
    b = torch.randn(3, 30, 3, generator=g)
    loss = chamfer_loss(a, b, length_scale=0.5)
    torch.testing.assert_close(loss, chamfer_k(a.detach(), b, k=1, length_scale=0.5))
    loss.sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_box_points_lie_on_the_faces():
    gen = SPEC.generator(3)
    edges = random_box_edges(6, gen)
    angle = torch.linspace(-3.0, 3.0, 6)
    pts = sample_box_clouds(edges, 500, gen, angle=angle)
    assert pts.shape == (6, 500, 3)
    local = rotate_z(pts, -angle)
    local[..., 2] -= edges[:, None, 2] / 2
    half = edges[:, None, :] / 2
    assert (local.abs() <= half + 1e-5).all()
    on_face = ((local.abs() - half).abs() < 1e-5).any(-1)
    assert on_face.all()
    assert (pts[..., 2] >= -1e-6).all()


def test_registry_rejects_unknown_keys_and_missing_weights():
    good = {"boxes": {"weights": "w.safetensors", "architecture": {"latent_dim": 8}}}
    entries = parse_shape_registry(good)
    assert entries["boxes"].architecture.latent_dim == 8
    with pytest.raises(ModelLoadError, match="unknown keys"):
        parse_shape_registry({"boxes": {"weights": "w", "colour": "red"}})
    with pytest.raises(ModelLoadError, match="unknown architecture keys"):
        parse_shape_registry({"boxes": {"weights": "w", "architecture": {"layers": 3}}})
    with pytest.raises(ModelLoadError, match="no 'weights'"):
        parse_shape_registry({"boxes": {"architecture": {}}})
    with pytest.raises(ModelLoadError):
        parse_shape_registry({"boxes": {"weights": "w", "architecture": {"latent_dim": 0}}})


def test_weights_round_trip_and_mismatch(tmp_path):
    torch.manual_seed(4)
    vae = PointCloudVAE(TINY, SPEC)
    save_vae_weights(vae, tmp_path / "tiny.safetensors")
    entry = ShapePriorEntry(name="tiny", weights="tiny.safetensors", architecture=TINY)
    loaded = load_vae(entry, tmp_path, SPEC)
    assert not any(p.requires_grad for p in loaded.parameters())
    z = torch.randn(2, 8)
    torch.testing.assert_close(loaded.decode(z), vae.decode(z), atol=2e-3, rtol=2e-3)
    other = ShapePriorEntry(name="tiny", weights="tiny.safetensors",
                            architecture=PointCloudVAEConfig(**{**TINY.__dict__,
                                                                "latent_dim": 9}))
    with pytest.raises(ModelLoadError, match="shape"):
        load_vae(other, tmp_path, SPEC)
    with pytest.raises(ModelLoadError, match="not found"):
        load_vae(ShapePriorEntry("x", "missing.safetensors", TINY), tmp_path, SPEC)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError):
        load_vae(ShapePriorEntry("x", "bad.safetensors", TINY), tmp_path, SPEC)


def test_fitted_latent_prior_is_the_aggregate_posterior_and_is_stored(tmp_path):
    """fit_latent_prior sets mean E[μ(x)] and variance Var[μ(x)] + E[σ²(x)]; sampling and
    MACE-VAE's θ_0 use it; it survives a save and load; files without it keep N(0, σ_z² I)."""
    from mace_core.shape.completion import MACEVAEModel

    torch.manual_seed(5)
    vae = PointCloudVAE(TINY, SPEC)
    entry = ShapePriorEntry(name="tiny", weights="tiny.safetensors", architecture=TINY)
    save_vae_weights(vae, tmp_path / "tiny.safetensors")  # before the fit: no fitted prior
    clouds = [torch.randn(16, 100, 3, generator=SPEC.generator(i)) for i in range(3)]
    fit_latent_prior(vae, iter(clouds))
    mu, logvar = vae.encode(torch.cat(clouds))
    torch.testing.assert_close(vae.latent_mean, mu.mean(0))
    torch.testing.assert_close(vae.latent_std ** 2, mu.var(0) + logvar.exp().mean(0))
    assert not torch.allclose(vae.latent_std, torch.ones(8))
    model = MACEVAEModel(vae)
    torch.testing.assert_close(model.mu.detach(), vae.latent_mean)
    torch.testing.assert_close(model.log_std.detach().exp(), vae.latent_std)
    with torch.no_grad():
        vae.latent_std.fill_(1e-6)  # a point mass: every sample decodes the fitted mean
        torch.testing.assert_close(vae.sample(2, SPEC.generator(0))[1],
                                   vae.decode(vae.latent_mean[None])[0], atol=1e-4, rtol=0)
    old = load_vae(entry, tmp_path, SPEC)
    assert torch.equal(old.latent_mean, torch.zeros(8))
    assert torch.equal(old.latent_std, torch.full((8,), TINY.prior_std))
    save_vae_weights(vae, tmp_path / "tiny.safetensors")
    torch.testing.assert_close(load_vae(entry, tmp_path, SPEC).latent_mean, vae.latent_mean,
                               atol=2e-3, rtol=2e-3)


def test_training_command_writes_loadable_weights_and_card(tmp_path):
    (tmp_path / "reg.yaml").write_text(
        "boxes:\n  weights: tiny_boxes.safetensors\n  card: tiny_boxes.md\n"
        "  frame: metres\n  architecture:\n    num_points: 64\n    latent_dim: 4\n"
        "    encoder_widths: [8, 16]\n    encoder_hidden: 16\n    decoder_widths: [16]\n"
        "    encoder_points: 32\n    length_scale: 0.5\n")
    argv = ["--prior", "boxes", "--registry", str(tmp_path / "reg.yaml"), "--steps", "3",
            "--batch-size", "4", "--num-shapes", "20", "--held-out", "4", "--loss-points", "32"]
    assert main_shape(argv) == 0
    card = (tmp_path / "tiny_boxes.md").read_text()
    assert "Held-out reconstruction" in card and "--steps 3" in card
    assert "aggregate posterior of 4096 training draws" in card
    assert (tmp_path / "tiny_boxes.png").stat().st_size > 0
    priors = load_shape_priors(tmp_path / "reg.yaml", SPEC)
    assert priors["boxes"].vae.decode(torch.zeros(2, 4)).shape == (2, 64, 3)
