"""Where the shipped models and scenes are, seen from the ROS side: the core's places (the
source tree, or what ``pip install .`` copies), else the installed ROS package's share folder
(``share/mace_ros/{models,config/scenes}``, found through the ament index)."""

from __future__ import annotations

import glob
import os

from mace_core.paths import default_models_dir, default_scenes_dir


def _share(*parts: str) -> str:
    from ament_index_python.packages import get_package_share_directory

    return os.path.join(get_package_share_directory("mace_ros"), *parts)


def models_dir(given: str = "") -> str:
    """``given``, else the source tree's ``models/``, else the installed package's."""
    if given:
        return given
    return default_models_dir() if os.path.isdir(default_models_dir()) else _share("models")


def scenes_dir() -> str:
    """The shipped scene files' folder (``config/scenes/`` in the source tree)."""
    return default_scenes_dir() if os.path.isdir(default_scenes_dir()) else _share(
        "config", "scenes")


def scene_files() -> list[str]:
    """The shipped scene files, sorted."""
    return sorted(glob.glob(os.path.join(scenes_dir(), "*.yaml")))
