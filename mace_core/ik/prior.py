"""The autoregressive Gaussian-mixture IK prior p(q | c) (paper Sec. 4.2 and App. B).

p(q | c) = Π_i p(q_i | q_<i, c), c the end-effector position (the paper's) or its full pose
(:mod:`.conditioning`), each factor a mixture of Gaussians whose parameters come
from its own MLP (5 hidden layers of 200, LeakyReLU). The seven MLPs are stored as stacked weights
``(7, in, out)`` so the likelihood of a batch runs all of them in one batched matmul chain, with a
mask on the first layer that hides q_j (j >= i) from network i (teacher forcing). Sampling is
sequential over the joints by nature: seven passes, each through one network.

The factorization may take the joints in another order (``ARGMMConfig.joint_order``): a pose
prior with the Panda's redundant joint q7 first gives q7's marginal p(q7 | pose) from its first
network alone (:meth:`ARGMMPrior.sample_leading`), which is all the closed-form IK needs of a
sample (:class:`~.refinement.AnalyticRefiner`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
from threadpoolctl import ThreadpoolController
from torch import nn

from ..errors import ModelLoadError
from ..tensor import TensorSpec
from .conditioning import context_dim

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class ARGMMConfig:
    """Architecture of :class:`ARGMMPrior` (stored next to its weights)."""

    num_joints: int = 7  #: J, length of a configuration
    context_dim: int = 3  #: size of the conditioning vector (:mod:`.conditioning`)
    #: what the context is: "position" (m) or "pose" (position and two rotation columns)
    conditioning: str = "position"
    hidden: int = 200  #: width of each hidden layer
    layers: int = 5  #: number of hidden layers of each per-joint MLP
    components: int = 2  #: Gaussian components per joint
    min_std: float = 1e-3  #: floor of each component's standard deviation (normalized units)
    #: the joints (0-based) in the order the factorization takes them; empty: 0, 1, ..., J-1
    joint_order: tuple[int, ...] = ()

    @staticmethod
    def from_dict(d: dict) -> "ARGMMConfig":
        known = set(ARGMMConfig.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ModelLoadError(f"unknown ARGMM config keys: {sorted(unknown)}")
        d = dict(d)
        if "joint_order" in d:  # a JSON list in the weights' metadata
            d["joint_order"] = tuple(d["joint_order"])
        config = ARGMMConfig(**d)
        config.validate()
        return config

    @property
    def order(self) -> tuple[int, ...]:
        """The joints in the factorization's order (0-based)."""
        return self.joint_order or tuple(range(self.num_joints))

    def validate(self) -> None:
        """Raise ModelLoadError when the context size does not fit the conditioning, or the
        joint order is not a permutation of the joints."""
        if context_dim(self.conditioning) != self.context_dim:
            raise ModelLoadError(f"an IK prior conditioned on {self.conditioning} reads "
                                 f"{context_dim(self.conditioning)} numbers, not "
                                 f"{self.context_dim}")
        if sorted(self.order) != list(range(self.num_joints)):
            raise ModelLoadError(f"joint_order {list(self.joint_order)} is not an order of the "
                                 f"{self.num_joints} joints (0-based)")


