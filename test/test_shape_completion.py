"""MACE-VAE adaptation and the ShapeCompleter engine (core, CPU, seeded, tiny model)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from mace_core.errors import InvalidRequestError
from mace_core.mace import MACEConfig, adapt
from mace_core.shape.completion import (MACEVAEModel, ShapeCompleter, ShapeCompletionConfig,
                                        ShapeCompletionRequest)
from mace_core.shape.data import random_box_edges, sample_box_clouds
from mace_core.shape.observations import partial_cloud_scores
from mace_core.shape.vae import PointCloudVAE, PointCloudVAEConfig, ShapePrior, ShapePriorEntry
from mace_core.tensor import TensorSpec

SPEC = TensorSpec(torch.device("cpu"), torch.float32)
TINY = PointCloudVAEConfig(num_points=64, latent_dim=4, encoder_widths=(32, 64),
                           encoder_hidden=64, decoder_widths=(64,), encoder_points=64,
                           length_scale=0.5, prior_std=1.0)
TINY_COMPLETION = ShapeCompletionConfig(num_samples=32, contact_num_samples=32, quantile=1 / 8,
                                        gradient_steps=8, iterations=4, learning_rate=0.05,
                                        pool_size=16, observation_points=32,
                                        candidate_points=64)


def _axis_aligned_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    edges = random_box_edges(n, gen)
    return sample_box_clouds(edges, TINY.num_points, gen, angle=torch.zeros(n))


class BoxFamilyVAE(nn.Module):
    """A stand-in VAE with an exact encoder: z (3,) <-> axis-aligned box edges 0.3 + 0.1 z.

    It isolates MACE-VAE's update of θ = (μ_z, log σ_z) from how well a network was trained.
    """

    def __init__(self, num_points: int = 96):
        super().__init__()
        self.config = PointCloudVAEConfig(num_points=num_points, latent_dim=3, length_scale=0.5)
        gen = SPEC.generator(0)
        self.register_buffer("template", sample_box_clouds(torch.ones(1, 3), num_points, gen,
                                                           angle=torch.zeros(1))[0])
        self.dummy = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.register_buffer("latent_mean", torch.zeros(3))  # the latent prior N(0, I)
        self.register_buffer("latent_std", torch.ones(3))

    def decode(self, z):
        edges = (0.3 + 0.1 * z).clamp_min(0.02)
        return self.template * edges[:, None, :]

    def encode(self, x):
        edges = x.amax(dim=1) - x.amin(dim=1)
        return (edges - 0.3) / 0.1, torch.full_like(edges, 2 * math.log(0.05))


@pytest.fixture(scope="module")
def tiny_vae(one_thread) -> PointCloudVAE:
    """An untrained tiny VAE: enough for the engine's shapes, order, timing and validation."""
    torch.manual_seed(0)
    return PointCloudVAE(TINY, SPEC).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def completer(tiny_vae) -> ShapeCompleter:
    entry = ShapePriorEntry(name="boxes", weights="-", architecture=TINY)
    return ShapeCompleter({"boxes": ShapePrior(entry, tiny_vae)}, TINY_COMPLETION, SPEC)


