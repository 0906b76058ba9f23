"""aVIPS: a conditional Gaussian mixture trained by amortized variational inference against an
unnormalised density, with VIPS' per-component trust regions (Musekamp, master thesis, TU
Darmstadt 2023, Sec. 3; ``../shared/papers/avips-musekamp-2023.md``).

q(x | z) = Σ_o q(o | z) N(x; μ_o(z), L_o(z) L_o(z)ᵀ): one network per component predicts its
mean and log-Cholesky factor, a gate network the weights through a squared cosine
(:class:`ConditionalGMM`; light components are removed, Sec. 3.4.2). Training needs no data
set, only log p̃(x | z) and a way to draw contexts z:

- :func:`elbo_step`: plain amortized VI, a gradient step on the whole ELBO
  E_q[log p̃(x|z) − log q(x|z)] (reparameterized), the thesis' baseline;
- :class:`AVIPSTrainer`: the VIPS bound (Eq. 3.3): per-component objectives under trust
  regions on the mean and covariance parts of the component KL (Eq. 3.4, :func:`
  gaussian_kl_parts`, Lagrange multipliers by dual gradient steps), the weights under their own
  (Eq. 3.5), targets normalised per component, Adam's moments reset per E-step, light
  components removed. (Without the weights' entropy H(q(o|z)) in their objective, a first
  version collapsed onto one mode of a 4-mode toy, then diverged.)

:class:`IKTargetDensity` is the Panda's IK target (Sec. 4.1) over pose contexts drawn on the fly
(:func:`pose_contexts`). The learning rates adapt per component and for the gate (Sec. 3.2.2):
halfway towards rate · desired / actual KL change per step. On the 4-mode toy (8 components,
300 gradient steps each) aVIPS ended at ELBO -1.397 and weight entropy 1.707 against plain VI's
-1.433 and 1.605, the thesis' Table 5.2 finding. On the Panda, 3-4 minutes of CPU (10
components, 3 x 128; raw samples at 512 poses x 25) are far from the thesis: aVIPS 197 mm /
100 deg with 4 components left (weight entropy 0.40), plain VI 119 mm / 44 deg on one component
(0.00). The bound-based covariance regularization (Sec. 3.5.1, :func:`regularised_cholesky`)
bounds each component's condition number when the model is built with ``max_condition``;
context resampling (Sec. 3.3, ``resampled_contexts``) trains each component on contexts drawn
where it has weight, between full M-steps. Not yet here: adding components. Training and
measuring on the Panda: :mod:`.avips_training` (``mace-train avips``); :class:`MixturePrior`
is the trained mixture as MACE's pose prior, and a workcell's obstacles may join the target
(:class:`IKTargetDensity`).

Shapes: contexts ``(B, C)``, samples ``(B, N, D)``, per component ``(B, O, ...)``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

#: log p̃(x | z): samples ``(B, N, D)``, contexts ``(B, C)`` -> ``(B, N)``
LogDensity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _mlp(inputs: int, hidden: int, layers: int, outputs: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    width = inputs
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    mods.append(nn.Linear(width, outputs))
    return nn.Sequential(*mods)


class ConditionalGMM(nn.Module):
    """q(x | z) with ``components`` full-covariance Gaussians over ``dim`` dimensions.

    Args:
        context_dim, dim: sizes of z and x.
        components: O at the start (some may be removed later: :attr:`alive`).
        hidden, layers: each component network's hidden width and depth.
        gate_hidden: the gate network's hidden width (same depth).
        init_std: the components' initial standard deviation.
        max_condition: the largest condition number of a component's covariance that
            :func:`regularised_cholesky` lets through (Sec. 3.5.1); 0: none (the log-diagonal
            clamp alone, as priors trained before it was built were).
    """

    def __init__(self, context_dim: int, dim: int, components: int, hidden: int = 64,
                 layers: int = 2, gate_hidden: int = 64, init_std: float = 0.5,
                 max_condition: float = 0.0):
        super().__init__()
        self.dim, self.components = dim, components
        self.max_condition = max_condition
        #: the constructor's arguments (stored beside the weights)
        self.architecture = dict(context_dim=context_dim, dim=dim, components=components,
                                 hidden=hidden, layers=layers, gate_hidden=gate_hidden,
                                 init_std=init_std, max_condition=max_condition)
        # the factor's strictly lower entries (2, D(D-1)/2); a buffer, so that it moves with
        # the model to its device, but not stored with the weights
        self.register_buffer("_tril", torch.tril_indices(dim, dim, offset=-1), persistent=False)
        out = dim + dim + self._tril.shape[1]  # mean, log-diagonal, strictly lower part
        self.nets = nn.ModuleList(_mlp(context_dim, hidden, layers, out)
                                  for _ in range(components))
        for k, net in enumerate(self.nets):  # spread means, set the diagonal to init_std
            last = net[-1]
            nn.init.zeros_(last.weight)
            with torch.no_grad():
                last.bias.zero_()
                last.bias[:dim].uniform_(-0.8, 0.8, generator=torch.Generator().manual_seed(k))
                last.bias[dim:2 * dim] = math.log(init_std)
        self.gate = _mlp(context_dim, gate_hidden, layers, components)
        with torch.no_grad():  # equal weights at the start: cos² of π/4 everywhere
            self.gate[-1].weight.mul_(0.01)
            self.gate[-1].bias.fill_(math.pi / 4)
        self.register_buffer("alive", torch.ones(components, dtype=torch.bool))

    def log_weights(self, z: torch.Tensor) -> torch.Tensor:
        """log q(o | z): ``(B, O)`` (squared-cosine activation; removed components: -inf)."""
        w = torch.cos(self.gate(z)) ** 2 + 1e-12
        w = torch.where(self.alive, w, torch.zeros_like(w))
        # the log of a removed component's 0 is taken of a tiny number and then replaced, so
        # that no -inf enters the graph (its gradient would be NaN)
        logw = torch.log(w.clamp_min(1e-30) / w.sum(dim=-1, keepdim=True))
        return torch.where(self.alive, logw, torch.full_like(logw, -math.inf))

    def remove_light_components(self, z: torch.Tensor, threshold: float) -> int:
        """Remove the components whose mean weight over contexts ``z`` is below ``threshold``
        (Sec. 3.4.2); returns how many are left."""
        with torch.no_grad():
            self.alive &= self.log_weights(z).exp().mean(0) >= threshold
        return int(self.alive.sum())

    def components_at(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Means ``(B, O, D)`` and Cholesky factors ``(B, O, D, D)`` at contexts ``z (B, C)``,
        or, given each component its own contexts ``z (O, B, C)``, component o's at z[o]."""
        raw = self._all_nets(z)  # (B, O, out)
        d = self.dim
        mean = raw[..., :d]
        # log-diagonal kept within [log 1e-4, log 10]: an ill-conditioned factor inverts badly
        chol = torch.diag_embed(raw[..., d:2 * d].clamp(-9.2, 2.3).exp())
        chol[..., self._tril[0], self._tril[1]] = raw[..., 2 * d:]
        if self.max_condition > 0:
            chol = regularised_cholesky(chol, self.max_condition)
        return mean, chol

    def _all_nets(self, z: torch.Tensor) -> torch.Tensor:
        """Every component network at contexts ``z (B, C)`` (or each at its own, ``(O, B,
        C)``): ``(B, O, out)``, all of them in one batched product per layer (their weights
        stacked), not one network after the other: a third of the tensor operations, the same
        numbers (16 draws at one pose: 0.46 against 0.57 ms)."""
        h = z if z.dim() == 3 else z.unsqueeze(0).expand(len(self.nets), -1, -1)  # (O, B, C)
        layers = [k for k, m in enumerate(self.nets[0]) if isinstance(m, nn.Linear)]
        for k in layers:
            weight = torch.stack([net[k].weight for net in self.nets])  # (O, out, in)
            bias = torch.stack([net[k].bias for net in self.nets])  # (O, out)
            h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            if k != layers[-1]:
                h = torch.tanh(h)
        return h.transpose(0, 1)

    @staticmethod
    def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor,
                          chol: torch.Tensor) -> torch.Tensor:
        """log N(x; mean, chol cholᵀ) of ``x (B, N, D)`` under each of ``(B, O, ...)``:
        ``(B, N, O)``."""
        diff = x[:, :, None, :] - mean[:, None]  # (B, N, O, D)
        sol = torch.linalg.solve_triangular(chol[:, None].expand(*diff.shape[:3], -1, -1),
                                            diff.unsqueeze(-1), upper=False).squeeze(-1)
        logdet = torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)  # (B, O)
        d = x.shape[-1]
        return -0.5 * (sol * sol).sum(-1) - logdet[:, None] - 0.5 * d * math.log(2 * math.pi)

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log q(x | z) of ``x (B, N, D)``: ``(B, N)``."""
        mean, chol = self.components_at(z)
        return torch.logsumexp(self.log_weights(z)[:, None] + self.gaussian_log_prob(
            x, mean, chol), dim=-1)

    def sample(self, z: torch.Tensor, n: int, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """``n`` draws per context: ``(B, n, D)``."""
        with torch.no_grad():
            mean, chol = self.components_at(z)
            pick = torch.multinomial(self.log_weights(z).exp(), n, replacement=True,
                                     generator=generator)  # (B, n)
            eps = torch.randn(*pick.shape, self.dim, generator=generator, dtype=z.dtype,
                              device=z.device)
            m = torch.gather(mean, 1, pick[..., None].expand(-1, -1, self.dim))
            c = torch.gather(chol, 1, pick[..., None, None].expand(-1, -1, self.dim, self.dim))
            return m + (c @ eps.unsqueeze(-1)).squeeze(-1)

    def component_samples(self, z: torch.Tensor, n: int, generator=None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reparameterized draws of every component at contexts ``z`` (as
        :meth:`components_at`): ``x (B, O, n, D)``, with the means and Cholesky factors they
        came from."""
        mean, chol = self.components_at(z)
        eps = torch.randn(*mean.shape[:2], n, self.dim, generator=generator, dtype=z.dtype,
                          device=z.device)
        return mean[:, :, None] + (chol[:, :, None] @ eps.unsqueeze(-1)).squeeze(-1), mean, chol