class ARGMMPrior(nn.Module):
    """Autoregressive 2-component GMM over the 7 Panda joints, conditioned on the target position.

    Joint values are normalized to [-1, 1] by the joint limits and positions by the training data's
    mean and standard deviation; :meth:`log_prob` returns the density of the raw joint values
    (radians), the normalization's Jacobian included.
    """

    def __init__(self, config: ARGMMConfig, spec: TensorSpec):
        super().__init__()
        config.validate()
        self.config = config
        self.spec = spec
        #: (J,) the joints in the factorization's order, and where each joint stands in it
        self._order = list(config.order)
        self._rank = [self._order.index(i) for i in range(config.num_joints)]
        self._permuted = self._order != sorted(self._order)
        j, c, h = config.num_joints, config.context_dim, config.hidden
        dims = [c + j] + [h] * config.layers + [3 * config.components]
        kw = dict(device=spec.device, dtype=spec.dtype)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for din, dout in zip(dims[:-1], dims[1:]):
            w = torch.empty(j, din, dout, **kw)
            for k in range(j):
                nn.init.kaiming_uniform_(w[k].T, a=0.2)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(j, 1, dout, **kw)))
        mask = torch.ones(j, c + j, 1, **kw)
        for k in range(j):
            mask[k, c + k:] = 0.0  # network k sees p_ee and q_<k only
        self.register_buffer("input_mask", mask)
        self.register_buffer("q_low", torch.full((j,), -math.pi, **kw))
        self.register_buffer("q_high", torch.full((j,), math.pi, **kw))
        self.register_buffer("ctx_mean", torch.zeros(c, **kw))
        self.register_buffer("ctx_std", torch.ones(c, **kw))
        #: the tensors' data pointers, and NumPy views of the weights, the biases and the
        #: normalization (:meth:`numpy_parameters`)
        self._numpy_views: tuple[tuple, list, list, list] | None = None

    def set_normalization(self, q_low: torch.Tensor, q_high: torch.Tensor,
                          ctx_mean: torch.Tensor, ctx_std: torch.Tensor) -> None:
        """Fix the joint range ``(J,)`` and context statistics ``(C,)`` (once, before training)."""
        self.q_low.copy_(q_low)
        self.q_high.copy_(q_high)
        self.ctx_mean.copy_(ctx_mean)
        self.ctx_std.copy_(ctx_std)

    def _normalize_q(self, q: torch.Tensor) -> torch.Tensor:
        return 2.0 * (q - self.q_low) / (self.q_high - self.q_low) - 1.0

    def _mixture(self, h: torch.Tensor):
        """Split network outputs ``(..., 3K)`` into log-weights, means and stds ``(..., K)``."""
        k = self.config.components
        logits, mean, raw_std = h[..., :k], h[..., k:2 * k], h[..., 2 * k:]
        std = nn.functional.softplus(raw_std) + self.config.min_std
        return torch.log_softmax(logits, -1), mean, std

    def _forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """All J networks on inputs ``(B, C + J)`` -> outputs ``(J, B, 3K)``."""
        h = x.unsqueeze(0) @ (self.weights[0] * self.input_mask) + self.biases[0]
        for layer in range(1, len(self.weights)):  # (slicing a ParameterList builds a module)
            h = torch.baddbmm(self.biases[layer], nn.functional.leaky_relu(h, 0.2),
                              self.weights[layer])
        return h

    def log_prob(self, q: torch.Tensor, p_ee: torch.Tensor) -> torch.Tensor:
        """log p(q | p_ee) of configurations ``(B, J)`` (rad) at positions ``(B, 3)``: ``(B,)``."""
        qn = self._normalize_q(q)
        if self._permuted:  # the factorization's order (the density is the same joint density)
            qn = qn[:, self._order]
        x = torch.cat([(p_ee - self.ctx_mean) / self.ctx_std, qn], -1)
        log_w, mean, std = self._mixture(self._forward_all(x))  # (J, B, K)
        z = (qn.T.unsqueeze(-1) - mean) / std
        comp = log_w - 0.5 * z * z - torch.log(std) - 0.5 * _LOG_2PI
        log_norm = torch.log(2.0 / (self.q_high - self.q_low)).sum()
        return torch.logsumexp(comp, -1).sum(0) + log_norm

    def sample(self, p_ee: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draw one configuration per row of ``p_ee`` ``(B, C)``: ``(B, J)`` in radians.

        Joint by joint through its own network; the component by inverse CDF on one uniform,
        then only the drawn component's mean and std are read out. When the rows are one
        position broadcast (``p.expand(B, 3)``, stride 0: a request's samples), the first
        network, which sees the position only, runs on one row. Without autograd on the CPU
        the same arithmetic runs in NumPy on the parameters' memory (:func:`_sample_numpy`):
        a request's draw is some 300 small operations, and NumPy's dispatch is the cheaper
        (``panda_ik``, one thread, in turns: 16 rows 0.8 against 1.3 ms, 48 rows 1.9 against
        2.2 ms, 256 rows 6.8 against 7.1 ms; the same draws to 1e-5)."""
        qn = self._sample_normalized(p_ee, generator, self.config.num_joints)
        if self._permuted:  # back to the joints' own order
            qn = qn[:, self._rank]
        return self.q_low + (qn + 1.0) * 0.5 * (self.q_high - self.q_low)

    def sample_leading(self, p_ee: torch.Tensor, generator: torch.Generator,
                       count: int = 1) -> torch.Tensor:
        """The first ``count`` joints of the factorization's order (``config.order[:count]``)
        drawn from their marginal, one row per row of ``p_ee (B, C)``: ``(B, count)`` rad,
        the networks of the later joints not run (a pose prior with q7 first: the q7 that the
        closed form needs, from one network of seven)."""
        qn = self._sample_normalized(p_ee, generator, count)
        joints = self._order[:count]
        if qn.device.type == "cpu" and not torch.is_grad_enabled():  # NumPy's draw: its views
            _, _, (low, high, _, _) = self.numpy_parameters()
            low, high = low[joints], high[joints]
            return torch.from_numpy(low + (qn.numpy() + 1.0) * (0.5 * (high - low)))
        low, high = self.q_low[joints], self.q_high[joints]
        return low + (qn + 1.0) * 0.5 * (high - low)

    def _sample_normalized(self, p_ee: torch.Tensor, generator: torch.Generator,
                           count: int) -> torch.Tensor:
        """The first ``count`` joints of the factorization's order, normalized to [-1, 1]
        (:meth:`sample`): ``(B, count)``."""
        batch, c = p_ee.shape[0], self.config.context_dim
        shared = batch > 1 and p_ee.stride(0) == 0
        k_mix = self.config.components
        kw = dict(device=p_ee.device, dtype=p_ee.dtype)
        uniform = torch.rand(batch, count, 1, generator=generator, **kw)
        eps = torch.randn(batch, count, generator=generator, **kw)
        if p_ee.device.type == "cpu" and not torch.is_grad_enabled():
            weights, biases, (_, _, mean, std) = self.numpy_parameters()
            context = ((p_ee[:1] if shared else p_ee).numpy() - mean) / std
            _blas_on_torch_threads()
            return torch.from_numpy(_sample_numpy(self.config, weights, biases, context,
                                                  uniform[..., 0].numpy(), eps.numpy()))
        x = torch.cat([(p_ee - self.ctx_mean) / self.ctx_std,
                       torch.zeros(batch, self.config.num_joints, **kw)], -1)
        weights, biases = list(self.weights), list(self.biases)
        first = weights[0] * self.input_mask  # (J, C + J, H): network k sees q_<k only
        for k in range(count):
            h = torch.addmm(biases[0][k], x[:1] if shared and k == 0 else x, first[k])
            for layer in range(1, len(weights)):
                h = torch.addmm(biases[layer][k], nn.functional.leaky_relu(h, 0.2),
                                weights[layer][k])
            h = h.expand(batch, -1)
            cdf = torch.softmax(h[:, :k_mix], -1).cumsum_(-1)  # (B, K)
            comp = (cdf[:, :-1] < uniform[:, k]).sum(-1, keepdim=True)  # (B, 1)
            picked = h[:, k_mix:].view(batch, 2, k_mix).gather(
                2, comp.unsqueeze(1).expand(batch, 2, 1))  # (B, 2, 1): mean, raw std
            std = nn.functional.softplus(picked[:, 1, 0]) + self.config.min_std
            x[:, c + k] = torch.addcmul(picked[:, 0, 0], std, eps[:, k])
        return x[:, c:c + count]

    def numpy_parameters(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """NumPy views of the CPU weights ``(J, in, out)`` and biases ``(J, out)`` per layer and
        of the normalization (``q_low``, ``q_high``, ``ctx_mean``, ``ctx_std``), sharing their
        memory (adaptation's in-place steps show in them); made again only when a tensor's
        storage changed (making them costs 39 µs a draw, checking 5 µs)."""
        norm = (self.q_low, self.q_high, self.ctx_mean, self.ctx_std)
        tensors = (*self.weights._parameters.values(), *self.biases._parameters.values(), *norm)
        key = tuple(t.data_ptr() for t in tensors)
        if self._numpy_views is None or self._numpy_views[0] != key:
            views = [t.detach().numpy() for t in tensors]
            layers = len(self.weights)
            self._numpy_views = (key, views[:layers],
                                 [b[:, 0] for b in views[layers:2 * layers]], views[2 * layers:])
        return self._numpy_views[1:]

    def architecture(self) -> dict:
        """Hyper-parameters to store next to the weights."""
        return asdict(self.config)


#: (torch's thread count, modules imported) when this module last limited the BLAS libraries
_BLAS_STATE: list[int] = []


def _blas_on_torch_threads() -> None:
    """Run the BLAS libraries loaded (NumPy's, and SciPy's once imported) on torch's CPU
    thread count, process-wide, set again only when that count or the modules imported
    change (a new import may have loaded another BLAS; finding the libraries costs 5 ms, a
    check 2 µs): their own default, every core, ran a 16-row draw 4x slower with another
    process busy on this 2-core machine, and a limit entered and left around each draw cost
    0.1 ms of a 0.5 ms draw."""
    state = [torch.get_num_threads(), len(sys.modules)]
    if _BLAS_STATE != state:
        ThreadpoolController().limit(limits=state[0], user_api="blas")  # kept: never restored
        _BLAS_STATE[:] = state


def _sample_numpy(cfg: ARGMMConfig, weights: list[np.ndarray], biases: list[np.ndarray],
                  context: np.ndarray, uniform: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """:meth:`ARGMMPrior.sample` in NumPy, on views of the parameters (no copy; adaptation
    updates them in place: :meth:`ARGMMPrior.numpy_parameters`), weights ``(J, in, out)``
    and biases ``(J, out)`` per layer: normalized contexts ``(B or 1, C)``, the draw's
    uniforms and normals ``(B, J')`` -> normalized values ``(B, J')`` of the first J' <= J
    joints of the factorization's order."""
    k_mix, c = cfg.components, cfg.context_dim
    batch, j = uniform.shape
    rows = np.arange(batch)
    # the drawn networks' first layer on the context at once: (J', B or 1, H)
    from_context = (np.einsum("bc,jch->jbh", context, weights[0][:j, :c])
                    + biases[0][:j, None])
    qn = np.zeros((batch, j), dtype=uniform.dtype)
    for k in range(j):
        h = from_context[k] + qn[:, :k] @ weights[0][k, c:c + k] if k else from_context[k]
        for layer in range(1, len(weights)):
            h = np.maximum(h, 0.2 * h) @ weights[layer][k] + biases[layer][k]  # LeakyReLU
        logits = h[:, :k_mix]  # (B or 1, K): one row for the first network of a shared context
        weight = np.exp(logits - logits.max(-1, keepdims=True)).cumsum(-1)
        comp = (weight[:, :-1] < uniform[:, k:k + 1] * weight[:, -1:]).sum(-1)  # inverse CDF
        # the drawn component's mean and raw std: (B, 2)
        picked = h.reshape(h.shape[0], 3, k_mix)[rows if h.shape[0] == batch else 0, 1:, comp]
        std = np.logaddexp(0.0, picked[:, 1]) + cfg.min_std  # softplus
        qn[:, k] = picked[:, 0] + std * eps[:, k]
    return qn
