"""Model registry: a prior's name -> its architecture and weights file (``models/registry.yaml``).

Weights are safetensors files whose metadata carries the architecture, so a file is loaded without
unpickling anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ModelLoadError
from ..tensor import TensorSpec
from .prior import ARGMMConfig, ARGMMPrior


@dataclass(frozen=True)
class ModelEntry:
    """One registry entry."""

    name: str  #: the prior's name, as requests give it
    kind: str  #: "ik_argmm" or "shape_vae"
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
        if item.get("kind") not in ("ik_argmm", "shape_vae"):
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


def load_ik_prior(path: str, spec: TensorSpec) -> ARGMMPrior:
    """Load an :class:`ARGMMPrior` written by :func:`save_ik_prior` onto ``spec``'s device."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"IK prior weights not found: '{path}'")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"IK prior weights '{path}' are corrupt: {exc}") from exc
    if meta.get("kind") != "ik_argmm" or "architecture" not in meta:
        raise ModelLoadError(f"'{path}' is not an IK prior (metadata kind={meta.get('kind')})")
    try:
        prior = ARGMMPrior(ARGMMConfig.from_dict(json.loads(meta["architecture"])), spec)
        prior.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"IK prior weights '{path}' do not match their architecture: "
                             f"{exc}") from exc
    return prior.requires_grad_(False)
