"""`backend="auto"` picks, on the shapes the CPU benchmark knows, the explicit backend that
`benchmarks/bench_cpu.py` measured fastest there (`benchmarks/cpu_results.json`, kept in the
repository). No timing here: the recorded medians decide; the test fails when the recorded
run found another backend faster than the one "auto" resolves to."""
import json
import re
from pathlib import Path

import pytest
import torch

from moekit.ops.backends import resolve_backend

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_results.json"
# Two medians closer than this are a tie: in one quiet run the same code path timed under two
# names ("auto" and "grouped_mm") came out 2-3 % apart, and at T = 1 the eager loop and the
# grouped_mm loop (both one matrix-vector product per expert) 4 % apart.
TIE = 1.05


def _sections():
    data = json.loads(RESULTS.read_text())
    for section in ("train", "decode"):
        for shape, rows in data.get(section, {}).items():
            yield section, shape, rows


def _explicit(rows):
    return {m.group(1): r["median_ms"] for n, r in rows.items()
            if (m := re.fullmatch(r"moekit \((\w+)\)", n)) and m.group(1) != "auto" and r.get("median_ms")}


def _operands(section, shape):
    dims = {k: int(v) for k, v in re.findall(r"(\w)=(\d+)", shape)}
    if section == "decode":
        dims.update(D=2048, F=768, E=128, K=8)
    N = dims["T"] * dims["K"]
    x = torch.empty(N, dims["D"])
    w = torch.empty(dims["E"], 2 * dims["F"], dims["D"]).transpose(1, 2)     # the layer's gate/up view
    return x, w


def test_results_record_explicit_backends():
    recorded = [(s, sh) for s, sh, rows in _sections() if len(_explicit(rows)) >= 2]
    assert recorded, f"{RESULTS} has no shape with two explicit moekit backends timed: re-run bench_cpu.py"


@pytest.mark.parametrize("section, shape, rows", list(_sections()), ids=lambda v: v if isinstance(v, str) else "")
def test_auto_resolves_to_the_fastest_recorded_backend(section, shape, rows):
    times = _explicit(rows)
    if len(times) < 2:
        pytest.skip(f"{shape}: fewer than two explicit backends recorded")
    x, w = _operands(section, shape)
    chosen = resolve_backend("auto", x, w).name
    assert chosen in times, (chosen, times)
    best = min(times.values())
    assert times[chosen] <= TIE * best, f"{shape}: auto -> {chosen} ({times[chosen]:.0f} ms), fastest {times}"
