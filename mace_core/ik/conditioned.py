"""The IK prior at one target, as :func:`mace.adapt` sees it: :class:`_ConditionedPrior` (all
weights tuned, samples clamped to the joint limits) and :class:`_ProjectedPrior` (its samples
moved onto a full pose by the closed form), used by :mod:`.adapter`."""

from __future__ import annotations

import numpy as np
import torch

from ..robot.closed_form_ik import FREE_JOINT, PandaClosedFormIK
from .prior import ARGMMPrior


class _ConditionedPrior:
    """An IK prior at one target, as :func:`mace.adapt` sees it (all weights tuned): its context
    ``(C,)`` is the target position, or the full pose for a pose-conditioned prior."""

    def __init__(self, prior: ARGMMPrior, initial: ARGMMPrior, context: torch.Tensor,
                 lower: torch.Tensor, upper: torch.Tensor):
        self.prior, self.initial, self.context = prior, initial, context
        self.lower, self.upper = lower, upper  # (7,) joint limits, rad

    def adapted_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.prior.parameters())

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``(n, 7)`` samples projected onto the joint limits: the mixtures' tails spill over
        the limits (a fifth of raw samples), and the nearest in-limit configuration is as good a
        candidate."""
        q = self.prior.sample(self.context.expand(n, -1), generator)
        return q.clamp(self.lower, self.upper)

    def closed_form_seeds(self, n: int, generator: torch.Generator,
                          free_joint: int = FREE_JOINT) -> torch.Tensor:
        """``(n, 7)`` seeds for the closed form, which reads only each seed's free joint (q7;
        :class:`~.refinement.AnalyticRefiner` takes every branch at it): that joint drawn from
        the prior's marginal, the others at the middle of their range. A prior whose
        factorization takes the free joint first draws it with its first network alone
        (:meth:`~.prior.ARGMMPrior.sample_leading`: a seventh of a draw); any other draws
        whole configurations (the same marginal, the other joints unused)."""
        if not (isinstance(self.prior, ARGMMPrior) and self.prior.config.order[0] == free_joint):
            return self.sample(n, generator)
        drawn = self.prior.sample_leading(self.context.expand(n, -1), generator, 1)[:, 0]
        lower, upper = self.lower, self.upper
        if drawn.device.type != "cpu":
            seeds = (0.5 * (lower + upper)).expand(n, -1).clone()
            seeds[:, free_joint] = drawn.clamp(lower[free_joint], upper[free_joint])
            return seeds
        # a few small arrays: NumPy's calls cost less than torch's
        lower, upper = lower.numpy(), upper.numpy()
        seeds = np.tile(0.5 * (lower + upper), (n, 1))
        seeds[:, free_joint] = drawn.numpy().clip(lower[free_joint], upper[free_joint])
        return torch.from_numpy(seeds)

    def log_likelihood_fn(self, q: torch.Tensor):
        c = self.context.expand(q.shape[0], -1)
        return lambda: self.prior.log_prob(q, c)

    def initial_log_likelihood(self, q: torch.Tensor) -> torch.Tensor:
        return self.initial.log_prob(q, self.context.expand(q.shape[0], -1))


class _ProjectedPrior(_ConditionedPrior):
    """The prior whose samples are moved onto a full-pose target by the closed form (the
    branch nearest each sample at its q7; samples with none stay as drawn): Algorithm 1
    unchanged, its elites the projected configurations. The score then separates exact
    collision-free solutions (S = 1) from the rest, and adaptation moves the prior to the
    q7 values and branches whose solutions are free (issue: the cabinet's shelves)."""

    def __init__(self, prior: ARGMMPrior, initial: ARGMMPrior, context: torch.Tensor,
                 lower: torch.Tensor, upper: torch.Tensor, closed_form: PandaClosedFormIK,
                 pose: torch.Tensor):
        super().__init__(prior, initial, context, lower, upper)
        self.closed_form, self.pose = closed_form, pose  # (4, 4) float64 target pose

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``(n, 7)`` samples, each on the target pose where a branch exists at its q7."""
        q = super().sample(n, generator)
        projected, _ = self.closed_form.project(self.pose, q)
        return projected.to(q.dtype)
