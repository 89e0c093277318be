"""The package's imports flow one way (DESIGN.md's layout): a module imports only from packages
before its own in `ORDER`, never from projects/, and `import moekit` loads no trainer, recipe,
analysis or command-line code."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "moekit"

# One tier per entry; a module may import from its own package and from earlier tiers only.
ORDER = [
    ("kernels",),          # Triton kernels and launchers: nothing else from moekit
    ("validate",),         # argument checks
    ("ops",),              # autograd ops beside their references
    ("losses",),           # pure balancing losses, the bias balancer
    ("routing", "experts"),
    ("layers",),
    ("parallel",),
    ("optim",),            # the one optimizer / schedule / update step
    ("models",),
    ("meta", "continual"),  # paradigm methods built on models: meta-learning (MoE-NPs, MxML), continual (§7)
    ("recipes",),          # model surgery, distillation, Hugging Face conversion
    ("hf",),               # the Hugging Face façade over recipes.hf_convert
    ("train",),
    ("analysis",),
    ("cli",),
]
RANK = {pkg: i for i, tier in enumerate(ORDER) for pkg in tier}


def _module_name(path: Path, src: Path = SRC) -> list[str]:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path, src: Path = SRC):
    """(line, imported module) for every import in `path`, relative imports resolved."""
    mod = _module_name(path, src)
    package = mod if path.name == "__init__.py" else mod[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "moekit":      # from moekit import layers, MoE …: each name may be a package
                for a in node.names:
                    yield node.lineno, f"moekit.{a.name}"
            else:
                yield node.lineno, target


def violations(src: Path = SRC) -> list[str]:
    out = []
    for path in sorted(src.rglob("*.py")):
        mod = _module_name(path, src)
        own = mod[1] if len(mod) > 1 else None          # None: moekit/__init__.py
        for line, target in _imports(path, src):
            parts = target.split(".")
            if parts[0] == "projects":
                out.append(f"{path.relative_to(src.parent)}:{line}: imports {target} "
                           "(projects are never imported by src/)")
                continue
            if parts[0] != "moekit" or len(parts) < 2:
                continue
            dep = parts[1]
            if dep not in RANK:
                continue            # a name re-exported by moekit/__init__ (e.g. `from moekit import MoE`)
            if own is None:
                if RANK[dep] > RANK["models"]:
                    out.append(f"{path.relative_to(src.parent)}:{line}: moekit/__init__ imports {target}")
                continue
            if own not in RANK:
                out.append(f"{path.relative_to(src.parent)}:{line}: package {own!r} has no place in ORDER")
                continue
            if dep != own and RANK[dep] >= RANK[own]:
                out.append(f"{path.relative_to(src.parent)}:{line}: {own} imports {target}, which is not below it")
    return out


def test_every_package_has_a_tier():
    names = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert names <= set(RANK), f"packages missing from ORDER: {sorted(names - set(RANK))}"


def test_imports_flow_one_way():
    bad = violations()
    assert not bad, "imports against the layering of DESIGN.md:\n" + "\n".join(bad)


def test_planted_upward_import_is_caught(tmp_path):
    pkg = tmp_path / "moekit"
    for name, body in [("__init__.py", "from moekit import layers\n"),
                       ("ops/__init__.py", ""), ("ops/gate.py", "import torch\nfrom moekit.layers.moe import MoE\n"),
                       ("kernels/__init__.py", "from . import router\n"), ("kernels/router.py",
                                                                           "from ..ops import gate\n"),
                       ("layers/__init__.py", "from moekit.ops import gate\n"),
                       ("models/x.py", "import projects.census.data\n")]:
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(body)
    bad = violations(pkg)
    assert any("moekit/ops/gate.py:2" in b and "moekit.layers.moe" in b for b in bad), bad
    assert any("moekit/kernels/router.py:1" in b and "moekit.ops" in b for b in bad), bad
    assert any("projects" in b for b in bad), bad
    assert not any("layers/__init__" in b for b in bad), bad      # a downward import is fine


def test_import_moekit_is_light():
    code = textwrap.dedent("""
        import json, sys
        import moekit
        moekit.MoE(d_model=8, num_experts=2, top_k=1)
        print(json.dumps(sorted(m for m in sys.modules if m.startswith(("moekit", "projects", "transformers",
                                                                      "matplotlib", "safetensors", "triton")))))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    heavy = [m for m in loaded if m.split(".")[0] in ("projects", "transformers", "matplotlib", "safetensors", "triton")
             or (m.startswith("moekit.") and m.split(".")[1] in ("recipes", "hf", "train", "analysis", "cli",
                                                                "models", "meta", "continual"))]
    assert not heavy, f"import moekit loaded {heavy}"


def test_lazy_subpackages_still_reachable():
    import moekit

    assert moekit.models.TransformerLM.__name__ == "TransformerLM"
    with pytest.raises(AttributeError, match="no_such_thing"):
        moekit.no_such_thing
