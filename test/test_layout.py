"""The core's layout (README, Layout): robot/ at the bottom, no ROS in the core, small modules.

Read from the source with ``ast``, so an import hidden inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "mace_core"
MAX_LINES = 800


def _modules() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def _imported(path: Path) -> set[str]:
    """Absolute dotted names of the modules ``path`` imports (relative ones resolved)."""
    package = ".".join(path.relative_to(CORE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def test_the_core_is_grouped_by_capability():
    packages = {p.parent.name for p in _modules() if p.parent != CORE}
    assert packages == {"robot", "ik", "shape"}


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(CORE)))
def test_module_imports_respect_the_layers(path: Path):
    imported = _imported(path)
    assert not any(n == "mace_ros" or n.startswith(("mace_ros.", "rclpy")) for n in imported)
    if path.parent.name == "robot":
        upward = sorted(n for n in imported if n.startswith(("mace_core.ik", "mace_core.shape")))
        assert not upward, f"robot/ must not import ik/ or shape/: {upward}"
    if path.parent.name == "shape":
        across = sorted(n for n in imported if n.startswith("mace_core.ik"))
        assert not across, f"shape/ must not import ik/: {across}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(CORE)))
def test_no_module_is_longer_than_the_limit(path: Path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name}: {lines} lines"
