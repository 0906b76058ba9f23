"""Shape completion in the support frame: where the object stands is inferred with its shape
(:mod:`mace_core.shape.placement`), on a stand-in VAE whose encoder is exact."""

from __future__ import annotations

import math

import pytest
import torch

from mace_core.errors import InvalidRequestError
from mace_core.shape.completion import (MACEVAEModel, ShapeCompleter, ShapeCompletionConfig,
                                        ShapeCompletionRequest)
from mace_core.shape.data import sample_box_clouds
from mace_core.shape.placement import (HEIGHT_STD_SHARE, PlacedShapeModel, initial_placement,
                                       place, placement_with_height, split, unplace)
from mace_core.shape.vae import ShapePrior, ShapePriorEntry
from test_shape_completion import SPEC, BoxFamilyVAE


def test_place_and_unplace_are_inverse_and_a_centred_shape_is_set_down():
    gen = SPEC.generator(0)
    canonical = torch.rand(4, 50, 3, generator=gen) - 0.5  # centred, as the objects prior
    p = torch.tensor([[0.1, -0.2, math.log(0.3)]]).repeat(4, 1)
    placed, lift = place(canonical, p, standing=False)
    assert torch.allclose(placed[..., 2].amin(dim=1), torch.zeros(4), atol=1e-6)
    assert torch.allclose(unplace(placed, p, lift), canonical, atol=1e-6)
    standing, lift = place(canonical, p, standing=True)
    assert torch.equal(lift, torch.zeros(4))


def test_the_placement_likelihood_adds_the_placements_gaussian():
    vae = BoxFamilyVAE()
    model = PlacedShapeModel(MACEVAEModel(vae), torch.tensor([0.1, 0.0, 0.0, 0.0]),
                             torch.tensor([0.05, 0.05, 0.0, 0.0]), standing=True)
    x = model.sample(6, SPEC.generator(1))
    placed, p, lift = split(x)
    assert x.shape == (6, vae.config.num_points + 2, 3) and torch.all(p[:, 2] == 0.0)
    shape_part = MACEVAEModel(vae).log_likelihood_fn(unplace(placed, p, lift))()
    u = (p[:, :2] - torch.tensor([0.1, 0.0])) / 0.05
    expected = shape_part + (-0.5 * u * u).sum(dim=1)  # log σ_u = 0 at the start
    assert torch.allclose(model.log_likelihood_fn(x)(), expected, atol=1e-5)
    assert torch.allclose(model.initial_log_likelihood(x), expected, atol=1e-5)


def test_a_centred_shape_may_stand_off_its_set_down_height():
    """A centred prior's placement has a fourth dimension, the height above the set-down
    (a decoded shape's lowest point is loose): drawn from its Gaussian, carried in the sample,
    undone with the rest, and rated by the likelihood; a standing prior's stays at 0."""
    vae = BoxFamilyVAE()
    seen = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.0, 0.1], [0.0, 0.1, 0.2]])
    mean, std = initial_placement(seen, metric=False, length_scale=0.5, standing=False)
    size = 0.5 * math.exp(float(mean[2]))
    assert mean[3] == 0.0 and float(std[3]) == pytest.approx(HEIGHT_STD_SHARE * size)
    assert initial_placement(seen, metric=True, length_scale=0.5)[1][3] == 0.0
    model = PlacedShapeModel(MACEVAEModel(vae), mean, std, standing=False)
    x = model.sample(6, SPEC.generator(3))
    placed, p, lift = split(x)
    dz = placement_with_height(x)[:, 3]
    assert dz.abs().max() > 0.0
    assert torch.allclose(placed[..., 2].amin(dim=1), dz, atol=1e-6)  # set down, then raised
    canonical = unplace(placed, p, lift)
    assert torch.allclose(place(canonical, p, standing=False)[0][..., 2].amin(dim=1),
                          torch.zeros(6), atol=1e-6)
    shape_part = MACEVAEModel(vae).log_likelihood_fn(canonical)()
    u = (placement_with_height(x) - mean) / torch.where(std > 0, std, torch.ones_like(std))
    expected = shape_part + (-0.5 * u * u)[:, [0, 1, 3]].sum(dim=1)
    assert torch.allclose(model.initial_log_likelihood(x), expected, atol=1e-4)


