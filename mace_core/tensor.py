"""One place that decides where tensors live and what precision they carry."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorSpec:
    """Device and dtype passed explicitly to every constructor in mace_core.

    Build it once (``TensorSpec.resolve("auto")``) and hand it down; nothing in the core picks a
    device on its own.
    """

    device: torch.device = torch.device("cpu")  #: where every tensor of a solver lives
    dtype: torch.dtype = torch.float32  #: floating-point precision of kinematics and models

    @staticmethod
    def resolve(device: str = "auto", dtype: torch.dtype = torch.float32) -> "TensorSpec":
        """Map a config string ("auto", "cpu", "cuda", "cuda:1") onto a concrete spec.

        Raises:
            ValueError: CUDA was asked for explicitly but is not available.
        """
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device '{device}' requested but CUDA is not available")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"unsupported device '{device}' (use auto, cpu or cuda[:N])")
        return TensorSpec(dev, dtype)

    def tensor(self, data, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Copy array-like ``data`` onto this spec's device (float tensors get its dtype)."""
        return torch.as_tensor(data, device=self.device, dtype=dtype or self.dtype)

    def zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=self.device, dtype=self.dtype)

    def generator(self, seed: int | None) -> torch.Generator:
        """A random generator on this device, seeded when ``seed`` is not None."""
        gen = torch.Generator(device=self.device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(seed))
        return gen
