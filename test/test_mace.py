"""Algorithm 1 on a toy model whose answer is known: a Gaussian learning to hit a region."""

import time

import pytest
import torch

from mace_core.errors import InvalidRequestError
from mace_core.mace import MACEConfig, adapt, elite_indices


class Gaussian:
    """p(x; θ) = N(μ, I) in 2-D with θ = μ."""

    def __init__(self):
        self.mu = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        self.mu0 = torch.zeros(2, dtype=torch.float64)

    def adapted_parameters(self):
        return [self.mu]

    def sample(self, n, generator):
        return self.mu.detach() + torch.randn(n, 2, generator=generator, dtype=torch.float64)

    def log_likelihood_fn(self, x):
        return lambda: -0.5 * ((x - self.mu) ** 2).sum(-1)

    def initial_log_likelihood(self, x):
        return -0.5 * ((x - self.mu0) ** 2).sum(-1)


def score(x):
    """0 outside the half-plane x0 > 2 (a 'collision'), else closeness to (3, 0)."""
    goal = torch.tensor([3.0, 0.0], dtype=x.dtype)
    return torch.where(x[:, 0] > 2.0, torch.exp(-(x - goal).norm(dim=-1)),
                       torch.zeros(len(x), dtype=x.dtype))


def positive_fraction(model, n=4000):
    return float((score(model.sample(n, torch.Generator().manual_seed(9))) > 0).double().mean())


def test_cem_moves_mass_into_the_valid_region():
    model = Gaussian()
    before = positive_fraction(model)
    cfg = MACEConfig(num_samples=256, quantile=1 / 16, gradient_steps=4, iterations=30,
                     learning_rate=0.1)
    trace = adapt(model, score, cfg, torch.Generator().manual_seed(0))
    assert before < 0.05
    assert positive_fraction(model) > 0.8
    assert trace.iterations_run == 30
    assert trace.iterations[-1].positive_fraction > trace.iterations[0].positive_fraction
    assert (trace.pool_scores[:-1] >= trace.pool_scores[1:]).all()  # pool is best first


def test_importance_sampling_baseline_runs_and_improves_less_than_cem():
    results = {}
    for objective in ("cem", "is"):
        model = Gaussian()
        cfg = MACEConfig(num_samples=256, quantile=1 / 16, gradient_steps=4, iterations=10,
                         learning_rate=0.1, objective=objective)
        adapt(model, score, cfg, torch.Generator().manual_seed(0))
        results[objective] = positive_fraction(model)
    assert results["is"] > positive_fraction(Gaussian())
    assert results["cem"] >= results["is"]


def test_deadline_first_batch_and_early_stop():
    model = Gaussian()
    cfg = MACEConfig(num_samples=64, iterations=1000, learning_rate=0.1)
    trace = adapt(model, score, cfg, torch.Generator().manual_seed(0),
                  deadline=time.perf_counter() - 1.0)
    assert trace.stopped_by_deadline and trace.iterations_run == 0
    assert trace.pool_x.shape[1] == 2  # still answers with samples
    x = torch.full((64, 2), 3.0, dtype=torch.float64)
    trace = adapt(Gaussian(), score, cfg, torch.Generator().manual_seed(0),
                  first_batch=(x, score(x)), stop_when=lambda px, ps: bool((ps > 0).all()))
    assert trace.iterations_run == 1
    assert torch.equal(trace.pool_x[0], x[0])


def test_elite_is_the_top_quantile_and_config_is_validated():
    s = torch.tensor([0.1, 0.9, 0.5, 0.0, 0.7, 0.3, 0.2, 0.8])
    assert sorted(elite_indices(s, 0.25).tolist()) == [1, 7]
    assert elite_indices(s, 0.01).tolist() == [1]  # at least one
    for bad in (dict(quantile=0.0), dict(num_samples=0), dict(objective="x"),
                dict(learning_rate=float("nan")), dict(gradient_steps=0)):
        with pytest.raises(InvalidRequestError):
            MACEConfig(**bad).validate()


def test_keep_best_ends_with_the_best_scored_parameters():
    """A score that drops after the second batch: keep_best restores the θ the best batch
    rated (θ_0: the first two batches tie and the first best is kept); without it the loop
    ends with its last θ."""
    calls = []

    def fading(x):
        calls.append(1)
        return torch.full((len(x),), 1.0 if len(calls) <= 2 else 0.5, dtype=x.dtype)

    cfg = MACEConfig(num_samples=64, quantile=1 / 8, gradient_steps=2, iterations=5,
                     learning_rate=0.1)
    model = Gaussian()
    trace = adapt(model, fading, cfg, torch.Generator().manual_seed(0))
    assert trace.kept_iteration == 0 and trace.iterations_run == 5
    assert torch.equal(model.mu.detach(), model.mu0)
    calls.clear()
    last = Gaussian()
    trace = adapt(last, fading, MACEConfig(**{**cfg.__dict__, "keep_best": False}),
                  torch.Generator().manual_seed(0))
    assert trace.kept_iteration == 4
    assert not torch.equal(last.mu.detach(), last.mu0)
