#!/usr/bin/env bash
# Installs moekit as a user does — from the wheel alone, into a fresh venv, away from the source
# tree — and runs what a user runs first: `import moekit`, the README's usage block and
# `moekit train --preset tiny`.
#
#   bash .ci/wheel_check.sh            # locally (python3 on PATH; PyPI or a pip cache for torch)
#   PYTHON=.venv/bin/python bash .ci/wheel_check.sh
#
# STEPS (default 10) sets train.steps of the tiny run. The Shakespeare corpus is fetched into
# ~/.cache/moekit on first use ($MOEKIT_CACHE moves it), as for any user.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-10}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}      # pinned so pip takes the CPU build
export PIP_DISABLE_PIP_VERSION_CHECK=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/moekit-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS
phase() { echo "== [$((SECONDS - t0)) s] $*"; }

phase "build the sdist, and the wheel from the sdist (so the sdist is checked too)"
if ! "$PYTHON" -c "import build" 2>/dev/null; then
    "$PYTHON" -m venv "$WORK/buildenv"
    "$WORK/buildenv/bin/pip" install -q "build>=1"
    BUILD_PY="$WORK/buildenv/bin/python"
else
    BUILD_PY=$PYTHON
fi
"$BUILD_PY" -m build -q -o "$WORK/dist" "$ROOT" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/moekit-*.whl)
ls "$WORK"/dist

phase "every file under src/moekit is in the wheel (package data included)"
"$PYTHON" - "$WHEEL" "$ROOT/src" <<'EOF'
import pathlib, sys, zipfile
wheel, src = sys.argv[1], pathlib.Path(sys.argv[2])
names = set(zipfile.ZipFile(wheel).namelist())
want = {p.relative_to(src).as_posix() for p in (src / "moekit").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
missing = sorted(want - names)
if missing:
    sys.exit(f"files under src/moekit missing from {wheel}: {missing} "
             "(add them to [tool.setuptools.package-data] in pyproject.toml)")
extra = sorted(n for n in names if not n.startswith(("moekit/", "moekit-")))
if extra:
    sys.exit(f"the wheel holds files outside the moekit package: {extra}")
print(f"{len(want)} files, all in the wheel")
EOF

phase "fresh venv (no system site-packages), the wheel and the train extra only"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$WORK/venv/bin/pip" install -q "$TORCH_SPEC"
"$WORK/venv/bin/pip" install -q "$WHEEL[train]"

mkdir "$WORK/user" && cd "$WORK/user"           # no source tree on the path from here on
# The README's usage block, extracted so that it cannot drift from what is tested.
"$PYTHON" - "$ROOT/README.md" > usage.py <<'EOF'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
section = text.split("\n## Usage\n", 1)[1]
block = re.search(r"```python\n(.*?)```", section, re.S)
sys.stdout.write(block.group(1))
EOF

phase "import moekit"
"$VPY" - "$ROOT" <<'EOF'
import importlib.metadata, pathlib, sys
import moekit
root = pathlib.Path(sys.argv[1]).resolve()
where = pathlib.Path(moekit.__file__).resolve()
assert root not in where.parents, f"moekit imported from the source tree: {where}"
assert moekit.__version__ == importlib.metadata.version("moekit"), (moekit.__version__,
                                                                   importlib.metadata.version("moekit"))
print(f"moekit {moekit.__version__} from {where.parent}; routers: {len(moekit.available_routers())}")
EOF
"$WORK/venv/bin/moekit" --version

phase "the README's usage block"
"$VPY" usage.py

phase "moekit train --preset tiny (train.steps=$STEPS)"
"$WORK/venv/bin/moekit" train --preset tiny --set "train.steps=$STEPS" --out runs/tiny --quiet
for f in summary.json report.html; do
    test -s "runs/tiny/$f" || { echo "runs/tiny/$f was not written"; exit 1; }
done
"$VPY" -c "import json; s = json.load(open('runs/tiny/summary.json')); print('summary.json keys:', sorted(s)[:8])"

echo "wheel check passed in $((SECONDS - t0)) s"
