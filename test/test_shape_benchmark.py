"""``mace-bench shape``: a smoke run of the CLI (tiny settings) and the benchmark's helpers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mace_core.shape.benchmark import (GRASP_DIRECTIONS, GRASP_OOD_DIRECTIONS, METHODS, MODES,
                                       box_cases, box_posterior_reference, camera_view, chamfer_to,
                                       grasp_contacts, mean_pairwise_chamfer, object_cases,
                                       partial_box, plane_cut, random_viewpoint, symmetric_chamfer,
                                       top_cut)
from mace_core.shape.data import rotate_z, sample_box_clouds
from mace_core.shape.observations import REFERENCE_POINTS, chamfer_k
from mace_core.tensor import TensorSpec
from mace_ros import bench

SPEC = TensorSpec()
METRICS = {"mean_score", "mean_chamfer_to_truth", "mean_pairwise_chamfer", "median_time_s"}


def test_bench_shape_cli_writes_the_report(tmp_path, capsys):
    path = tmp_path / "shape.json"
    status = bench.main(["shape", "--prior", "boxes", "--cases", "2", "-k", "2", "--budget",
                         "1.0", "--iterations", "2", "--seed", "0", "--threads", "0", "--json",
                         str(path)])
    assert status == 0
    out = capsys.readouterr().out
    assert "MACE / prior Chamfer" in out and "random_cut" in out
    report = json.loads(path.read_text())
    assert set(report["methods"]) == set(METHODS)
    for summary in report["methods"].values():
        assert METRICS <= set(summary)
        assert 0.0 <= summary["mean_score"] <= 1.0
        assert summary["mean_chamfer_to_truth"] > 0.0 and summary["mean_pairwise_chamfer"] >= 0
    assert set(report["modes"]) == set(MODES["boxes"])
    for body in report["modes"].values():
        assert set(body["methods"]) == set(METHODS)
        assert all(METRICS <= set(m) for m in body["methods"].values())
    assert len(report["cases"]) == 2 * len(MODES["boxes"])
    case = report["cases"][0]
    assert {"case", "mode", "edges_m", "observed_points", "methods"} <= set(case)
    assert set(case["methods"]) == set(METHODS)
    assert all(c["methods"]["mace"]["iterations"] <= 2 for c in report["cases"])
    assert all(c["methods"]["prior"]["iterations"] == 0 for c in report["cases"])
    assert {"chamfer_ratio_mace_to_prior", "time_ok",
            "chamfer_ratio_box_posterior_to_prior"} <= set(report["targets"]["top_cut"])
    assert "reference, the true footprint" in out


def test_a_subset_of_modes_sees_what_a_full_run_sees(tmp_path):
    """Observations and draws are seeded per mode, not by the mode's place in ``--modes``."""
    rows = {}
    for name, modes in (("all", ",".join(MODES["boxes"])), ("one", "grasp")):
        path = tmp_path / f"{name}.json"
        assert bench.main(["shape", "--prior", "boxes", "--cases", "1", "-k", "2", "--methods",
                           "prior,prior_best", "--modes", modes, "--seed", "3", "--no-warmup",
                           "--json", str(path)]) == 0
        rows[name] = {c["mode"]: c for c in json.loads(path.read_text())["cases"]}
    for method in ("prior", "prior_best"):
        assert (rows["one"]["grasp"]["methods"][method]["chamfer_to_truth"]
                == rows["all"]["grasp"]["methods"][method]["chamfer_to_truth"])
    for row in rows["all"].values():  # `prior` is K plain draws in every mode, not the best K
        methods = row["methods"]
        assert methods["prior_best"]["mean_score"] > methods["prior"]["mean_score"], row


def test_bench_shape_rejects_an_unknown_mode(capsys):
    assert bench.main(["shape", "--prior", "boxes", "--modes", "view", "--no-warmup"]) == 2
    assert "modes ['view'] unknown for 'boxes'" in capsys.readouterr().err


def test_plane_cuts_keep_what_they_say():
    case = box_cases(1, 0, 2048, 4096, SPEC)[0]
    kept = plane_cut(case.dense, torch.tensor([0.3, -0.2, 0.9]), 0.4)
    assert abs(len(kept) / len(case.dense) - 0.4) < 0.01
    low = top_cut(case.dense)
    height = float(case.dense[:, 2].max())
    assert float(low[:, 2].max()) <= 0.5 * height + 1e-6
    assert math.isclose(case.info["edges_m"][2], height, rel_tol=0.02)
    for cut in ("top", "side", "random"):
        box, observed = partial_box(cut, 4, SPEC)
        assert 0.2 * len(box.dense) < len(observed) < 0.8 * len(box.dense), cut


