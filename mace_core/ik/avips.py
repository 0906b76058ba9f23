"""aVIPS' model: a conditional Gaussian mixture trained by amortized variational inference
against an unnormalised density (Musekamp, master thesis, TU Darmstadt 2023, Sec. 3;
``../shared/papers/avips-musekamp-2023.md``). This module holds the model and the thesis'
baseline trainer; the VIPS trainer is to come.

q(x | z) = Σ_o q(o | z) N(x; μ_o(z), L_o(z) L_o(z)ᵀ): one network per component predicts its
mean and log-Cholesky factor, a gate network the weights through a squared cosine
(:class:`ConditionalGMM`; light components are removed, Sec. 3.4.2). Training needs no data
set, only log p̃(x | z) and a way to draw contexts z:

- :func:`elbo_step`: plain amortized VI, a gradient step on the whole ELBO
  E_q[log p̃(x|z) − log q(x|z)] (reparameterized), the thesis' baseline;
- to come: the VIPS bound (Eq. 3.3) with per-component trust regions (Eq. 3.4, 3.5), context
  resampling, adaptive learning rates, the IK target density, ``mace-train avips``.
  :func:`gaussian_kl_parts` is the split KL its trust regions bound. (A first M-step with raw
  targets in the weight objective collapsed onto one mode of a 4-mode toy, then diverged.)

Shapes: contexts ``(B, C)``, samples ``(B, N, D)``, per component ``(B, O, ...)``.
"""

from __future__ import annotations

import math
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
    """

    def __init__(self, context_dim: int, dim: int, components: int, hidden: int = 64,
                 layers: int = 2, gate_hidden: int = 64, init_std: float = 0.5):
        super().__init__()
        self.dim, self.components = dim, components
        self._tril = torch.tril_indices(dim, dim, offset=-1)
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
        return torch.log(w / w.sum(dim=-1, keepdim=True))

    def remove_light_components(self, z: torch.Tensor, threshold: float) -> int:
        """Remove the components whose mean weight over contexts ``z`` is below ``threshold``
        (Sec. 3.4.2); returns how many are left."""
        with torch.no_grad():
            self.alive &= self.log_weights(z).exp().mean(0) >= threshold
        return int(self.alive.sum())

    def components_at(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Means ``(B, O, D)`` and Cholesky factors ``(B, O, D, D)`` at contexts ``z``."""
        raw = torch.stack([net(z) for net in self.nets], dim=1)  # (B, O, out)
        d = self.dim
        mean = raw[..., :d]
        chol = torch.diag_embed(raw[..., d:2 * d].exp())
        chol[..., self._tril[0], self._tril[1]] = raw[..., 2 * d:]
        return mean, chol

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
        """Reparameterized draws of every component: ``x (B, O, n, D)``, with the means and
        Cholesky factors they came from."""
        mean, chol = self.components_at(z)
        eps = torch.randn(*mean.shape[:2], n, self.dim, generator=generator, dtype=z.dtype,
                          device=z.device)
        return mean[:, :, None] + (chol[:, :, None] @ eps.unsqueeze(-1)).squeeze(-1), mean, chol


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
    return float(value)
