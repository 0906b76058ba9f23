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


def default_models_dir() -> str:
    """The shipped models: the source tree's ``models/`` when there is one, else the copy that
    ``pip install .`` puts in ``<prefix>/share/mace/models`` (a ROS install has them in
    ``share/mace_ros/models``, found through the ament index by the node)."""
    source = os.path.join(SOURCE_ROOT, "models")
    if os.path.isdir(source):
        return source
    return os.path.join(sys.prefix, INSTALLED_MODELS)


def default_scenes_dir() -> str:
    """The shipped scenes: the source tree's ``config/scenes/``, else the copy ``pip install .``
    puts in ``<prefix>/share/mace/scenes``."""
    source = os.path.join(SOURCE_ROOT, "config", "scenes")
    if os.path.isdir(source):
        return source
    return os.path.join(sys.prefix, "share", "mace", "scenes")
