"""MACE: Model Adaptation with the Cross-Entropy method (Krupnik et al., CoRL 2023, Algorithm 1).

The loop is generic: anything that can sample, and give a differentiable (surrogate) log-likelihood
of its own samples, can be adapted. The IK prior tunes all its weights (Sec. 3.2.1, autoregressive
models); the point-cloud VAE tunes only its latent prior (MACE-VAE, Sec. 3.2.1).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .deadline import Deadline
from .errors import InvalidRequestError, quote

OBJECTIVES = ("cem", "is")


@dataclass
class MACEConfig:
    """Hyper-parameters of Algorithm 1. Every field can be overridden per request."""

    num_samples: int = 1024  #: N, samples drawn per iteration
    quantile: float = 1.0 / 64.0  #: q, fraction of the N samples kept as elite
    gradient_steps: int = 4  #: M, optimizer steps per iteration
    iterations: int = 20  #: T, iterations; 0 means no adaptation (prior samples only)
    learning_rate: float = 1e-4  #: Adam step size
    objective: str = "cem"  #: "cem" (Eq. 3, the paper's method) or "is" (Eq. 2 baseline)
    pool_size: int = 256  #: best samples kept across all iterations (the answer if time runs out)
    #: end with the θ whose batch scored best on average (E_θ[S], the quantity CEM raises), not
    #: the last θ: past its best, the selection can drive θ into a thin part of the feasible set
    #: (IK: ever nearer the target, ever closer to the obstacles) and the valid share collapses
    keep_best: bool = True
    #: rows per forward pass when drawing, scoring and fitting samples: the deadline is checked
    #: between chunks, so one chunk bounds how far a request overshoots its budget
    chunk_size: int = 1024

    def validate(self) -> None:
        """Raise InvalidRequestError on values the loop cannot run with."""
        if self.num_samples < 1:
            raise InvalidRequestError(f"num_samples must be >= 1, got {self.num_samples}")
        if not 0.0 < self.quantile <= 1.0:
            raise InvalidRequestError(f"quantile must be in (0, 1], got {self.quantile}")
        if self.gradient_steps < 1:
            raise InvalidRequestError(f"gradient_steps must be >= 1, got {self.gradient_steps}")
        if self.iterations < 0:
            raise InvalidRequestError(f"iterations must be >= 0, got {self.iterations}")
        if not (self.learning_rate > 0.0 and math.isfinite(self.learning_rate)):
            raise InvalidRequestError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.objective not in OBJECTIVES:
            raise InvalidRequestError(
                f"objective must be one of {OBJECTIVES}, got {quote(self.objective)}")
        if self.pool_size < 1:
            raise InvalidRequestError(f"pool_size must be >= 1, got {self.pool_size}")
        if self.chunk_size < 1:
            raise InvalidRequestError(f"chunk_size must be >= 1, got {self.chunk_size}")


class AdaptiveModel(Protocol):
    """What :func:`adapt` needs of a generative model p(x; θ)."""

    def adapted_parameters(self) -> list[torch.nn.Parameter]:
        """θ: the parameters the loop optimizes (all weights, or only (μ_z, σ_z))."""

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Draw ``n`` samples x ~ p(x; θ) without gradients: ``(n, ...)``."""

    def log_likelihood_fn(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Return ``f`` with ``f() -> (n,)`` = log p(x_i; θ) (or a surrogate) under the current θ.

        Work that does not depend on θ (e.g. encoding x with a frozen encoder) is done once here,
        not on each of the M gradient steps.
        """

    def initial_log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x_i; θ_0) under the unadapted prior: ``(n,)``. Needed by Eq. 2 only."""


ScoreFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class MACEIteration:
    """Figures of one iteration of Algorithm 1."""

    mean_score: float  #: mean S over the N samples
    threshold: float  #: δ, the ⌊qN⌋-th best score
    positive_fraction: float  #: fraction of samples with S > 0 (e.g. collision-free)
    elapsed_s: float  #: wall time since the loop started


@dataclass
class MACETrace:
    """What :func:`adapt` returns: the best samples seen and how the run went."""

    pool_x: torch.Tensor  #: best samples over all iterations, best first: (P, ...)
    pool_scores: torch.Tensor  #: their scores: (P,)
    iterations: list[MACEIteration] = field(default_factory=list)  #: one entry per iteration run
    stopped_by_deadline: bool = False  #: True when the time budget cut the loop short
    #: the iteration whose batch rated the θ the model ends with (``keep_best``): the last one
    #: when the best batch was the last (its θ has then taken one more set of steps)
    kept_iteration: int = -1

    @property
    def iterations_run(self) -> int:
        return len(self.iterations)


class _Pool:
    """Running top-P of (sample, score) pairs across iterations."""

    def __init__(self, size: int):
        self.size = size
        self.x: torch.Tensor | None = None
        self.s: torch.Tensor | None = None

    def add(self, x: torch.Tensor, s: torch.Tensor) -> None:
        if self.x is not None:
            x = torch.cat([self.x, x])
            s = torch.cat([self.s, s])
        k = min(self.size, s.shape[0])
        best = torch.topk(s, k).indices
        self.x, self.s = x[best], s[best]


def elite_indices(scores: torch.Tensor, quantile: float) -> torch.Tensor:
    """Indices of the top ⌊qN⌋ samples (at least one), Algorithm 1 line 5.

    The paper keeps every sample with S >= δ; taking exactly ⌊qN⌋ differs only on ties, and stops
    a batch of all-zero scores from fitting every sample.
    """
    k = max(1, int(math.floor(quantile * scores.shape[0])))
    return torch.topk(scores, k).indices


def _chunks(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` covering ``range(n)``."""
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


def _finite_scores(s: torch.Tensor) -> torch.Tensor:
    """Scores ``(N,)`` with NaN (a simulation that failed) as 0, clipped to [0, 1]."""
    return torch.nan_to_num(s, nan=0.0).clamp(0.0, 1.0)


def draw(model: AdaptiveModel, score: ScoreFn | None, n: int, generator: torch.Generator,
         chunk_size: int, deadline: Deadline | None = None
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Up to ``n`` samples ``(n', ...)`` of ``model`` and their scores ``(n',)`` (None without
    ``score``), drawn in chunks of ``chunk_size``.

    At least one chunk is drawn; no further chunk starts after ``deadline``, so ``n' < n`` when
    the budget ends (or the request is cancelled) during the draw.
    """
    xs, ss = [], []
    for part in _chunks(n, chunk_size):
        if xs and deadline is not None and deadline.expired():
            break
        with torch.no_grad():
            x = model.sample(part.stop - part.start, generator)
            xs.append(x)
            if score is not None:
                ss.append(_finite_scores(score(x)))
    if len(xs) == 1:
        return xs[0], (ss[0] if ss else None)
    return torch.cat(xs), (torch.cat(ss) if ss else None)


def _importance_weights(model: AdaptiveModel, x: torch.Tensor, s: torch.Tensor, chunk_size: int,
                        deadline: Deadline | None) -> torch.Tensor | None:
    """w_i S_i of Eq. 2 for samples ``x (N, ...)`` with scores ``s (N,)``: ``(N,)``, the ratios
    p(x_i; θ_0) / p(x_i; θ) self-normalized over the batch; None when the deadline comes first
    (computed in chunks, the deadline checked between them)."""
    log_w = []
    with torch.no_grad():
        for i, part in enumerate(_chunks(x.shape[0], chunk_size)):
            if i and deadline is not None and deadline.expired():
                return None
            log_w.append(model.initial_log_likelihood(x[part])
                         - model.log_likelihood_fn(x[part])())
        return torch.softmax(torch.cat(log_w), dim=0) * s


def _gradient_steps(model: AdaptiveModel, optimizer: torch.optim.Optimizer, x_fit: torch.Tensor,
                    weights: torch.Tensor | None, config: MACEConfig,
                    deadline: Deadline | None) -> int:
    """Up to M optimizer steps on the objective over ``x_fit (n, ...)``: the number taken.

    "cem" (``weights`` None) minimizes -mean log p(x_i; θ) over the elites (Eq. 3), "is" minimizes
    -Σ w_i log p(x_i; θ) (Eq. 2). The gradient is accumulated over chunks of ``chunk_size``
    rows; a step whose chunks the deadline interrupts is not applied.
    """
    n = x_fit.shape[0]
    parts = _chunks(n, config.chunk_size)
    log_liks = [model.log_likelihood_fn(x_fit[part]) for part in parts]
    for step in range(config.gradient_steps):
        optimizer.zero_grad(set_to_none=True)
        for i, (part, log_lik) in enumerate(zip(parts, log_liks)):
            if deadline is not None and (step or i) and deadline.expired():
                return step
            ll = log_lik()
            if weights is None:
                loss = -ll.mean() * ((part.stop - part.start) / n)
            else:
                loss = -(weights[part] * ll).sum()
            loss.backward()
        optimizer.step()
    return config.gradient_steps


def adapt(model: AdaptiveModel, score: ScoreFn, config: MACEConfig, generator: torch.Generator,
          deadline: Deadline | None = None,
          first_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
          stop_when: Callable[[torch.Tensor, torch.Tensor], bool] | None = None) -> MACETrace:
    """Run Algorithm 1 on ``model`` in place and return the best samples seen.

    Args:
        model: the generative model; its ``adapted_parameters()`` are changed in place.
        score: maps samples ``(N, ...)`` to scores S(o_i, o) in [0, 1]: ``(N,)``. A NaN score
            counts as 0 (a failed simulation).
        config: N, q, M, T, learning rate and objective.
        generator: random source for sampling (seeded by the caller for reproducibility).
        deadline: when the loop must end (or None). An iteration starts only if the mean
            duration of the previous ones says it ends before it; within an iteration, no
            sampling chunk, gradient step or gradient chunk starts after it, so the loop ends
            within one chunk's time of the deadline, or of a cancel.
        first_batch: samples ``(N, ...)`` already drawn from the unadapted model and their scores
            ``(N,)``, used as the first iteration's batch instead of drawing a new one.
        stop_when: called with the pool (samples, scores) after each iteration; returning True ends
            the loop early (e.g. once enough good samples are pooled).

    Objectives: "cem" maximizes Σ 1[S ≥ δ] log p(x_i; θ) (Eq. 3); "is" maximizes
    Σ w_i S_i log p(x_i; θ) with w_i = p(x_i; θ_0) / p(x_i; θ_{t-1}) (Eq. 2), self-normalized over
    the batch because the raw ratios overflow as soon as θ moves away from θ_0.
    """
    config.validate()
    start = time.perf_counter()
    pool = _Pool(config.pool_size)
    trace_iters: list[MACEIteration] = []
    params = model.adapted_parameters()
    # The fused kernel steps all 1.15M IK-prior weights in ~2 ms on a CPU core, ~15x the default.
    optimizer = (torch.optim.Adam(params, lr=config.learning_rate, fused=True)
                 if config.iterations else None)
    stopped = False
    best_mean, best_theta, best_is_last, best_it = -math.inf, None, True, -1
    for it in range(config.iterations):
        # No iteration starts that its measured mean duration says would end past the deadline.
        expected = (time.perf_counter() - start) / it if it else 0.0
        if deadline is not None and not deadline.allows(expected):
            stopped = True
            break
        if first_batch is not None:
            (x, s), first_batch = first_batch, None
            s = _finite_scores(s)
        else:
            x, s = draw(model, score, config.num_samples, generator, config.chunk_size, deadline)
        pool.add(x, s)
        if deadline is not None and deadline.expired():  # the draw itself ran into it
            stopped = True
            break
        # x was drawn from the current θ: its mean score rates θ before this iteration's steps
        best_is_last = float(s.mean()) > best_mean
        if config.keep_best and best_is_last:
            best_mean, best_it = float(s.mean()), it
            best_theta = [p.detach().clone() for p in params]
        elite = elite_indices(s, config.quantile)
        if config.objective == "cem":
            x_fit, weights = x[elite], None
        else:
            x_fit, weights = x, _importance_weights(model, x, s, config.chunk_size, deadline)
            if weights is None:
                stopped = True
                break
        steps = _gradient_steps(model, optimizer, x_fit, weights, config, deadline)
        trace_iters.append(MACEIteration(
            mean_score=float(s.mean()), threshold=float(s[elite[-1]]),
            positive_fraction=float((s > 0).float().mean()),
            elapsed_s=time.perf_counter() - start))
        if steps < config.gradient_steps:
            stopped = True
            break
        if stop_when is not None and stop_when(pool.x, pool.s):
            break
    kept = len(trace_iters) - 1
    if config.keep_best and best_theta is not None and not best_is_last:
        # the θ after the last steps was never scored; the last scored θ was worse than the best
        with torch.no_grad():
            for p, best in zip(params, best_theta):
                p.copy_(best)
        kept = best_it
    if pool.x is None:
        if first_batch is not None:
            pool.add(first_batch[0], _finite_scores(first_batch[1]))
        else:
            pool.add(*draw(model, score, config.num_samples, generator, config.chunk_size,
                           deadline))
    return MACETrace(pool_x=pool.x, pool_scores=pool.s, iterations=trace_iters,
                     stopped_by_deadline=stopped, kept_iteration=kept)