def regularised_cholesky(chol: torch.Tensor, max_condition: float) -> torch.Tensor:
    """The bound-based covariance regularization (Sec. 3.5.1): Σ = L Lᵀ plus the smallest
    diagonal offset s that bounds its condition number by ``max_condition`` κ, chosen from
    bounds on its eigenvalues (Gershgorin's discs, and the trace for the largest): s = max((λ_max^u
    − κ λ_min^l) / (κ − 1), 0). Returns the Cholesky factors ``(..., D, D)`` of Σ + s I:
    ``chol`` itself where no offset is needed. Differentiable; an ill-conditioned factor inverts
    badly and biases the Mahalanobis distances, and with them the entropy, upwards (Eq. 3.7)."""
    cov = chol @ chol.transpose(-1, -2)
    diag = torch.diagonal(cov, dim1=-2, dim2=-1)
    off = cov.abs().sum(-1) - diag.abs()  # each row's off-diagonal sum
    upper = torch.minimum((diag + off).amax(-1), diag.sum(-1))
    lower = (diag - off).amin(-1).clamp_min(0.0)
    offset = ((upper - max_condition * lower) / (max_condition - 1.0)).clamp_min(0.0)
    if not bool((offset > 0).any()):
        return chol
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
    regular = torch.linalg.cholesky(cov + offset[..., None, None] * eye)
    return torch.where((offset > 0)[..., None, None], regular, chol)