def _observation(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """A tall narrow box and its lower half (the top is cut away)."""
    gen = SPEC.generator(seed)
    edges = torch.tensor([[0.12, 0.45, 0.4]])
    full = sample_box_clouds(edges, 400, gen, angle=torch.zeros(1))[0]
    return full, full[full[:, 2] < 0.2]


def test_mace_vae_raises_the_mean_score():
    _, partial = _observation()
    model = MACEVAEModel(BoxFamilyVAE())

    def score(x):
        return partial_cloud_scores(x, partial, k=1, temperature=0.1, length_scale=0.5)

    trace = adapt(model, score, MACEConfig(num_samples=64, quantile=1 / 8, gradient_steps=16,
                                           iterations=8, learning_rate=0.05),
                  SPEC.generator(0))
    first, last = trace.iterations[0].mean_score, trace.iterations[-1].mean_score
    assert last > first + 0.2, (first, last)
    # the adapted prior concentrates on boxes 0.12 m wide and 0.45 m deep (z = -1.8, 1.5)
    torch.testing.assert_close(model.mu[:2].detach(), torch.tensor([-1.8, 1.5]), atol=0.3,
                               rtol=0)
    assert model.log_std[:2].max().item() < -0.5
    assert (trace.pool_scores[:-1] >= trace.pool_scores[1:]).all()


def test_mace_vae_surrogate_is_minus_kl(tiny_vae):
    model = MACEVAEModel(tiny_vae)
    x = model.sample(5, SPEC.generator(1))
    ll = model.log_likelihood_fn(x)()
    assert ll.shape == (5,) and (ll <= 0).all()
    torch.testing.assert_close(ll, model.initial_log_likelihood(x))
    ll.sum().backward()
    assert model.mu.grad is not None and model.log_std.grad is not None


def test_completer_returns_sorted_completions(completer):
    _, partial = _observation()
    req = ShapeCompletionRequest(prior="boxes", points=partial, num_completions=5, seed=0,
                                 time_budget_s=30.0)
    res = completer.complete(req)
    assert res.completions.shape == (5, TINY.num_points, 3)
    assert res.scores.shape == (5,)
    assert (res.scores[:-1] >= res.scores[1:]).all()
    assert res.iterations_run == TINY_COMPLETION.iterations
    assert len(res.mean_scores) == res.iterations_run
    assert res.total_time_s >= res.sampling_time_s > 0 and res.adaptation_time_s >= 0
    assert any("downsampled" in n for n in res.notes)  # 100+ points kept as 32
    again = completer.complete(req)
    torch.testing.assert_close(again.completions, res.completions)  # seeded


def test_completer_with_viewpoint_and_contacts(completer):
    full, partial = _observation()
    res = completer.complete(ShapeCompletionRequest(
        prior="boxes", points=partial.numpy(), viewpoint=np.array([1.0, 1.0, 0.3]),
        num_completions=3, seed=1))
    assert res.completions.shape == (3, 64, 3) and ((0 <= res.scores) & (res.scores <= 1)).all()
    contacts = torch.tensor([[0.06, 0.0, 0.1], [-0.06, 0.0, 0.1]])
    res = completer.complete(ShapeCompletionRequest(
        prior="boxes", contacts=contacts, directions=-contacts, num_completions=2, seed=2))
    assert res.completions.shape == (2, 64, 3) and res.notes == []


def test_contacts_adapt_with_their_own_quantile(tiny_vae):
    """A partial cloud selects elites with ``quantile``, fingertip contacts with
    ``contact_quantile``: changing one leaves the other kind's answer as it was."""
    from dataclasses import replace

    entry = ShapePriorEntry(name="boxes", weights="-", architecture=TINY)
    _, partial = _observation()
    contacts = torch.tensor([[0.06, 0.0, 0.1], [-0.06, 0.0, 0.1]])
    requests = {"points": dict(points=partial),
                "contacts": dict(contacts=contacts, directions=-contacts)}
    answers = {}
    for name, q, q_contacts in (("base", 1 / 8, 1 / 8), ("points_q", 1.0, 1 / 8),
                                ("contacts_q", 1 / 8, 1.0)):
        config = replace(TINY_COMPLETION, quantile=q, contact_quantile=q_contacts)
        completer = ShapeCompleter({"boxes": ShapePrior(entry, tiny_vae)}, config, SPEC)
        answers[name] = {kind: completer.complete(ShapeCompletionRequest(
            prior="boxes", num_completions=4, seed=3, **fields)).completions
            for kind, fields in requests.items()}
    base = answers["base"]
    torch.testing.assert_close(answers["points_q"]["contacts"], base["contacts"])
    torch.testing.assert_close(answers["contacts_q"]["points"], base["points"])
    assert not torch.equal(answers["points_q"]["points"], base["points"])
    assert not torch.equal(answers["contacts_q"]["contacts"], base["contacts"])


def test_completer_iterations_zero_and_deadline(completer):
    _, partial = _observation()
    res = completer.complete(ShapeCompletionRequest(prior="boxes", points=partial,
                                                    num_completions=2, iterations=0, seed=0))
    assert res.iterations_run == 0 and res.completions.shape == (2, 64, 3)
    res = completer.complete(ShapeCompletionRequest(prior="boxes", points=partial,
                                                    num_completions=2, iterations=1000,
                                                    time_budget_s=0.3, seed=0))
    assert res.stopped_by_deadline and res.iterations_run < 1000
    assert res.total_time_s < 0.3 + 1.0  # at most about one iteration late on a loaded CPU
    assert any("time budget" in n for n in res.notes)


@pytest.mark.parametrize("changes, message", [
    (dict(points=np.zeros((0, 3))), "empty"),
    (dict(points=[[0.0, 0.0, math.nan]]), "NaN"),
    (dict(points=[[0.0, 0.0, math.inf]]), "NaN or inf"),
    (dict(points=[[0.0, 0.0]]), "shape"),
    (dict(points=None), "neither"),
    (dict(contacts=[[1.0, 0, 0]], directions=[[-1.0, 0, 0]]), "both"),
    (dict(points=None, contacts=[[1.0, 0, 0]]), "directions"),
    (dict(points=None, contacts=[[1.0, 0, 0]], directions=[[0.0, 0, 0]]), "non-zero"),
    (dict(points=None, contacts=[[1.0, 0, 0]], directions=[[1.0, 0, 0], [0, 1.0, 0]]),
     "same shape"),
    (dict(prior="planes"), "unknown prior"),
    (dict(num_completions=0), "num_completions"),
    (dict(num_completions=10_000), "num_completions"),
    (dict(time_budget_s=0.0), "time_budget_s"),
    (dict(time_budget_s=math.nan), "time_budget_s"),
    (dict(iterations=-1), "iterations"),
    (dict(viewpoint=[1.0, 2.0]), "viewpoint"),
    (dict(time_budget_s=1e9), "max_time_budget_s"),
    (dict(iterations=2147483647), "max_iterations"),
    (dict(points=[[0.0, 0.0, 1e39], [0.1, 0.0, 0.1]]), "max_coordinate"),
    (dict(points=[[0.0, 0.0, 1e30], [0.1, 0.0, 0.1]]), "max_coordinate"),
    (dict(viewpoint=[1e30, 0.0, 0.0]), "max_coordinate"),
    (dict(points=None, contacts=[[0.1, 0, 0]], directions=[[-1.0, 0, 0]],
          finger_radius=1e160), "finger_radius"),
    (dict(points=None, contacts=[[0.1, 0, 0]], directions=[[-1.0, 0, 0]],
          grasp_center=[0.0, 0.0, 1e300]), "max_coordinate"),
    (dict(prior="p" * 10_000), r"'p{100}'\.\.\. \(10000 characters\)"),
])
def test_invalid_requests_raise(completer, changes, message):
    fields = dict(prior="boxes", points=[[0.0, 0.0, 0.1], [0.1, 0.0, 0.1]], seed=0)
    fields.update(changes)
    with pytest.raises(InvalidRequestError, match=message):
        completer.complete(ShapeCompletionRequest(**fields))


def test_hidden_top_does_not_shrink_the_completions_to_the_cut():
    """With the top half of a box hidden and no viewpoint, every height above the cut explains
    the observation. The density-corrected one-sided score leaves them open; the plain one
    preferred the smallest boxes (densest points) and returned heights at the cut (0.19 m)."""
    vae = BoxFamilyVAE(num_points=1024)
    entry = ShapePriorEntry(name="boxes", weights="-", architecture=vae.config)
    config = ShapeCompletionConfig(num_samples=64, quantile=1 / 8, gradient_steps=16,
                                   iterations=10, learning_rate=0.05, pool_size=16,
                                   observation_points=64, candidate_points=256)
    completer = ShapeCompleter({"boxes": ShapePrior(entry, vae)}, config, SPEC)
    full = sample_box_clouds(torch.tensor([[0.3, 0.3, 0.4]]), 2000, SPEC.generator(1),
                             angle=torch.zeros(1))[0]
    cut = 0.2
    heights = torch.stack([completer.complete(ShapeCompletionRequest(
        prior="boxes", points=full[full[:, 2] < cut], num_completions=8, seed=seed,
        time_budget_s=30.0)).completions[..., 2].amax(dim=1) for seed in range(3)])
    assert heights.min().item() > cut - 0.005, heights
    assert heights.mean().item() > cut + 0.05, heights


def test_large_clouds_are_downsampled_not_rejected(completer):
    gen = SPEC.generator(3)
    big = _axis_aligned_boxes(1, gen)[0].repeat(500, 1)  # 32000 points
    big = big + 1e-3 * torch.randn(big.shape, generator=gen)
    res = completer.complete(ShapeCompletionRequest(prior="boxes", points=big, seed=0,
                                                    num_completions=1, iterations=1))
    assert any("32000" in n for n in res.notes)
