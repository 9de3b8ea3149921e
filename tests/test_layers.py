"""The floors of DESIGN.md, checked on the source tree: a module imports only from its own floor or below, plus
the named exclusions within a floor. Lazy imports inside functions count: they are dependencies all the same.
Importing the package must not change the process (no environment variables set)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "robodit"

FLOORS = {
    "nn": 0, "diffusion": 0, "errors": 0, "action_space": 0, "keys": 0, "profiling": 0,
    "datasets": 1, "envs": 1,
    "policies": 2,
    "training": 3, "control": 3, "deploy": 3,
    "evaluation": 4,
    "cli": 5, "": 5,  # "" is `import robodit` itself: the public API, for users, never for the package
}
# Exclusions the floors alone do not express (DESIGN.md, "Rules the code keeps").
FORBIDDEN = {
    "policies": {"envs"},  # a policy knows no simulator or robot
    "envs": {"training", "policies", "deploy"},
}


def _part(module: str) -> str | None:
    """'robodit.datasets.store' -> 'datasets'; None for a module outside the package."""
    if module == "robodit":
        return ""
    if module.startswith("robodit."):
        return module.split(".")[1]
    return None


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def layer_violations(pkg: Path = PKG) -> list[str]:
    bad = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg)
        if rel == Path("__init__.py"):
            continue  # the package's API surface (load_policy) may reach any floor, lazily
        own = rel.parts[0].removesuffix(".py")
        if own not in FLOORS:
            bad.append(f"robodit/{rel}: robodit.{own} has no floor in tests/test_layers.py (add it to DESIGN.md too)")
            continue
        for line, module in _imports(path):
            other = _part(module)
            if other is None or other == own:
                continue
            if other not in FLOORS:
                bad.append(f"robodit/{rel}:{line} imports {module}, which has no floor")
            elif FLOORS[other] > FLOORS[own] or other in FORBIDDEN.get(own, ()):
                bad.append(f"robodit/{rel}:{line} imports {module} (floor {FLOORS[other]}) from floor {FLOORS[own]}")
    return bad


def test_every_module_imports_downward_only():
    assert layer_violations() == []


def test_the_check_catches_an_upward_import(tmp_path):
    pkg = tmp_path / "robodit"
    (pkg / "policies").mkdir(parents=True)
    (pkg / "nn").mkdir()
    (pkg / "policies" / "bad.py").write_text("def f():\n    from robodit.envs import make_env\n")
    (pkg / "nn" / "worse.py").write_text("import robodit.training.trainer\n")
    (pkg / "nn" / "fine.py").write_text("from robodit.keys import is_image_key\nimport torch\n")
    found = layer_violations(pkg)
    assert len(found) == 2
    assert any("policies/bad.py:2 imports robodit.envs" in v for v in found)
    assert any("nn/worse.py:1 imports robodit.training.trainer (floor 3) from floor 0" in v for v in found)


# Third-party libraries that set variables themselves (diffusers: TORCHINDUCTOR_CACHE_DIR, KMP_*) load first, so
# that what is measured is robodit's own import-time behaviour.
_PROBE = """
import json, os, sys
import torch, diffusers, diffusers.training_utils
before = dict(os.environ)
import robodit.policies.dit, robodit.policies.mdt, robodit.policies.mode, robodit.policies.pad, robodit.policies.rdt
policy_side = sorted(m for m in sys.modules if m.startswith(("robodit.envs", "robodit.training", "robodit.evaluation",
                                                             "robodit.control", "robodit.deploy", "mujoco",
                                                             "metaworld", "robosuite")))
import robodit, robodit.datasets.multi, robodit.envs
import robodit.training.trainer, robodit.evaluation.engine, robodit.control, robodit.deploy.server
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({"policy_side": policy_side, "changed": changed}))
"""


@pytest.fixture(scope="module")
def probe():
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_policies_loads_no_simulator_trainer_or_evaluator(probe):
    assert probe["policy_side"] == []


def test_importing_the_package_sets_no_environment_variable(probe):
    assert probe["changed"] == []


def test_readme_layout_matches_the_tree():
    """Every file or folder the README's layout names exists, and every package of robodit is named there."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout\n", 1)[1].split("```", 2)[1]
    named = set()
    for line in block.splitlines():
        words = line.split()
        folder = None
        for word in words:
            word = word.rstrip(",:;")
            if word.startswith(("robodit/", "benchmarks/")) or word in ("train.py", "eval.py"):
                folder = word if word.endswith("/") else str(Path(word).parent) + "/"
                named.add(word)
            elif folder and (word.endswith((".py", ".sh", "/"))) and "/" not in word.rstrip("/"):
                named.add(folder.rstrip("/") + "/" + word if folder != "./" else word)
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert missing == [], f"the README's layout names what the tree lacks: {missing}"
    packages = {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    unnamed = sorted(p for p in packages if f"robodit/{p}/" not in named)
    assert unnamed == [], f"packages missing from the README's layout: {unnamed}"
