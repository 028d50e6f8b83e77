"""The benchmark and example scripts are not run by the suite (they need real data or take
minutes), so at least: each one parses, and every name it imports from decodiff exists."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("benchmarks/*.py"), *REPO.glob("examples/*.py")])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_parses_and_its_decodiff_imports_exist(script):
    tree = ast.parse(script.read_text(), filename=str(script))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("decodiff_cli"):
            module = importlib.import_module(node.module)
            missing = [alias.name for alias in node.names if not hasattr(module, alias.name)
                       and importlib.util.find_spec(f"{node.module}.{alias.name}") is None]
            assert not missing, f"{script.name}:{node.lineno}: {node.module} has no {', '.join(missing)}"
            private = [alias.name for alias in node.names if alias.name.startswith("_")]
            assert not private, f"{script.name}:{node.lineno}: imports private names {', '.join(private)}"


def test_the_maintained_scripts_are_checked():
    names = {f"{p.parent.name}/{p.name}" for p in SCRIPTS}
    assert {"benchmarks/score_speed.py", "benchmarks/train_speed.py", "benchmarks/metrics_memory.py",
            "examples/make_dataset.py", "examples/mean_latent_baseline.py"} <= names
