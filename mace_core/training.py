"""``mace-train``: the project's training command for every shipped prior.

    mace-train ik [--samples N --epochs E ...]        the Panda IK prior (models/panda_ik.*)
    mace-train shape --prior boxes|objects [...]      a point-cloud VAE prior
    mace-train avips [--method avips|vi|gaussian ...] the aVIPS IK mixture and its baselines
    mace-train placement --prior boxes|objects [...]  a shape prior's placement estimator
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import TypeVar

T = TypeVar("T")


def add_config_arguments(parser: argparse.ArgumentParser, defaults) -> None:
    """One ``--field-name`` option per field of the dataclass instance ``defaults``, typed and
    defaulted by it (the training commands' settings)."""
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)


def config_from_arguments(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass ``cls`` from the options :func:`add_config_arguments` declared."""
    return cls(**{k: getattr(args, k) for k in asdict(cls())})


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the training command of one prior family."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("ik", "shape", "avips", "placement"):
        print(__doc__.strip())
        return 2
    if argv[0] == "ik":
        from .ik.training import main_ik

        return main_ik(argv[1:])
    if argv[0] == "avips":
        from .ik.avips_training import main_avips

        return main_avips(argv[1:])
    if argv[0] == "placement":
        from .shape.placement_training import main_placement

        return main_placement(argv[1:])
    from .shape.training import main_shape

    return main_shape(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
