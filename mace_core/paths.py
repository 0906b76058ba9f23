"""Where the shipped files are: the source tree's folders, or the copies ``pip install .`` makes.

Paths are found from this file's place at the top of ``mace_core/``, so modules in the
capability packages (``robot/``, ``ik/``, ``shape/``) need not count folders themselves.
"""

from __future__ import annotations

import os
import sys

#: The repository (source tree) this package lives in: the folder above ``mace_core/``.
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Where ``pip install .`` (setup.py) puts the shipped models, below the environment's prefix.
INSTALLED_MODELS = os.path.join("share", "mace", "models")


def _first_folder(*candidates: str) -> str:
    """The first of ``candidates`` that is a folder, else the last (for the error message)."""
    return next((c for c in candidates if os.path.isdir(c)), candidates[-1])


def default_models_dir() -> str:
    """The shipped models: the source tree's ``models/`` when there is one, else the copy that
    ``pip install .`` puts in ``<prefix>/share/mace/models``, else the ROS package's in
    ``<prefix>/share/mace_ros/models`` (``scripts/setup.sh``'s ``.venv``, a colcon install; the
    node finds it through the ament index)."""
    return _first_folder(os.path.join(SOURCE_ROOT, "models"),
                         os.path.join(sys.prefix, INSTALLED_MODELS),
                         os.path.join(sys.prefix, "share", "mace_ros", "models"))


def default_scenes_dir() -> str:
    """The shipped scenes: the source tree's ``config/scenes/``, else the copy ``pip install .``
    puts in ``<prefix>/share/mace/scenes``, else the ROS package's."""
    return _first_folder(os.path.join(SOURCE_ROOT, "config", "scenes"),
                         os.path.join(sys.prefix, "share", "mace", "scenes"),
                         os.path.join(sys.prefix, "share", "mace_ros", "config", "scenes"))
