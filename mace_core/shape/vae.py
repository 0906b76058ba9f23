"""Point-cloud VAE prior of the shape domains (Krupnik et al., CoRL 2023, Sec. 4.1, App. A and C).

A PointNet encoder q(z|x) and a fully connected decoder p(x|z) over ``num_points``-point clouds,
latent size 128. The networks work in units of ``length_scale`` (clouds are divided by it on the
way in and multiplied on the way out), so a prior in metres and one in normalised units share
the same code and training settings.

Shapes: ``(B, P, 3)`` point batches in the cloud's frame and units, ``(B, D)`` latent batches.

Weights are stored as safetensors (float16 on disk to keep files small, see the model cards) and
listed in a YAML registry (``models/shape_registry.yaml``) parsed into :class:`ShapePriorEntry`,
which rejects unknown keys. Nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..errors import ModelLoadError
from ..tensor import TensorSpec
from .placement_estimator import PlacementEstimator, load_placement_estimator


@dataclass(frozen=True)
class PointCloudVAEConfig:
    """Architecture hyper-parameters of :class:`PointCloudVAE` (one registry entry's block)."""

    num_points: int = 2048  #: points per decoded cloud
    latent_dim: int = 128  #: D, size of z (App. A)
    encoder_widths: tuple[int, ...] = (64, 128, 256)  #: PointNet per-point layer widths
    encoder_hidden: int = 256  #: width of the MLP after the max-pool
    decoder_widths: tuple[int, ...] = (256, 256)  #: hidden widths of the decoder MLP
    encoder_points: int = 512  #: clouds are subsampled (strided) to this many points to encode
    length_scale: float = 1.0  #: unit of the networks, in the cloud's units (m for boxes)
    prior_std: float = 1.0  #: σ_z of the training prior N(0, σ_z² I) (App. C: 1 for boxes)

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_widths", tuple(int(w) for w in self.encoder_widths))
        object.__setattr__(self, "decoder_widths", tuple(int(w) for w in self.decoder_widths))
        for name in ("num_points", "latent_dim", "encoder_hidden", "encoder_points"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.encoder_widths or not self.decoder_widths or min(
                self.encoder_widths + self.decoder_widths) < 1:
            raise ValueError("encoder_widths and decoder_widths must be non-empty and positive")
        if not (self.length_scale > 0 and self.prior_std > 0):
            raise ValueError("length_scale and prior_std must be > 0")


def _mlp(widths: list[int], final_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PointCloudVAE(nn.Module):
    """PointNet encoder + fully connected decoder (App. A, after Daniel and Tamar's Soft-IntroVAE).

    Encoder: shared per-point MLP ``3 -> encoder_widths`` (a 1x1 convolution), max-pool over
    points, MLP ``-> encoder_hidden -> 2D`` giving (μ, log σ²) of q(z|x). Decoder: MLP
    ``D -> decoder_widths -> 3 * num_points``.
    """

    def __init__(self, config: PointCloudVAEConfig, spec: TensorSpec):
        super().__init__()
        self.config = config
        c = config
        self.point_mlp = _mlp([3, *c.encoder_widths], final_activation=True)
        self.head = _mlp([c.encoder_widths[-1], c.encoder_hidden, 2 * c.latent_dim],
                         final_activation=False)
        self.decoder = _mlp([c.latent_dim, *c.decoder_widths, 3 * c.num_points],
                            final_activation=False)
        # The latent prior p(z; θ_0) = N(latent_mean, diag latent_std²) that sampling and MACE
        # start from: the training prior N(0, σ_z² I), or after :func:`fit_latent_prior` a
        # Gaussian fitted to the aggregate posterior of the training shapes.
        self.register_buffer("latent_mean", torch.zeros(c.latent_dim))
        self.register_buffer("latent_std", torch.full((c.latent_dim,), float(c.prior_std)))
        self.to(device=spec.device, dtype=spec.dtype)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x): clouds ``(B, P, 3)`` -> (μ ``(B, D)``, log σ² ``(B, D)``).

        Clouds with more than ``encoder_points`` points are subsampled with a fixed stride (the
        max-pool feature depends little on density; the decoder's point order carries no
        meaning, and data clouds are in random order).
        """
        p = x.shape[-2]
        if p > self.config.encoder_points:
            idx = torch.linspace(0, p - 1, self.config.encoder_points, device=x.device).long()
            x = x[..., idx, :]
        feat = self.point_mlp(x / self.config.length_scale).amax(dim=-2)
        mu, logvar = self.head(feat).chunk(2, dim=-1)
        return mu, logvar.clamp(-20.0, 10.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents ``(B, D)`` to clouds ``(B, num_points, 3)`` (the decoder's mean)."""
        out = self.decoder(z).view(*z.shape[:-1], self.config.num_points, 3)
        return out * self.config.length_scale

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Decode ``n`` draws of the latent prior (``latent_mean``, ``latent_std``):
        ``(n, num_points, 3)``."""
        z = torch.randn(n, self.config.latent_dim, generator=generator,
                        device=self.latent_mean.device, dtype=self.latent_mean.dtype)
        return self.decode(self.latent_mean + self.latent_std * z)


@torch.no_grad()
def fit_latent_prior(vae: PointCloudVAE, clouds: Iterable[torch.Tensor]) -> None:
    """Set the VAE's latent prior to the diagonal Gaussian of its aggregate posterior.

    A VAE whose posteriors do not fill N(0, σ_z² I) decodes prior draws off the data (blurred
    average shapes); a Gaussian fitted to q(z) = E_x q(z|x) over the training shapes decodes
    like the data ("ex-post density estimation", Ghosh et al., ICLR 2020). Mean E[μ(x)],
    variance Var[μ(x)] + E[σ²(x)] per latent dimension. MACE-VAE then adapts θ = (μ_z, σ_z)
    from there (Sec. 3.2.1).

    Args:
        clouds: batches ``(B, P, 3)`` of training shapes.
    """
    mus, variances = [], []
    for batch in clouds:
        mu, logvar = vae.encode(batch)
        mus.append(mu)
        variances.append(logvar.exp())
    mu, var = torch.cat(mus), torch.cat(variances)
    if mu.shape[0] < 2:
        raise ValueError("fit_latent_prior needs at least two shapes")
    vae.latent_mean.copy_(mu.mean(0))
    vae.latent_std.copy_((mu.var(0) + var.mean(0)).sqrt())


def gaussian_kl(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor,
                log_std_p: torch.Tensor) -> torch.Tensor:
    """KL(N(μ_q, diag e^{logvar_q}) ‖ N(μ_p, diag e^{2 log_std_p})) summed over the last dim.

    Args:
        mu_q, logvar_q: ``(B, D)``.
        mu_p, log_std_p: ``(D,)`` or ``(B, D)`` (broadcast).

    Returns:
        ``(B,)`` KL in nats.
    """
    var_p = torch.exp(2.0 * log_std_p)
    kl = log_std_p - 0.5 * logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / (2.0 * var_p) - 0.5
    return kl.sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# Registry and weights


@dataclass(frozen=True)
class ShapePriorEntry:
    """One entry of ``models/shape_registry.yaml``: a named prior and where its weights are."""

    name: str  #: prior name used in requests ("boxes", "objects")
    weights: str  #: safetensors file, relative to the registry's folder
    architecture: PointCloudVAEConfig  #: hyper-parameters the weights were trained with
    frame: str = ""  #: what frame and units the prior's clouds are in (documentation)
    metric: bool = True  #: the clouds are in metres (False: normalised, the size is unknown)
    #: the shapes stand on the xy plane (False: centred on the origin)
    standing: bool = True
    description: str = ""  #: free text (data, model card)
    card: str = ""  #: model card markdown, relative to the registry's folder
    #: safetensors of the prior's placement estimator (:mod:`.placement_estimator`), relative
    #: to the registry's folder; empty: none (a support-frame request starts by rule)
    placement_weights: str = ""
    placement_hidden: int = 128  #: its width (:class:`~.placement_estimator.PlacementEstimator`)


_ENTRY_KEYS = {f.name for f in dataclasses.fields(ShapePriorEntry)} - {"name"}
_ARCH_KEYS = {f.name for f in dataclasses.fields(PointCloudVAEConfig)}


def parse_shape_registry(data: object) -> dict[str, ShapePriorEntry]:
    """Turn the YAML mapping ``name -> {weights, architecture: {...}, ...}`` into entries.

    Raises:
        ModelLoadError: not a mapping, a missing ``weights``, or an unknown key at any level.
    """
    if not isinstance(data, dict) or not data:
        raise ModelLoadError("shape registry must be a non-empty mapping name -> entry")
    entries: dict[str, ShapePriorEntry] = {}
    for name, raw in data.items():
        if not isinstance(raw, dict):
            raise ModelLoadError(f"shape registry entry '{name}' must be a mapping")
        unknown = set(raw) - _ENTRY_KEYS
        if unknown:
            raise ModelLoadError(f"shape registry entry '{name}': unknown keys {sorted(unknown)}"
                                 f" (allowed: {sorted(_ENTRY_KEYS)})")
        if "weights" not in raw:
            raise ModelLoadError(f"shape registry entry '{name}' has no 'weights'")
        arch = raw.get("architecture") or {}
        if not isinstance(arch, dict):
            raise ModelLoadError(f"shape registry entry '{name}': architecture must be a mapping")
        unknown = set(arch) - _ARCH_KEYS
        if unknown:
            raise ModelLoadError(f"shape registry entry '{name}': unknown architecture keys "
                                 f"{sorted(unknown)} (allowed: {sorted(_ARCH_KEYS)})")
        try:
            config = PointCloudVAEConfig(**arch)
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"shape registry entry '{name}': {exc}") from exc
        for key in ("metric", "standing"):
            if not isinstance(raw.get(key, True), bool):
                raise ModelLoadError(f"shape registry entry '{name}': {key} must be true or "
                                     f"false, got {raw[key]!r}")
        entries[str(name)] = ShapePriorEntry(
            name=str(name), weights=str(raw["weights"]), architecture=config,
            frame=str(raw.get("frame", "")), description=str(raw.get("description", "")),
            card=str(raw.get("card", "")), metric=raw.get("metric", True),
            standing=raw.get("standing", True),
            placement_weights=str(raw.get("placement_weights", "")),
            placement_hidden=_positive_int(raw.get("placement_hidden", 128),
                                           f"{name}: placement_hidden"))
    return entries


def _positive_int(value: object, what: str) -> int:
    """``value`` as an int > 0, else ModelLoadError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelLoadError(f"shape registry entry {what} must be an integer > 0, got "
                             f"{value!r}")
    return value


def load_shape_registry(path: str | Path) -> dict[str, ShapePriorEntry]:
    """Read and parse a shape registry YAML file (see :func:`parse_shape_registry`)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelLoadError(f"cannot read shape registry {path}: {exc}") from exc
    return parse_shape_registry(data)


def save_vae_weights(model: PointCloudVAE, path: str | Path, dtype: torch.dtype = torch.float16,
                     metadata: dict[str, str] | None = None) -> None:
    """Write the state dict as safetensors, cast to ``dtype`` (float16 halves the file)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata or {})


#: Buffers a weights file may lack: they then keep the training prior N(0, σ_z² I).
_OPTIONAL_BUFFERS = ("latent_mean", "latent_std")


def load_vae(entry: ShapePriorEntry, models_dir: str | Path, spec: TensorSpec) -> PointCloudVAE:
    """Build the VAE of ``entry`` and load its safetensors weights, frozen, in eval mode.

    Raises:
        ModelLoadError: missing or unreadable file, missing/unexpected tensors, wrong shapes,
            non-finite values.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(models_dir) / entry.weights
    if not path.is_file():
        raise ModelLoadError(f"prior '{entry.name}': weights file {path} not found")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"prior '{entry.name}': cannot read {path}: {exc}") from exc
    model = PointCloudVAE(entry.architecture, spec)
    expected = model.state_dict()
    for key in _OPTIONAL_BUFFERS:  # weights written before the latent prior was stored
        tensors.setdefault(key, expected[key].to("cpu"))
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ModelLoadError(f"prior '{entry.name}': {path} does not match its architecture "
                             f"(missing {missing[:4]}, unexpected {extra[:4]})")
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise ModelLoadError(f"prior '{entry.name}': tensor '{key}' has shape "
                                 f"{tuple(value.shape)}, expected {tuple(expected[key].shape)}")
        if not torch.isfinite(value).all():
            raise ModelLoadError(f"prior '{entry.name}': tensor '{key}' has non-finite values")
    model.load_state_dict({k: v.to(spec.device, spec.dtype) for k, v in tensors.items()})
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass
class ShapePrior:
    """A loaded prior: its registry entry and its frozen VAE."""

    entry: ShapePriorEntry  #: registry entry (architecture, frame, files)
    vae: PointCloudVAE  #: frozen networks on the completer's device
    #: where an observed object stands (support-frame requests), or None
    placement: PlacementEstimator | None = None

    @property
    def name(self) -> str:
        return self.entry.name


def load_shape_priors(registry_path: str | Path, spec: TensorSpec,
                      names: list[str] | None = None) -> dict[str, ShapePrior]:
    """Load every prior of a registry (or only ``names``) onto ``spec``'s device."""
    registry_path = Path(registry_path)
    entries = load_shape_registry(registry_path)
    if names is not None:
        unknown = sorted(set(names) - set(entries))
        if unknown:
            raise ModelLoadError(f"priors {unknown} not in {registry_path} "
                                 f"(known: {sorted(entries)})")
        entries = {n: entries[n] for n in names}
    return {n: ShapePrior(e, load_vae(e, registry_path.parent, spec),
                          load_placement_estimator(e, registry_path.parent, spec))
            for n, e in entries.items()}


def parameter_count(model: nn.Module) -> int:
    """Count the scalar parameters of ``model``."""
    return sum(math.prod(p.shape) for p in model.parameters())
