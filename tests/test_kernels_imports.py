"""`moekit.kernels` holds Triton kernels and their launchers only: no file in it imports from
moekit outside `moekit.kernels` (DESIGN.md layout; ops, layers and the rest build on it)."""
import ast
import pathlib

import moekit

KERNELS = pathlib.Path(moekit.__file__).parent / "kernels"


def _moekit_imports(path: pathlib.Path):
    """(line, module) of every import of a moekit module in the file, at any depth
    (lazy imports inside functions count), relative imports resolved."""
    package = ["moekit", "kernels"]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "moekit":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "moekit":
                continue
            if module == "moekit":         # `from moekit import ops` imports moekit.ops
                for alias in node.names:
                    yield node.lineno, f"moekit.{alias.name}"
            else:
                yield node.lineno, module


def _inside_kernels(module: str) -> bool:
    return module == "moekit.kernels" or module.startswith("moekit.kernels.")


def test_kernels_import_nothing_from_moekit_but_kernels():
    files = sorted(KERNELS.glob("*.py"))
    assert len(files) >= 4, f"expected the kernel files under {KERNELS}, found {[f.name for f in files]}"
    bad = [f"{f.name}:{line} imports {module}" for f in files for line, module in _moekit_imports(f)
           if not _inside_kernels(module)]
    assert not bad, "moekit.kernels must import only moekit.kernels modules:\n" + "\n".join(bad)


def test_the_import_walk_sees_every_form(tmp_path):
    """The check itself: absolute, relative, `from moekit import x` and function-level imports."""
    src = tmp_path / "k.py"
    src.write_text("import moekit.ops.gate\nfrom moekit import validate\nfrom ..ops import dispatch\n"
                   "from .launch import INTERPRET\nimport torch\n"
                   "def f():\n"
                   "    from moekit.kernels.launch import gemm_config\n"
                   "    from moekit.ops.backends import Backend\n")
    found = [m for _, m in _moekit_imports(src)]
    assert found == ["moekit.ops.gate", "moekit.validate", "moekit.ops", "moekit.kernels.launch",
                     "moekit.kernels.launch", "moekit.ops.backends"], found
    assert [m for m in found if not _inside_kernels(m)] == ["moekit.ops.gate", "moekit.validate", "moekit.ops",
                                                            "moekit.ops.backends"]