@pytest.fixture(scope="module")
def box_completer() -> ShapeCompleter:
    vae = BoxFamilyVAE(num_points=1024)
    entry = ShapePriorEntry(name="boxes", weights="-", architecture=vae.config)
    config = ShapeCompletionConfig(num_samples=64, quantile=1 / 8, gradient_steps=16,
                                   iterations=10, placement_iterations=30, learning_rate=0.05,
                                   pool_size=16, observation_points=64, candidate_points=256)
    return ShapeCompleter({"boxes": ShapePrior(entry, vae)}, config, SPEC)


def test_a_box_seen_from_one_side_is_found_where_it_stands(box_completer):
    """A 0.3 x 0.2 x 0.35 m box, turned by 90 degrees and moved to (0.15, -0.1) on the table,
    seen from one side: the points behind a vertical plane through its centre, across its
    diagonal (a cut parallel to a face would leave a smaller box as good an answer). The answer,
    in the support frame and in metres, has its faces where the seen ones are."""
    edges = torch.tensor([[0.2, 0.3, 0.35]])  # turned by 90 degrees: x and y swapped
    full = sample_box_clouds(edges, 3000, SPEC.generator(2), angle=torch.zeros(1))[0]
    where = torch.tensor([0.15, -0.1, 0.0])
    truth = full + where
    seen = truth[(truth[:, 0] - where[0]) + (truth[:, 1] - where[1]) < 0]
    mean, _ = initial_placement(seen, metric=True, length_scale=0.5)
    # the seen side pulls the first guess off the centre
    assert (mean[:2] - where[:2]).norm() > 0.02, mean
    result = box_completer.complete(ShapeCompletionRequest(
        prior="boxes", points=seen, frame="support", num_completions=4, seed=0,
        time_budget_s=30.0))
    best = result.completions[0]
    assert result.placements.shape == (4, 3) and torch.all(result.placements[:, 2] == 1.0)
    # the seen faces (-x, -y, the bottom) are where the truth's are, and the answer stands
    # nearer the truth than the first guess; what lies beyond the cut is the prior's to say
    assert torch.allclose(best.amin(dim=0), truth.amin(dim=0), atol=0.012), best.amin(dim=0)
    assert (result.placements[0, :2] - where[:2]).norm() < (mean[:2] - where[:2]).norm()
    extent = best.amax(dim=0) - best.amin(dim=0)
    assert bool((extent > edges[0] - 0.03).all()), extent  # it covers what was seen


def test_the_canonical_frame_has_no_placement_and_bad_frames_are_refused(box_completer):
    points = torch.tensor([[0.0, 0.0, 0.1], [0.1, 0.0, 0.1], [0.0, 0.1, 0.2]])
    result = box_completer.complete(ShapeCompletionRequest(prior="boxes", points=points,
                                                           iterations=1, seed=0))
    assert result.placements is None
    with pytest.raises(InvalidRequestError, match="frame must be one of"):
        box_completer.complete(ShapeCompletionRequest(prior="boxes", points=points,
                                                      frame="camera"))


def test_fingertip_contacts_find_where_the_box_stands(box_completer):
    """Five fingers closing on a box moved to (-0.12, 0.08) on the table (paper Sec. 4.1's
    pattern around a point inside it): the completions stand where the box does."""
    from mace_core.shape.benchmark import GRASP_DIRECTIONS, grasp_contacts

    edges = torch.tensor([[0.25, 0.2, 0.3]])
    full = sample_box_clouds(edges, 3000, SPEC.generator(4), angle=torch.zeros(1))[0]
    where = torch.tensor([-0.12, 0.08, 0.0])
    centre = where + torch.tensor([0.01, -0.02, 0.05])  # where the fingers close, inside it
    directions = torch.tensor(GRASP_DIRECTIONS, dtype=full.dtype)
    contacts = grasp_contacts(full + where, directions, 0.02, centre)
    result = box_completer.complete(ShapeCompletionRequest(
        prior="boxes", contacts=contacts, directions=directions, grasp_center=centre,
        finger_radius=0.02, frame="support", num_completions=2, seed=0, time_budget_s=30.0))
    assert result.placements.shape == (2, 3)
    assert (result.placements[0, :2] - where[:2]).norm() < 0.03, result.placements[0]
    assert abs(float(result.completions[0][:, 2].amin())) < 0.01  # on the table