def test_test_boxes_are_not_the_training_draw():
    """Training draws its boxes from generator seeds 1000-3000 (seed 0): these differ."""
    from mace_core.shape.data import random_box_edges

    ours = torch.tensor([c.info["edges_m"] for c in box_cases(5, 0, 16, 16, SPEC)])
    for seed in (1000, 2000):
        theirs = random_box_edges(5, SPEC.generator(seed))
        assert not torch.allclose(ours, theirs, atol=1e-3)


def test_box_posterior_keeps_the_footprint_and_draws_the_unseen_height():
    """Top half hidden: heights uniform from the cut to 0.5 m; the top face seen: the truth's."""
    case = box_cases(1, 2, 2048, 4096, SPEC)[0]
    height = case.info["edges_m"][2]
    cut = top_cut(case.dense)
    draws = box_posterior_reference(case, dict(points=cut), 64, SPEC.generator(0))
    assert draws.shape == (64, 2048, 3)
    tops = draws[..., 2].amax(dim=1)
    assert float(tops.min()) >= float(cut[:, 2].max()) - 1e-3 and float(tops.max()) <= 0.5
    assert float(tops.max() - tops.min()) > 0.5 * (0.5 - 0.5 * height)
    # the truth's footprint: turned back by the truth's angle, the extents are its edges
    back = rotate_z(draws[:2], torch.full((2,), -case.info["angle_rad"]))
    extents = back[..., :2].amax(dim=1) - back[..., :2].amin(dim=1)
    torch.testing.assert_close(extents, torch.tensor([case.info["edges_m"][:2]] * 2),
                               atol=0.01, rtol=0)
    whole = box_posterior_reference(case, dict(points=case.dense), 4, SPEC.generator(0))
    torch.testing.assert_close(whole[..., 2].amax(dim=1), torch.full((4,), height), atol=2e-4,
                               rtol=0)


def test_grasp_contacts_lie_on_the_fingers_lines():
    case = box_cases(1, 1, 2048, 4096, SPEC)[0]
    for directions in (GRASP_DIRECTIONS, GRASP_OOD_DIRECTIONS):
        d = torch.tensor(directions)
        contacts = grasp_contacts(case.dense, d, 0.02)
        assert contacts.shape == (5, 3)
        along = (contacts * -d).sum(-1)
        radial = (contacts.norm(dim=-1) ** 2 - along ** 2).clamp_min(0).sqrt()
        assert (radial <= 0.02 + 1e-6).all() and (along > 0.0).all()
    assert GRASP_DIRECTIONS[4] == (1.0, 0.0, 0.0) and GRASP_OOD_DIRECTIONS[4] == (-1.0, 0.0, 0.0)


def test_grasp_contacts_close_on_the_grasp_center():
    """A 0.2 x 0.4 x 0.3 m box standing on the xy plane, grasped 0.05 m above it: the +x finger
    (moving along -x) touches the +x face at the centre's height, not the bottom edge."""
    edges = torch.tensor([[0.2, 0.4, 0.3]])
    cloud = sample_box_clouds(edges, 20000, SPEC.generator(0), angle=torch.zeros(1))[0]
    center = torch.tensor([0.0, 0.0, 0.05])
    contacts = grasp_contacts(cloud, torch.tensor([[-1.0, 0.0, 0.0]]), 0.01, center)
    assert contacts[0, 0] == pytest.approx(0.1, abs=1e-6)  # on the +x face
    assert abs(float(contacts[0, 2]) - 0.05) <= 0.01 and abs(float(contacts[0, 1])) <= 0.01


def test_chamfer_metrics_match_the_core_definition():
    gen = torch.Generator().manual_seed(0)
    clouds = torch.rand(3, 300, 3, generator=gen)
    truth = torch.rand(400, 3, generator=gen)
    expected = chamfer_k(clouds, truth, k=1) / REFERENCE_POINTS
    torch.testing.assert_close(chamfer_to(clouds, truth, chunk=2), expected, rtol=1e-4,
                               atol=1e-7)
    pairs = [float(symmetric_chamfer(clouds[i:i + 1], clouds[j:j + 1]))
             for i in range(3) for j in range(i + 1, 3)]
    assert mean_pairwise_chamfer(clouds) == pytest.approx(np.mean(pairs), rel=1e-5)
    assert mean_pairwise_chamfer(clouds[:1]) == 0.0
    assert float(symmetric_chamfer(clouds[:1], clouds[:1])) == pytest.approx(0.0, abs=1e-6)


def test_held_out_object_and_its_camera_view():
    case = object_cases(1, 0, 2048, 4096, SPEC)[0]
    assert case.info["mesh"].startswith("random_urdfs/") and case.truth.shape == (2048, 3)
    assert int(case.info["mesh"].split("/")[1]) % 10 == 0  # every 10th mesh is held out
    assert float(case.dense.norm(dim=-1).max()) <= 0.5 + 1e-4  # the diameter-1 ball
    view = random_viewpoint(SPEC.generator(0), 1.5)
    assert view.norm().item() == pytest.approx(1.5)
    seen = camera_view(case.dense, view, 0.03, 0.03)
    assert 0.15 * len(case.dense) < len(seen) < 0.75 * len(case.dense)
    # the camera sees the side facing it
    assert float((seen.mean(0) - case.dense.mean(0)) @ view.to(seen)) > 0.0


