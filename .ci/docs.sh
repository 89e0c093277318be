#!/usr/bin/env bash
# Builds the documentation site in strict mode (a broken `:::` reference, link or include fails)
# and runs every ```python block of the pages (each in a fresh namespace), so the guides' code keeps working.
# Blocks fenced as ```py are illustrative (they need a GPU, torchrun or a checkpoint) and are
# not run.
#
#   bash .ci/docs.sh                       # with the docs extra installed: pip install -e '.[docs]'
#   SITE=site bash .ci/docs.sh             # keep the built site in site/ (gitignored)
#   PYTHON=.venv/bin/python bash .ci/docs.sh
#   MKDOCS=docs-venv/bin/mkdocs PYTHON=.venv/bin/python bash .ci/docs.sh   # mkdocs in a venv of its own
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MKDOCS=${MKDOCS:-"$PYTHON -m mkdocs"}     # e.g. MKDOCS=/path/to/docs-venv/bin/mkdocs
export NO_MKDOCS_2_WARNING=1
if [ -z "${SITE:-}" ]; then
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/moekit-site.XXXXXX"); trap 'rm -rf "$SITE"' EXIT
fi
t0=$SECONDS

$MKDOCS build --strict --quiet -d "$SITE"
echo "site built ($((SECONDS - t0)) s)"

"$PYTHON" - <<'PYEOF'
import pathlib, re, sys, tempfile

import moekit

root = pathlib.Path.cwd()
problems = []

# Every project has its page, and the page is in the navigation.
nav = (root / "mkdocs.yml").read_text(encoding="utf-8")
for readme in sorted(root.glob("projects/*/README.md")):
    name = readme.parent.name
    page = root / "docs" / "projects" / f"{name}.md"
    if not page.exists() or f'"projects/{name}/README.md"' not in page.read_text(encoding="utf-8"):
        problems.append(f"docs/projects/{name}.md must include projects/{name}/README.md")
    if f"projects/{name}.md" not in nav:
        problems.append(f"mkdocs.yml nav lacks projects/{name}.md")

# Every registered router is in the routers guide's table.
routers = (root / "docs" / "guides" / "routers.md").read_text(encoding="utf-8")
listed = set(re.findall(r"^\| `(\w+)` \|", routers, re.M))
for name in moekit.available_routers():
    if name not in listed:
        problems.append(f"router {name!r} is missing from the table of docs/guides/routers.md")
for name in sorted(listed - set(moekit.available_routers())):
    problems.append(f"docs/guides/routers.md lists {name!r}, which is not a registered router")

# Every ```python block runs, each in a fresh namespace (one process for all: torch loads once).
import contextlib, io, os, traceback
blocks = 0
with tempfile.TemporaryDirectory() as tmp:
    os.chdir(tmp)
    for page in sorted((root / "docs").rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        for i, code in enumerate(re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)):
            blocks += 1
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(compile(code, f"{page.relative_to(root)} block {i + 1}", "exec"), {"__name__": "__main__"})
            except Exception:
                problems.append(f"{page.relative_to(root)}, python block {i + 1} fails:\n{traceback.format_exc()}")
    os.chdir(root)
print(f"{blocks} python blocks run")
if problems:
    sys.exit("\n".join(problems))
PYEOF
echo "docs check passed in $((SECONDS - t0)) s"