def gaussian_kl_parts(mean: torch.Tensor, chol: torch.Tensor, old_mean: torch.Tensor,
                      old_chol: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(N ‖ Ñ) split into its mean part and its covariance part (Sec. 3.2): ``(B, O)`` each."""
    d = mean.shape[-1]
    diff = (old_mean - mean).unsqueeze(-1)
    sol = torch.linalg.solve_triangular(old_chol, diff, upper=False)
    kl_mu = 0.5 * (sol * sol).sum((-1, -2))
    m = torch.linalg.solve_triangular(old_chol, chol, upper=False)  # L̃⁻¹ L
    logdet = 2 * (torch.diagonal(old_chol, dim1=-2, dim2=-1).log().sum(-1)
                  - torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1))
    kl_sigma = 0.5 * (logdet + (m * m).sum((-1, -2)) - d)
    return kl_mu, kl_sigma


def elbo(model: ConditionalGMM, log_density: LogDensity, z: torch.Tensor, n: int,
         generator=None) -> torch.Tensor:
    """The ELBO per context ``(B,)``: Σ_o q(o|z) E_{x~q(x|o,z)}[log p̃(x|z) − log q(x|z)]
    (reparameterized per component: every component's samples carry gradients)."""
    x, _, _ = model.component_samples(z, n, generator)  # (B, O, n, D)
    b, o = x.shape[:2]
    flat = x.reshape(b, o * n, -1)
    gain = (log_density(flat, z) - model.log_prob(flat, z)).reshape(b, o, n).mean(-1)
    weights = model.log_weights(z).exp()
    return (weights * torch.where(model.alive, gain, torch.zeros_like(gain))).sum(-1)


def elbo_step(model: ConditionalGMM, optimizer: torch.optim.Optimizer,
              log_density: LogDensity, z: torch.Tensor, n: int, generator=None) -> float:
    """One gradient step of plain amortized VI on the whole ELBO; returns the batch's mean."""
    value = elbo(model, log_density, z, n, generator).mean()
    optimizer.zero_grad()
    (-value).backward()
    optimizer.step()
    return float(value.detach())


def _entropy(chol: torch.Tensor) -> torch.Tensor:
    """Entropy of each Gaussian ``(B, O)``."""
    d = chol.shape[-1]
    return torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1) + 0.5 * d * (
        1.0 + math.log(2 * math.pi))


@dataclass
class AVIPSConfig:
    """Settings of :class:`AVIPSTrainer` (the thesis' names)."""

    samples: int = 8  #: x drawn per component and context
    m_steps: int = 10  #: gradient steps per M-step
    learning_rate: float = 3e-3  #: Adam, component and gate networks (moments reset per E-step)
    epsilon_mu: float = 0.05  #: bound on the mean part of the component KL (Eq. 3.4)
    epsilon_sigma: float = 0.01  #: bound on its covariance part
    epsilon_weights: float = 0.01  #: bound on KL(q(o|z) ‖ q̃(o|z)) (Eq. 3.5)
    dual_learning_rate: float = 10.0  #: step of the Lagrange multipliers
    removal_threshold: float = 5e-4  #: components with a smaller mean weight are removed
    #: adaptive learning rates (Sec. 3.2.2): each component's (and the gate's) step is scaled
    #: towards this share of its bound in KL change per gradient step (0: fixed rates; 0.1
    #: reaches the bound in the M-step's 10 steps)
    kl_change_share: float = 0.1
    max_learning_rate: float = 3e-3  #: the adapted rates stay below this
    #: context resampling (Sec. 3.3): in all but every ``full_step_every``-th M-step each
    #: component is trained on this many contexts drawn from the batch by their importance
    #: weights q̃(o|z)/q̃(o) (with replacement), and the weights rest; 0: every M-step is full
    resampled_contexts: int = 0
    full_step_every: int = 4


class AVIPSTrainer:
    """Amortized VIPS: an E-step copies the model as q̃; the M-step ascends, per component,
    E_z q̃(o|z) R(o, z) (targets divided by their std in the M-step's first batch) under trust
    regions on the mean and covariance parts of KL(q(x|o,z) ‖ q̃(x|o,z)) (Eq. 3.4), and the
    weights' part of the bound, E_z [Σ_o q(o|z) R(o, z) + H(q(o|z))] (Eq. 3.3), under a trust
    region on KL(q(o|z) ‖ q̃(o|z)) (Eq. 3.5); the multipliers take dual gradient steps; light
    components are removed after each M-step."""

    def __init__(self, model: ConditionalGMM, log_density: LogDensity, config: AVIPSConfig):
        self.model, self.log_density, self.config = model, log_density, config
        o = model.components
        self.alpha_mu, self.alpha_sigma = torch.ones(o), torch.ones(o)
        self.alpha_w = torch.tensor(1.0)
        self.last_kl: dict[str, torch.Tensor] = {}
        #: learning rates per component and of the gate (adapted after each M-step)
        self.rates = torch.full((o,), config.learning_rate)
        self.gate_rate = config.learning_rate
        self.m_steps_done = 0

    def _rewards(self, frozen: ConditionalGMM, z: torch.Tensor, generator):
        """R(o, z) ``(B, O)`` (gradients into the components), and the components' parameters
        now and in q̃, and log q̃(o|z), at contexts ``z`` shared by every component ``(B, C)``
        or each component's own ``(O, B, C)`` (:meth:`_resampled`)."""
        model, n = self.model, self.config.samples
        x, mean, chol = model.component_samples(z, n, generator)  # (B, O, n, D)
        b, o = x.shape[:2]
        index = torch.arange(o).repeat_interleave(n)
        if z.dim() == 2:
            flat = x.reshape(b, o * n, -1)
            with torch.no_grad():
                old_mean, old_chol = frozen.components_at(z)
                old_logw = frozen.log_weights(z)
            joint = old_logw[:, None] + frozen.gaussian_log_prob(flat, old_mean, old_chol)
            resp = joint - torch.logsumexp(joint, dim=-1, keepdim=True)  # log q̃(o' | x, z)
            own = resp[:, torch.arange(o * n), index].reshape(b, o, n)
            log_p = self.log_density(flat, z).reshape(b, o, n)
        else:  # every component at its own contexts: q̃ over all of them at each one
            rows = z.reshape(o * b, -1)  # component-major
            flat = x.transpose(0, 1).reshape(o * b, n, -1)
            with torch.no_grad():
                all_mean, all_chol = frozen.components_at(rows)  # (O B, O', ...)
                all_logw = frozen.log_weights(rows)
            # q̃'s own component at its own contexts: the diagonal o = o' of the above
            old_mean = all_mean.reshape(o, b, o, -1).diagonal(dim1=0, dim2=2).permute(0, 2, 1)
            old_chol = all_chol.reshape(o, b, o, *all_chol.shape[-2:]).diagonal(
                dim1=0, dim2=2).permute(0, 3, 1, 2)
            old_logw = None  # the resampling weighted the contexts already
            joint = all_logw[:, None] + frozen.gaussian_log_prob(flat, all_mean, all_chol)
            resp = joint - torch.logsumexp(joint, dim=-1, keepdim=True)  # (O B, n, O')
            mine = torch.arange(o).repeat_interleave(b)
            own = resp[torch.arange(o * b), :, mine].reshape(o, b, n).transpose(0, 1)
            log_p = self.log_density(flat, rows).reshape(o, b, n).transpose(0, 1)
        # a removed component's samples have log q̃(o|x) = -inf: masked before any arithmetic
        # (a -inf in the unselected branch of torch.where still makes NaN gradients)
        live = model.alive[None, :, None]
        own = torch.where(live, own, torch.zeros_like(own))
        reward = (log_p + own).mean(-1) + _entropy(chol)
        reward = torch.where(model.alive, reward, torch.zeros_like(reward))
        return reward, mean, chol, old_mean, old_chol, old_logw

    def _resampled(self, frozen: ConditionalGMM, z: torch.Tensor, generator) -> torch.Tensor:
        """Each component's own contexts ``(O, k, C)``, k = ``resampled_contexts``, drawn from
        the batch ``z (B, C)`` with replacement by sampling importance resampling: weights
        q̃(z|o)/p(z) = q̃(o|z)/q̃(o), so that a component is trained where it has weight
        (Sec. 3.3, Eq. 3.6)."""
        with torch.no_grad():
            w = frozen.log_weights(z).exp().T  # (O, B)
        w = torch.where(self.model.alive[:, None], w, torch.ones_like(w))  # removed: unused
        pick = torch.multinomial(w, self.config.resampled_contexts, replacement=True,
                                 generator=generator)
        return z[pick]

    def iteration(self, contexts: Callable[[], torch.Tensor], generator=None) -> dict:
        """One E-step and M-step on fresh context batches; returns the components left. With
        context resampling, all but every ``full_step_every``-th M-step train the components
        alone, each on its own contexts (:meth:`_resampled`); the full ones train the weights
        too."""
        model, cfg = self.model, self.config
        frozen = copy.deepcopy(model).requires_grad_(False)  # E-step: q̃ = q
        resample = cfg.resampled_contexts > 0 and self.m_steps_done % cfg.full_step_every != 0
        self.m_steps_done += 1
        groups = [{"params": net.parameters(), "lr": float(rate)}
                  for net, rate in zip(model.nets, self.rates)]
        optimizer = torch.optim.Adam(groups + [{"params": model.gate.parameters(),
                                                "lr": self.gate_rate}])
        scale = None
        changes = []  # per step: the components' KL (O,) and the weights' KL
        for _ in range(cfg.m_steps):
            z = contexts()
            if resample:
                z = self._resampled(frozen, z, generator)
            reward, mean, chol, old_mean, old_chol, old_logw = self._rewards(frozen, z,
                                                                             generator)
            if scale is None:
                scale = reward.detach().std(dim=0).clamp_min(1e-6)
            kl_mu, kl_sigma = gaussian_kl_parts(mean, chol, old_mean, old_chol)
            if resample:  # E_{q̃(z|o)}: the contexts are drawn by it already
                avg_mu, avg_sigma = kl_mu.mean(0), kl_sigma.mean(0)
                component = ((reward / scale).mean(0) - self.alpha_mu * avg_mu
                             - self.alpha_sigma * avg_sigma)
                objective, kl_w = component[model.alive].sum(), None
            else:
                avg_mu, avg_sigma, objective, kl_w = self._full_objective(
                    z, reward, scale, kl_mu, kl_sigma, old_logw)
            optimizer.zero_grad()
            (-objective).backward()
            optimizer.step()
            changes.append(((avg_mu + avg_sigma).detach(),
                            None if kl_w is None else float(kl_w.detach())))
            with torch.no_grad():  # dual steps: a multiplier grows while its bound is broken
                lr = cfg.dual_learning_rate
                self.alpha_mu = (self.alpha_mu + lr * (avg_mu - cfg.epsilon_mu)).clamp_min(0.0)
                self.alpha_sigma = (self.alpha_sigma + lr * (avg_sigma - cfg.epsilon_sigma)
                                    ).clamp_min(0.0)
                if kl_w is not None:
                    self.alpha_w = (self.alpha_w + lr * (kl_w - cfg.epsilon_weights)
                                    ).clamp_min(0.0)
        with torch.no_grad():
            z = contexts()
            kl_mu, kl_sigma = gaussian_kl_parts(*model.components_at(z),
                                                *frozen.components_at(z))
            logw, old_logw = model.log_weights(z), frozen.log_weights(z)
            w_old = old_logw.exp()
            mass = w_old.sum(0).clamp_min(1e-12)
            kl_w = (logw.exp() * torch.where(frozen.alive, logw - old_logw,
                                             torch.zeros_like(logw))).sum(-1).mean()
            self.last_kl = dict(mu=(w_old * kl_mu).sum(0) / mass,
                                sigma=(w_old * kl_sigma).sum(0) / mass, weights=kl_w)
        self._adapt_rates(changes)
        return dict(alive=model.remove_light_components(z, cfg.removal_threshold),
                    resampled=resample)

    def _full_objective(self, z: torch.Tensor, reward: torch.Tensor, scale: torch.Tensor,
                        kl_mu: torch.Tensor, kl_sigma: torch.Tensor, old_logw: torch.Tensor):
        """A full M-step's Lagrangian on contexts ``z (B, C)`` shared by every component:
        the components' objectives weighted by q̃(o|z) (Eq. 3.3, 3.4) plus the weights' (Eq.
        3.5). Returns the components' mean KL parts ``(O,)`` each, the objective, and the
        weights' KL."""
        model = self.model
        w_old = old_logw.exp()
        mass = w_old.sum(0).clamp_min(1e-12)
        avg_mu, avg_sigma = (w_old * kl_mu).sum(0) / mass, (w_old * kl_sigma).sum(0) / mass
        component = ((w_old * reward / scale).sum(0) / mass
                     - self.alpha_mu * avg_mu - self.alpha_sigma * avg_sigma)
        logw = model.log_weights(z)
        w = logw.exp()
        safe = torch.where(model.alive, logw, torch.zeros_like(logw))
        # + H(q(o|z)); divided by the components' mean target scale, as their targets are
        # (Sec. 3.2.2), so that α_w need not grow to the rewards' magnitude: unscaled, the
        # weights' KL averaged ~0.34 nats a step in the first M-step on the Panda (bound 0.01)
        # and 6 of 10 components fell below the removal threshold within five E-steps
        bound = (((w * reward.detach()).sum(-1) - (w * safe).sum(-1))
                 / scale[model.alive].mean())
        kl_w = (w * (safe - torch.where(model.alive, old_logw, torch.zeros_like(old_logw)))
                ).sum(-1).mean()
        objective = component[model.alive].sum() + bound.mean() - self.alpha_w * kl_w
        return avg_mu, avg_sigma, objective, kl_w

    def _adapt_rates(self, changes: list) -> None:
        """Sec. 3.2.2: the change in KL per step, the larger of the M-step's first and last,
        against the desired one; each rate moves halfway to rate · desired / actual."""
        cfg = self.config
        if cfg.kl_change_share <= 0 or len(changes) < 2:
            return

        def adapted(rate, index: int, bound: float):
            if changes[0][index] is None:  # the weights rested (a resampled M-step)
                return rate
            first = torch.as_tensor(changes[1][index] - changes[0][index])
            last = torch.as_tensor(changes[-1][index] - changes[-2][index])
            actual = torch.maximum(first.abs(), last.abs()).clamp_min(1e-8)
            return (0.5 * rate * (1.0 + cfg.kl_change_share * bound / actual)).clamp(
                1e-6, cfg.max_learning_rate)

        self.rates = adapted(self.rates, 0, cfg.epsilon_mu + cfg.epsilon_sigma)
        self.gate_rate = float(adapted(torch.tensor(self.gate_rate), 1, cfg.epsilon_weights))


class IKTargetDensity:
    """The IK target log p̃(x | z) (thesis Sec. 4.1, after Pignat et al.): a product of experts
    over joint angles scaled to [-1, 1] (x = -1 at a joint's lower limit, 1 at its upper) given a
    hand pose context z ``(B, 9)`` (:func:`~.conditioning.context_of`, "pose"):

    - a Gaussian on the hand's position error (std ``position_std_m``);
    - a Gaussian on its orientation error, measured as 3 − tr(R_zᵀ R(x)) = 2 (1 − cos θ), which is
      θ² near the target and smooth everywhere (std ``orientation_std_rad``);
    - the joint-limit expert: the probability that a Gaussian at x (std ``limit_std``, scaled
      units) stays inside [-1, 1], per joint.
    """

    def __init__(self, kin, position_std_m: float = 0.01, orientation_std_rad: float = 0.05,
                 limit_std: float = 0.05, workcell=None, collision_scale_m: float = 0.002,
                 collision_margin_m: float = 0.005):
        self.kin = kin
        self.position_std_m, self.orientation_std_rad = position_std_m, orientation_std_rad
        self.limit_std = limit_std
        #: ``(SphereCollisionChecker, CollisionWorld)`` of a fixed workcell, or None: with one,
        #: a collision expert exp(−P(q) / collision_scale_m) joins the product, P the summed
        #: penetration (m) of the robot's spheres into the obstacles counted from
        #: ``collision_margin_m`` outside them, so that the prior's raw samples avoid them
        self.workcell = workcell
        self.collision_scale_m, self.collision_margin_m = collision_scale_m, collision_margin_m

    def joints(self, x: torch.Tensor) -> torch.Tensor:
        """Joint angles (rad) of scaled ``x`` ``(..., 7)``."""
        lower, upper = self.kin.lower.to(x), self.kin.upper.to(x)
        return lower + 0.5 * (x + 1.0) * (upper - lower)

    def scaled(self, q: torch.Tensor) -> torch.Tensor:
        """Scaled coordinates of joint angles ``q (..., 7)``."""
        lower, upper = self.kin.lower.to(q), self.kin.upper.to(q)
        return 2.0 * (q - lower) / (upper - lower) - 1.0

    def __call__(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = self.joints(x).reshape(b * n, d).clamp(self.kin.lower.to(x), self.kin.upper.to(x))
        pose = self.kin.ee_pose(q).reshape(b, n, 4, 4)
        position_err = ((pose[..., :3, 3] - z[:, None, :3]) ** 2).sum(-1)
        target_x, target_y = z[:, None, 3:6], z[:, None, 6:9]
        target_z = torch.cross(target_x, target_y, dim=-1)
        trace = ((pose[..., :3, 0] * target_x).sum(-1) + (pose[..., :3, 1] * target_y).sum(-1)
                 + (pose[..., :3, 2] * target_z).sum(-1))
        normal = torch.distributions.Normal(0.0, 1.0)
        inside = (normal.cdf((1.0 - x) / self.limit_std) - normal.cdf((-1.0 - x) / self.limit_std))
        log_p = (-position_err / (2 * self.position_std_m ** 2)
                 - (3.0 - trace) / (2 * self.orientation_std_rad ** 2)
                 + inside.clamp_min(1e-12).log().sum(-1))
        if self.workcell is not None:
            checker, world = self.workcell
            depth = _Penetration.apply(q, checker, world, self.collision_margin_m)
            log_p = log_p - depth.reshape(b, n) / self.collision_scale_m
        return log_p


class _Penetration(torch.autograd.Function):
    """The spheres' penetration P(q) ``(B,)`` of configurations ``q (B, J)``, differentiable
    through its analytic joint gradient
    (:meth:`~mace_core.robot.spheres.SphereCollisionChecker.penetration_gradient`)."""

    @staticmethod
    def forward(ctx, q, checker, world, margin):
        with torch.no_grad():
            cost, grad = checker.penetration_gradient(q.detach(), world, margin)
        ctx.save_for_backward(grad)
        return cost

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad_out[:, None] * grad, None, None, None


def pose_contexts(kin, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` contexts ``(n, 9)``: hand poses of configurations uniform in the joint limits (the
    thesis draws them on the fly instead of keeping a data set)."""
    from .conditioning import context_of

    with torch.no_grad():
        return context_of("pose", kin.ee_pose(kin.sample_uniform(n, generator)))


@dataclass(frozen=True)
class MixturePriorConfig:
    """What the adapter reads of an IK prior's configuration: the context it is conditioned
    on (a hand pose, :func:`~.conditioning.context_of` "pose")."""

    conditioning: str = "pose"


class MixturePrior(nn.Module):
    """A trained mixture as an IK prior p(q | pose) over joint angles (rad), with the interface
    of :class:`~.prior.ARGMMPrior` that MACE, the adapter and the accuracy protocol read:
    ``config.conditioning``, :meth:`sample`, :meth:`log_prob`. The mixture lives on joints
    scaled to [-1, 1] by the limits ``q_low``, ``q_high`` (J,) it was trained with; MACE tunes
    all of its weights (the component networks and the gate), as for the autoregressive prior.
    """

    def __init__(self, model: ConditionalGMM, q_low: torch.Tensor, q_high: torch.Tensor):
        super().__init__()
        self.model = model
        self.config = MixturePriorConfig()
        self.register_buffer("q_low", q_low.detach().clone())
        self.register_buffer("q_high", q_high.detach().clone())

    def sample(self, context: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One configuration ``(B, 7)`` (rad) per context row ``(B, 9)``; when the rows are one
        context broadcast (stride 0: a request's samples), the networks run on one row."""
        batch = context.shape[0]
        if batch > 1 and context.stride(0) == 0:
            x = self.model.sample(context[:1], batch, generator)[0]
        else:
            x = self.model.sample(context, 1, generator)[:, 0]
        return self.q_low + 0.5 * (x + 1.0) * (self.q_high - self.q_low)

    def log_prob(self, q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """log p(q | context) of ``q (B, 7)`` (rad) at ``context (B, 9)``: ``(B,)``, the
        scaling's Jacobian included."""
        x = 2.0 * (q - self.q_low) / (self.q_high - self.q_low) - 1.0
        log_jac = torch.log(2.0 / (self.q_high - self.q_low)).sum()
        if q.shape[0] > 1 and context.stride(0) == 0:
            return self.model.log_prob(x[None], context[:1])[0] + log_jac
        return self.model.log_prob(x[:, None], context)[:, 0] + log_jac