def test_bench_shape_placed_at_random(tmp_path, capsys):
    """``--placement random``: the truth and its observation moved together onto the table,
    the three methods answered in the support frame, Chamfer in canonical units."""
    from mace_core.shape.placed_benchmark import PLACED_METHODS

    path = tmp_path / "placed.json"
    assert bench.main(["shape", "--prior", "objects", "--cases", "2", "-k", "2", "--budget",
                       "2.0", "--iterations", "2", "--modes", "random_cut,grasp",
                       "--placement", "random", "--no-warmup", "--json", str(path)]) == 0
    assert "placed at random" in capsys.readouterr().out
    report = json.loads(path.read_text())
    assert list(report["modes"]) == ["random_cut", "grasp"]
    assert all(set(m) == set(PLACED_METHODS) for m in report["modes"].values())
    for row in report["cases"]:
        where = row["placement"]
        assert abs(where["x"]) <= 0.2 and abs(where["y"]) <= 0.2
        assert 0.05 <= where["scale"] <= 0.3
        for m in row["methods"].values():
            assert m["chamfer_to_truth"] > 0.0 and m["time_s"] > 0.0
        # knowing where it stands beats drawing the prior at the observed centroid
        assert (row["methods"]["align_then_complete"]["chamfer_to_truth"]
                < row["methods"]["prior"]["chamfer_to_truth"])


def test_a_placement_moves_turns_sizes_and_sets_down():
    from mace_core.shape.placed_benchmark import Placement, _aligned

    canonical = torch.tensor([[0.5, 0.0, -0.5], [0.0, 0.0, 0.5]])
    where = Placement(x=0.1, y=-0.2, yaw=math.pi / 2, scale=0.2, lift=0.1)
    placed = where.apply(canonical)
    assert torch.allclose(placed, torch.tensor([[0.1, -0.1, 0.0], [0.1, -0.2, 0.2]]), atol=1e-6)
    aligned, shift, factor = _aligned(placed, metric=False, standing=False, length_scale=1.0)
    assert torch.allclose(aligned * factor + shift, placed, atol=1e-6)
    assert float(aligned.norm(dim=1).max()) == pytest.approx(0.5)  # into the diameter-1 ball


def test_placed_box_posterior_knows_the_seen_faces_and_draws_the_unseen():
    """A placed box seen whole is its own posterior; cut by a vertical plane across its x edge,
    the x face behind the cut is drawn beyond every seen point, the other faces stay put."""
    from mace_core.shape.placed_benchmark import Placement, placed_box_posterior

    case = box_cases(1, 2, 2048, 4096, SPEC)[0]
    where = Placement(x=0.1, y=-0.05, yaw=0.7, scale=1.0, lift=0.0)
    truth = where.apply(case.truth)
    whole = placed_box_posterior(case, where, where.apply(case.dense), 4, SPEC.generator(0))
    # the truth's box resampled: Chamfer at the two samplings' own level (about 2e-4 m²)
    assert float(chamfer_to(whole, truth).max()) < 3e-4
    yaw = torch.full((1,), case.info["angle_rad"] + where.yaw)
    local = rotate_z(where.apply(case.dense)[None], -yaw)[0]  # the box's own axes
    seen = where.apply(case.dense)[local[:, 0] <= float(local[:, 0].median())]
    draws = placed_box_posterior(case, where, seen, 64, SPEC.generator(0))
    back = rotate_z(draws, -yaw.expand(64))
    lo, hi = back.amin(dim=1), back.amax(dim=1)
    seen_local = rotate_z(seen[None], -yaw)[0]
    torch.testing.assert_close(lo, seen_local.amin(dim=0).expand(64, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(hi[:, 1:], local.amax(dim=0)[1:].expand(64, 2), atol=1e-4,
                               rtol=0)
    assert float(hi[:, 0].min()) >= float(seen_local[:, 0].max()) - 1e-4
    assert float((hi[:, 0] - lo[:, 0]).max()) <= 0.5 + 1e-4
    assert float(hi[:, 0].max() - hi[:, 0].min()) > 0.1  # the unseen face is drawn, not fixed
    median = rotate_z(placed_box_posterior(case, where, seen, 3, SPEC.generator(0),
                                           median=True), -yaw.expand(3))
    extents = median.amax(dim=1) - median.amin(dim=1)
    torch.testing.assert_close(extents, extents[:1].expand(3, 3), atol=1e-3, rtol=0)  # one box
