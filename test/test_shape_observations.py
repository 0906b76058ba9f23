"""Partial-cloud and contact simulators and scores against hand-computed cases (core, CPU)."""

import math

import pytest
import torch

from mace_core.shape.observations import (REFERENCE_POINTS, chamfer_k, contact_scores,
                                          farthest_point_indices, one_sided_chamfer,
                                          partial_cloud_scores, simulate_contacts, visible_mask)


def _plane_grid(x: float, n: int = 11, half: float = 0.5) -> torch.Tensor:
    """(n*n, 3) grid on the plane X = x, y and z in [-half, half]."""
    t = torch.linspace(-half, half, n)
    y, z = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([torch.full_like(y, x), y, z], -1).reshape(-1, 3)


def test_z_buffer_sees_the_front_plane_only():
    front, back = _plane_grid(0.5), _plane_grid(-0.5)
    cloud = torch.cat([front, back])[None]  # (1, 242, 3)
    vis = visible_mask(cloud, torch.tensor([5.0, 0.0, 0.0]), torch.zeros(3), pixel=0.2,
                       depth_tolerance=0.05)
    assert vis.shape == (1, 242)
    assert vis[0, :121].all() and not vis[0, 121:].any()
    # seen from the other side the roles swap; from the side (along y) both planes show
    vis = visible_mask(cloud, torch.tensor([-5.0, 0.0, 0.0]), torch.zeros(3), 0.2, 0.05)
    assert not vis[0, :121].any() and vis[0, 121:].all()
    vis = visible_mask(cloud, torch.tensor([0.0, 0.0, 5.0]), torch.zeros(3), 0.2, 0.05)
    assert vis[0, :121].any() and vis[0, 121:].any()


def test_points_behind_the_camera_are_invisible():
    cloud = torch.tensor([[[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]]])
    vis = visible_mask(cloud, torch.tensor([2.0, 0.0, 0.0]), torch.zeros(3), 0.1, 0.05)
    assert vis.tolist() == [[True, False]]


def test_partial_cloud_score_hand_computed():
    obs = torch.tensor([[0.0, 0.0, 0.0]])
    cand = torch.tensor([[[0.1, 0.0, 0.0], [0.0, 0.2, 0.0], [5.0, 0.0, 0.0]]])
    # one-sided (no viewpoint), k=2: mean of 0.01 and 0.04, in ℓ = 1, summed over 2048
    s = partial_cloud_scores(cand, obs, k=2, temperature=0.1, length_scale=1.0)
    assert s.item() == pytest.approx(math.exp(-0.1 * 0.025 * REFERENCE_POINTS), rel=1e-4)
    # with a visibility mask hiding the far point, the candidate->observation term adds
    # mean(0.01, 0.04) (k clipped to the single observed point)
    vis = torch.tensor([[True, True, False]])
    s = partial_cloud_scores(cand, obs, k=2, temperature=0.1, length_scale=1.0, visible=vis)
    assert s.item() == pytest.approx(math.exp(-0.1 * 0.05 * REFERENCE_POINTS), rel=1e-4)
    # a candidate that contains the observation scores 1 with k = 1
    assert partial_cloud_scores(cand, cand[0, :1], 1, 0.1, 1.0).item() == pytest.approx(1.0)


def test_one_sided_chamfer_hand_computed():
    obs = torch.tensor([[0.0, 0.0, 0.0]])
    scored = torch.tensor([[[0.3, 0.0, 0.0], [5.0, 0.0, 0.0]]])
    held_out = torch.tensor([[[0.2, 0.0, 0.0], [0.0, 3.0, 0.0]]])
    # 0.3² to the nearest scored point, less 0.1² from the nearest held-out point to it
    cd = one_sided_chamfer(obs, scored, held_out, k=1, length_scale=1.0)
    assert cd.item() == pytest.approx(0.08 * REFERENCE_POINTS, rel=1e-4)
    # the scores pass the held-out points on; a held-out point farther out clamps to 0
    s = partial_cloud_scores(scored, obs, 1, 0.1, 1.0, held_out=held_out)
    assert s.item() == pytest.approx(math.exp(-0.1 * 0.08 * REFERENCE_POINTS), rel=1e-4)
    far = torch.tensor([[[0.0, 0.6, 0.0], [0.0, 3.0, 0.0]]])
    assert one_sided_chamfer(obs, scored, far, k=1, length_scale=1.0).item() == 0.0


