"""The layering of the training package: `training/` builds on the plugin, the plugin stands alone."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.tlora_testing import REPO_ROOT


def _imported_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_the_plugin_imports_neither_the_training_package_nor_accelerate():
    """diffusers itself needs accelerate only for some loaders; the plugin must add no such need."""
    plugin = sorted((REPO_ROOT / "pipelines" / "tlora").glob("*.py"))
    assert len(plugin) > 5
    for path in plugin:
        roots = {name.split(".")[0] for name in _imported_modules(path)}
        assert not roots & {"training", "accelerate"}, path


def test_the_image_loader_imports_without_accelerate():
    """The evaluation reads images through `training.images`; that must not drag in the training stack."""
    code = "import sys\nsys.modules['accelerate'] = None\nfrom training.images import open_image\nprint('ok')\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
