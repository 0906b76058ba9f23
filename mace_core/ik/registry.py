"""Model registry: a prior's name -> its architecture and weights file (``models/registry.yaml``).

Weights are safetensors files whose metadata carries the architecture, so a file is loaded without
unpickling anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import ModelLoadError
from ..tensor import TensorSpec
from .avips import ConditionalGMM, MixturePrior
from .prior import ARGMMConfig, ARGMMPrior


#: registry kinds of IK priors: the autoregressive GMM (maximum likelihood on data) and the
#: aVIPS mixture (variational inference against the IK target density, pose-conditioned)
IK_KINDS = ("ik_argmm", "ik_avips")


@dataclass(frozen=True)
class ModelEntry:
    """One registry entry."""

    name: str  #: the prior's name, as requests give it
    kind: str  #: one of IK_KINDS, or "shape_vae"
    file: str  #: weights file, relative to the registry's folder
    description: str = ""  #: one line for humans


def load_registry(path: str) -> dict[str, ModelEntry]:
    """Parse ``registry.yaml``; unknown keys or kinds are errors."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ModelLoadError(f"cannot read model registry '{path}': {exc}") from exc
    entries = {}
    for name, item in (raw.get("models") or {}).items():
        unknown = set(item) - {"kind", "file", "description"}
        if unknown:
            raise ModelLoadError(f"registry entry '{name}' has unknown keys {sorted(unknown)}")
        if item.get("kind") not in IK_KINDS + ("shape_vae",):
            raise ModelLoadError(f"registry entry '{name}' has unknown kind '{item.get('kind')}'")
        entries[name] = ModelEntry(name=name, kind=item["kind"], file=item["file"],
                                   description=item.get("description", ""))
    return entries


def save_ik_prior(prior: ARGMMPrior, path: str, metadata: dict[str, str] | None = None) -> None:
    """Write the prior's state dict and architecture to a safetensors file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in prior.state_dict().items()}
    meta = {"kind": "ik_argmm", "architecture": json.dumps(prior.architecture())}
    meta.update(metadata or {})
    save_file(state, path, metadata=meta)


def save_mixture_prior(prior: MixturePrior, path: str, metadata: dict | None = None) -> None:
    """Write an aVIPS prior (weights, joint scaling, architecture; ``metadata`` values as JSON)
    to a safetensors file, atomically (checkpoints overwrite it)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in prior.state_dict().items()}
    meta = {"kind": "ik_avips", "architecture": json.dumps(prior.model.architecture)}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    save_file(state, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)


def _read(path: str) -> tuple[dict, dict]:
    """The state dict and metadata of a prior's safetensors file."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"IK prior weights not found: '{path}'")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(path), meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"IK prior weights '{path}' are corrupt: {exc}") from exc


def ik_prior_metadata(path: str) -> dict:
    """The metadata of an aVIPS prior's file, its values decoded (not the weights)."""
    _, meta = _read(path)
    return {k: json.loads(v) for k, v in meta.items() if k not in ("kind", "architecture")}


def load_ik_prior(path: str, spec: TensorSpec) -> ARGMMPrior | MixturePrior:
    """Load an IK prior written by :func:`save_ik_prior` or :func:`save_mixture_prior` onto
    ``spec``'s device (the file's metadata says which)."""
    state, meta = _read(path)
    kind = meta.get("kind")
    if kind not in IK_KINDS or "architecture" not in meta:
        raise ModelLoadError(f"'{path}' is not an IK prior (metadata kind={kind})")
    try:
        arch = json.loads(meta["architecture"])
        if kind == "ik_argmm":
            prior = ARGMMPrior(ARGMMConfig.from_dict(arch), spec)
        else:
            joints = state["q_low"].shape[0]
            prior = MixturePrior(ConditionalGMM(**arch), torch.zeros(joints),
                                 torch.zeros(joints))
        prior.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(f"IK prior weights '{path}' do not match their architecture: "
                             f"{exc}") from exc
    return prior.to(device=spec.device, dtype=spec.dtype).requires_grad_(False)
