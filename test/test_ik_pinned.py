"""Seeded IK requests answer exactly as they did before the request became named stages.

``test/data/ik_seeded_answers.json`` holds the answers of the pipeline as it was at commit
b5aef08 (one function with closures), recorded in float64 on the CPU by running this module:
``python test/test_ik_pinned.py``. The cases reach every stage (the fast path, clutter, rounds
while they add solutions, adaptation with rounds, rounds on the adapted model, prior-only
adaptation with either objective, a pose target), with budgets far beyond what they need, so
no stage is cut by the clock and the answers depend on the code alone.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from mace_core.ik.adapter import IKAdapter
from mace_core.ik.refinement import RefinementConfig
from mace_core.robot.collision import CollisionConfig
from mace_core.ik.request import IKAdaptConfig, IKRequest
from mace_core.robot.scenes import load_scene
from mace_core.tensor import TensorSpec

FIXTURE = Path(__file__).resolve().parent / "data" / "ik_seeded_answers.json"
SPEC = TensorSpec(torch.device("cpu"), torch.float64)

#: The sphere model accepts answers and DLS refines pose requests, as when the answers were
#: recorded (the exact backend and the closed form came later and answer differently).
#: ``weak_rounds``: an adapter whose rounds rarely reach the target (3 DLS iterations, 8 seeds,
#: no neighbour seeds): its first rounds add nothing, so its requests adapt, with a round after
#: each iteration.
#: The clutter settings are those of the recording too (the defaults changed later).
SPHERES = CollisionConfig(backend="spheres")
CLUTTER = dict(clutter_valid_fraction=0.04, clutter_samples=512)
CONFIGS = {"default": IKAdaptConfig(collision=SPHERES,
                                    pose_refinement_mode="dls", **CLUTTER),
           "weak_rounds": IKAdaptConfig(refinement=replace(RefinementConfig(), max_iterations=3),
                                        first_samples=8, refine_seeds=8, neighbour_share=0.0,
                                        collision=SPHERES, **CLUTTER)}

#: name -> (scene, target index, request fields[, adapter config name])
CASES = {
    "box_fast_path": ("box", 0, dict(num_solutions=8, seed=0)),
    "cabinet_clutter": ("cabinet", 0, dict(num_solutions=8, seed=1)),
    "wall_many": ("wall", 1, dict(num_solutions=24, seed=2)),
    "window_many": ("window", 2, dict(num_solutions=32, seed=3)),
    "wall_prior_only_cem": ("wall", 3, dict(num_solutions=8, seed=4, refinement="none",
                                            iterations=4)),
    "window_prior_only_is": ("window", 0, dict(num_solutions=8, seed=5, refinement="none",
                                               iterations=3, objective="is")),
    "box_pose": ("box", 1, dict(num_solutions=4, seed=6, orientation_tolerance=0.05,
                                rotation=np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0],
                                                   [0.0, 0.0, -1.0]]))),
    "cabinet_adapts_with_rounds": ("cabinet", 1, dict(num_solutions=8, seed=7, iterations=3),
                                   "weak_rounds"),
}


def seeded_request(name: str) -> IKRequest:
    scene_name, index, fields = CASES[name][:3]
    scene = load_scene(f"config/scenes/{scene_name}.yaml")
    target = scene.sample_targets(index + 1, torch.Generator().manual_seed(7),
                                  TensorSpec.resolve("cpu"))[index]
    return IKRequest(position=target.numpy(), obstacles=list(scene.obstacles),
                     time_budget_s=30.0, **fields)


@lru_cache(maxsize=None)
def adapter_for(config: str) -> IKAdapter:
    return IKAdapter.from_models("models", "panda_ik", CONFIGS[config], SPEC)


def answer(name: str) -> dict:
    """What the pin compares: every returned configuration and figure, and the counts."""
    config = CASES[name][3] if len(CASES[name]) > 3 else "default"
    result = adapter_for(config).solve(seeded_request(name))
    return dict(q=[s.q.tolist() for s in result.solutions],
                position_error=[s.position_error for s in result.solutions],
                collision_free=[s.collision_free for s in result.solutions],
                clearance=[s.clearance for s in result.solutions],
                num_found=result.num_found, iterations_run=result.iterations_run,
                valid_fraction_prior=result.valid_fraction_prior,
                valid_fraction_adapted=result.valid_fraction_adapted)


@pytest.mark.parametrize("name", sorted(CASES))
def test_seeded_answer_is_pinned(name):
    pinned = json.loads(FIXTURE.read_text())[name]
    got = answer(name)
    for key in ("num_found", "iterations_run", "collision_free"):
        assert got[key] == pinned[key], key
    for key in ("valid_fraction_prior", "valid_fraction_adapted"):
        assert got[key] == pytest.approx(pinned[key], abs=1e-12), key
    for key in ("q", "position_error", "clearance"):
        np.testing.assert_allclose(np.array(got[key]), np.array(pinned[key]), atol=1e-9,
                                   err_msg=key)


if __name__ == "__main__":
    answers = {name: answer(name) for name in sorted(CASES)}
    for name, a in answers.items():
        print(f"{name}: found {a['num_found']} of {len(a['q'])}, {a['iterations_run']} "
              f"iterations, valid {a['valid_fraction_prior']:.3f} -> "
              f"{a['valid_fraction_adapted']:.3f}")
    FIXTURE.write_text(json.dumps(answers, indent=1) + "\n")
