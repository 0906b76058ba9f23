"""A full ROS 2 install gets every import from somewhere: each ROS package the code imports is
declared in ``package.xml``, each other Python library has a rosdep key there or a line in
``requirements-ros.txt``."""

from __future__ import annotations

import ast
import glob
import os
import re
import sys
import xml.etree.ElementTree as ET

from ament_index_python.packages import get_packages_with_prefixes

from conftest import REPO

#: ROS packages that the wheels here lack but the code imports (launch file, launch tests).
ROS_NOT_INSTALLED_HERE = {"launch", "launch_ros"}
#: Imported only when installed, behind ``importlib.util.find_spec`` (refinement "moveit").
OPTIONAL = {"moveit_msgs"}
#: import name -> rosdep key of the Python libraries a distribution packages.
ROSDEP_KEYS = {"numpy": "python3-numpy", "scipy": "python3-scipy", "yaml": "python3-yaml",
               "matplotlib": "python3-matplotlib"}
#: import name -> distribution name where they differ (warp comes with mujoco-warp).
DISTRIBUTIONS = {"pybullet_data": "pybullet", "mujoco_warp": "mujoco-warp",
                 "warp": "mujoco-warp"}


def _imports() -> set[str]:
    """Top-level modules imported by the installed code: mace_core, mace_ros and launch/."""
    files = glob.glob(os.path.join(REPO, "mace_core", "**", "*.py"), recursive=True)
    files += glob.glob(os.path.join(REPO, "mace_ros", "**", "*.py"), recursive=True)
    files += glob.glob(os.path.join(REPO, "launch", "*.py"))
    names: set[str] = set()
    for path in files:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - {"mace_core", "mace_ros", "__future__"} - set(sys.stdlib_module_names)


def test_every_import_has_a_declared_source():
    root = ET.parse(os.path.join(REPO, "package.xml")).getroot()
    declared = {e.text.strip() for e in root
                if e.tag in ("depend", "exec_depend", "build_export_depend")}
    required = set()
    for name in ("requirements-ros.txt", "requirements-gpu.txt"):  # the GPU backend: optional
        with open(os.path.join(REPO, name)) as f:
            required |= {re.split(r"[<>=!~ #]", line.strip(), maxsplit=1)[0].lower()
                         for line in f if line.strip() and not line.startswith("#")}
    ros_packages = set(get_packages_with_prefixes()) | ROS_NOT_INSTALLED_HERE
    imports = _imports()
    assert {"rclpy", "rcl_interfaces", "torch", "launch_ros"} <= imports  # the scan works
    missing = []
    for name in sorted(imports - OPTIONAL):
        if name in ros_packages:
            ok = name in declared
        elif name in ROSDEP_KEYS:
            ok = ROSDEP_KEYS[name] in declared
        else:
            ok = DISTRIBUTIONS.get(name, name).lower() in required
        if not ok:
            missing.append(name)
    assert not missing, f"imported but declared nowhere: {missing}"
