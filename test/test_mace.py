"""Algorithm 1 on a toy model whose answer is known: a Gaussian learning to hit a region."""

import threading
import time

import pytest
import torch

from mace_core.deadline import Deadline
from mace_core.errors import InvalidRequestError
from mace_core.mace import MACEConfig, adapt, draw, elite_indices


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
                  deadline=Deadline(time.perf_counter() - 1.0))
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


def test_deadline_ends_the_gradient_steps_of_an_iteration():
    """M = 10^9 steps of one iteration: the loop must end at the deadline, mid-iteration (it
    would otherwise run for hours), and say so."""
    cfg = MACEConfig(num_samples=64, quantile=1 / 8, gradient_steps=10 ** 9, iterations=5,
                     learning_rate=1e-6)
    t0 = time.perf_counter()
    trace = adapt(Gaussian(), score, cfg, torch.Generator().manual_seed(0),
                  deadline=Deadline.after(0.2))
    assert trace.stopped_by_deadline and trace.iterations_run == 1
    assert time.perf_counter() - t0 < 10.0  # ends at all: a hang would not come back


def test_cancel_ends_the_loop_at_once():
    """A cancel set from another thread (the node shutting down) ends the loop within a step,
    with no time limit at all."""
    cancel = threading.Event()
    cfg = MACEConfig(num_samples=64, quantile=1 / 8, gradient_steps=10 ** 9, iterations=10 ** 6,
                     learning_rate=1e-6)
    timer = threading.Timer(0.2, cancel.set)
    timer.start()
    trace = adapt(Gaussian(), score, cfg, torch.Generator().manual_seed(0),
                  deadline=Deadline.never(cancel))
    timer.join()
    assert trace.stopped_by_deadline and trace.iterations_run <= 1
    assert trace.pool_x.shape == (64, 2)


@pytest.mark.parametrize("objective", ["cem", "is"])
def test_chunked_fitting_takes_the_same_steps(objective):
    """Gradients accumulated over chunks of 7 rows equal those of the whole batch: the same θ
    after one iteration on the same batch."""
    model_a, model_b = Gaussian(), Gaussian()
    first = draw(model_a, score, 200, torch.Generator().manual_seed(1), 50)
    for model, chunk in ((model_a, 7), (model_b, 200)):
        cfg = MACEConfig(num_samples=200, quantile=1 / 4, gradient_steps=3, iterations=1,
                         learning_rate=0.05, objective=objective, chunk_size=chunk)
        adapt(model, score, cfg, torch.Generator().manual_seed(0), first_batch=first)
    assert torch.allclose(model_a.mu.detach(), model_b.mu.detach(), atol=1e-12)
    assert not torch.equal(model_a.mu.detach(), model_a.mu0)


def test_draw_stops_between_chunks_at_the_deadline():
    model = Gaussian()
    x, s = draw(model, score, 5000, torch.Generator().manual_seed(0), 1000,
                Deadline(time.perf_counter() - 1.0))
    assert x.shape == (1000, 2) and s.shape == (1000,)  # one chunk at least, no more
    x, s = draw(model, score, 5000, torch.Generator().manual_seed(0), 1000)
    assert x.shape == (5000, 2) and s.shape == (5000,)


def test_nan_scores_count_as_failures():
    """A score function that returns NaN (a failed simulation) gives no NaN in the pool, and
    keep_best still has a θ to restore."""
    def broken(x):
        return torch.full((len(x),), float("nan"), dtype=x.dtype)

    cfg = MACEConfig(num_samples=32, quantile=1 / 8, gradient_steps=2, iterations=3,
                     learning_rate=0.1)
    trace = adapt(Gaussian(), broken, cfg, torch.Generator().manual_seed(0))
    assert trace.iterations_run == 3
    assert torch.isfinite(trace.pool_scores).all() and (trace.pool_scores == 0).all()