def test_one_sided_chamfer_ignores_point_density_but_not_offsets():
    """Two candidates hold the observed unit square: one is that square, the other a 2 x 2
    square around it (a quarter of the density there). The plain one-sided CD is about four
    times larger for the sparse one; the corrected one is near 0 for both, and still large
    for a candidate 0.1 off the surface."""
    gen = torch.Generator().manual_seed(0)

    def square(n: int, side: float) -> torch.Tensor:
        xy = side * torch.rand(n, 2, generator=gen) - (side - 1.0) / 2
        return torch.cat([xy, torch.zeros(n, 1)], dim=-1)

    obs = square(128, 1.0)
    dense, sparse = torch.stack([square(512, 1.0), square(512, 2.0)]).unbind()
    held = torch.stack([square(512, 1.0), square(512, 2.0)])
    cands = torch.stack([dense, sparse])
    plain = chamfer_k(obs, cands, k=1, one_sided=True)
    corrected = one_sided_chamfer(obs, cands, held, k=1, length_scale=1.0)
    assert plain[1] > 3.0 * plain[0] > 3.0  # 2048 A / (π n): about 1.3 and 5.1
    assert (corrected < 0.3 * plain[0]).all(), (plain, corrected)
    lifted = cands[:1] + torch.tensor([0.0, 0.0, 0.1])
    off = one_sided_chamfer(obs, lifted, held[:1] + torch.tensor([0.0, 0.0, 0.1]), 1, 1.0)
    assert off.item() > 0.8 * 0.01 * REFERENCE_POINTS


def test_partial_cloud_score_ranks_the_true_shape_first():
    front = _plane_grid(0.5)
    shifted = front + torch.tensor([0.1, 0.0, 0.0])
    cands = torch.stack([shifted, front, front * 1.5])
    s = partial_cloud_scores(cands, front, k=5, temperature=0.1, length_scale=1.0)
    assert s.argmax().item() == 1 and ((s >= 0) & (s <= 1)).all()


def test_contacts_hand_computed():
    cloud = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 1.0, 0.0],
                           [-2.0, 0.0, 0.05]]])
    directions = torch.tensor([[-1.0, 0.0, 0.0],  # from +x toward the origin
                               [2.0, 0.0, 0.0],  # from -x (not normalised)
                               [0.0, 0.0, -1.0]])  # from +z: nothing within the radius
    contacts, hit = simulate_contacts(cloud, directions, finger_radius=0.1)
    expected = torch.tensor([[[1.0, 0.0, 0.0], [-2.0, 0.0, 0.05], [0.0, 0.0, 0.0]]])
    torch.testing.assert_close(contacts, expected)
    assert hit.tolist() == [[True, True, False]]


def test_contact_score_hand_computed():
    cloud = torch.tensor([[[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]],
                          [[1.2, 0.0, 0.0], [-1.0, 0.0, 0.0]],
                          [[9.0, 0.0, 0.0], [-9.0, 0.0, 0.0]]])
    directions = torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    observed = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    s = contact_scores(cloud, observed, directions, finger_radius=0.1, length_scale=2.0)
    # errors: 0; (0.2 + 0) / 2 / ℓ = 0.05; (8 + 8) / 2 / 2 = 4 -> clipped at 0
    torch.testing.assert_close(s, torch.tensor([1.0, 0.95, 0.0]))


def test_farthest_point_sampling_covers_the_cloud():
    pts = torch.cat([torch.zeros(100, 3), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])])
    idx = farthest_point_indices(pts, 3)
    assert set(idx.tolist()) >= {100, 101}
    assert farthest_point_indices(pts, 500).shape == (102,)
