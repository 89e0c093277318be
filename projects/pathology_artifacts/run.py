"""Artifact detection on real H&E: binary-expert MoEs (DCNN and ViT) against multiclass baselines.

    python -m projects.pathology_artifacts.run [--seeds 0 1 2] [--steps 100] [--figures] [--quick]

Kanwal et al. (2024; METHODS.md CV3) at this machine's scale. Data (`data.py`): 32-pixel tiles of
real H&E split by source image — train the CMU-1 slide and two histoqc templates, validation the
other two templates, test the tiatoolbox carcinoma field — with blur, folded tissue, air bubbles
and damaged tissue synthesised by seeded generators on every clean tile; real pen-ink and
coverslip-edge artifacts (histoqc thumbnails with masks) are a held-out check no model trained on.

Detectors (`moekit.models.pathology`), for both backbones (`MobileNetTiny`, a small dense ViT):
- **MoE**: four binary experts (artifact k vs artifact-free), each trained alone on its own tiles
  for ``--steps`` steps, fused by ``p_free = min_k (1 - p_k)``;
- **multiclass**: one network of one expert's size over the five classes, trained for
  ``4 · --steps`` steps (the experts' steps together: equal training steps).
All train with `fit_tile_classifier` (AdamW, cosine decay, `moekit.optim`). The threshold on
``p_free`` is tuned on the validation tiles to reach ``--sensitivity`` (`tune_threshold`) and
compared with the default 0.5.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# Sleeping OpenMP waiters: spinning ones make a step several times slower on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from moekit.models.pathology import (
    BinaryExpertMoE,
    MobileNetTiny,
    MulticlassDetector,
    classifier_macs,
    decide,
    detect_slide,
    fit_tile_classifier,
    latency_per_tile,
    save_overlays,
    sensitivity_specificity,
    tiles_to_tensor,
    tune_threshold,
    vit_tile_classifier,
)
from projects.pathology_artifacts import data as D

BACKBONES = ("cnn", "vit")
FIGURES = Path(__file__).resolve().parent / "figures"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="AdamW steps per binary expert (multiclass: 4×); "
                   "default 100, --quick 20")
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--sensitivity", type=float, default=0.95, help="validation sensitivity the threshold aims at")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/pathology_artifacts", help="results.json and full-size overlays")
    p.add_argument("--figures", action="store_true", help="also write the README's overlay figures")
    p.add_argument("--quick", action="store_true", help="20 steps per expert, 120 training tiles, one seed")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.quick else 100
    if args.quick:
        args.seeds = args.seeds[:1]
    return args


def build_backbone(kind: str, num_classes: int, tile: int = D.TILE) -> torch.nn.Module:
    if kind == "cnn":
        return MobileNetTiny(num_classes=num_classes, widths=(8, 16, 32, 64), expand=2)
    return vit_tile_classifier(image_size=tile, num_classes=num_classes, patch_size=8, d_model=48, n_layers=2,
                               n_heads=4)


def train_detectors(kind: str, train, *, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """``{"moe": BinaryExpertMoE, "multiclass": MulticlassDetector}`` of backbone `kind`, plus
    their training seconds, on ``train = (tiles uint8 (N, h, w, 3), labels (N,))``."""
    x_all, y_all = tiles_to_tensor(train[0]), torch.from_numpy(train[1])
    experts, t0 = {}, time.perf_counter()
    for k, name in enumerate(D.ARTIFACTS, start=1):
        keep = (y_all == 0) | (y_all == k)            # an expert sees only its artifact and clean tiles
        torch.manual_seed(seed * 100 + k)
        expert = build_backbone(kind, 2)
        fit_tile_classifier(expert, x_all[keep], (y_all[keep] == k).long(), steps=steps, batch_size=batch_size,
                            lr=lr, seed=seed * 100 + k)
        experts[name] = expert
    moe_s = time.perf_counter() - t0
    torch.manual_seed(seed * 100)
    net = build_backbone(kind, len(D.ARTIFACTS) + 1)
    t0 = time.perf_counter()
    fit_tile_classifier(net, x_all, y_all, steps=len(D.ARTIFACTS) * steps, batch_size=batch_size, lr=lr,
                        seed=seed * 100)
    mc_s = time.perf_counter() - t0
    return {"moe": BinaryExpertMoE(experts), "multiclass": MulticlassDetector(net, D.ARTIFACTS),
            "train_s": {"moe": moe_s, "multiclass": mc_s}}


@torch.no_grad()
def probabilities(detector, tiles: np.ndarray, batch: int = 256):
    detector.eval()
    outs = [detector.probabilities(tiles_to_tensor(tiles[i:i + batch])) for i in range(0, len(tiles), batch)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def f1_per_class(pred: np.ndarray, true: np.ndarray, k: int) -> float:
    tp = int(((pred == k) & (true == k)).sum())
    fp, fn = int(((pred == k) & (true != k)).sum()), int(((pred != k) & (true == k)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")


def evaluate(detector, sets: D.TileSets, sensitivity: float) -> dict:
    """Validation-tuned threshold; test and held-out metrics at 0.5 and at the tuned threshold."""
    pf_val, _ = probabilities(detector, sets.val[0])
    t_star = tune_threshold(pf_val, torch.from_numpy(sets.val[1] > 0), sensitivity=sensitivity)
    pf, pa = probabilities(detector, sets.test[0])
    y = sets.test[1]
    out = {"threshold": t_star}
    for tag, t in (("t0.5", 0.5), ("tuned", t_star)):
        pred = decide(pf, pa, min(t, 1.0)).numpy()
        m = sensitivity_specificity(torch.from_numpy(pred > 0), torch.from_numpy(y > 0))
        row = {"f1": m["f1"], "sensitivity": m["sensitivity"], "specificity": m["specificity"],
               "accuracy5": float((pred == y).mean())}
        for k, name in enumerate(D.ARTIFACTS, start=1):
            row[f"sens_{name}"] = float((pred[y == k] > 0).mean())        # flagged, whatever the type
            row[f"f1_{name}"] = f1_per_class(pred, y, k)                  # the right type
        held = {}
        for name, (tiles, is_art) in sets.held_out.items():
            hf, ha = probabilities(detector, tiles)
            hp = decide(hf, ha, min(t, 1.0)).numpy() > 0
            held[name] = {"sensitivity": float(hp[is_art].mean()) if is_art.any() else float("nan"),
                          "specificity": float((~hp[~is_art]).mean()) if (~is_art).any() else float("nan")}
        row["held_out"] = held
        out[tag] = row
    if isinstance(detector, BinaryExpertMoE):        # each expert alone on its own binary task
        out["experts_f1"] = {}
        for k, name in enumerate(D.ARTIFACTS):
            keep = (y == 0) | (y == k + 1)
            pred = pa[torch.from_numpy(keep), k].numpy() >= 0.5
            m = sensitivity_specificity(torch.from_numpy(pred), torch.from_numpy(y[keep] == k + 1))
            out["experts_f1"][name] = m["f1"]
    return out


def compute_cost(detector) -> dict:
    shape = (3, D.TILE, D.TILE)
    return {"params": sum(p.numel() for p in detector.parameters()), "macs": classifier_macs(detector, shape),
            "latency_ms": 1e3 * latency_per_tile(detector, shape, batch_size=64, repeats=5)}


def slide_overlays(detector, images: dict, threshold: float, out_dir: Path, seed: int) -> dict:
    """Overlays of the real pen-ink thumbnail and of the test field with each artifact painted
    into a few tile-aligned patches (synthetic, seeded), for the README."""
    results = {}
    pen = images["pen_green"]
    res = detect_slide(detector, pen, tile=D.TILE, threshold=threshold)
    results["pen_green"] = {"paths": save_overlays(pen, res, out_dir, stem="pen_green"), "report": res.report}
    field = images["target_image.png"].copy()
    rng = np.random.default_rng(seed)
    cells = rng.permutation((field.shape[0] // D.TILE) * (field.shape[1] // D.TILE))
    per_row = field.shape[1] // D.TILE
    for i, name in enumerate(D.ARTIFACTS):        # 2×2-tile patches, two per artifact
        for c in cells[2 * i:2 * i + 2]:
            y0, x0 = (c // per_row) * D.TILE, (c % per_row) * D.TILE
            y0, x0 = min(y0, field.shape[0] - 2 * D.TILE), min(x0, field.shape[1] - 2 * D.TILE)
            for dy in (0, D.TILE):
                for dx in (0, D.TILE):
                    tile = field[y0 + dy:y0 + dy + D.TILE, x0 + dx:x0 + dx + D.TILE]
                    field[y0 + dy:y0 + dy + D.TILE, x0 + dx:x0 + dx + D.TILE] = D.GENERATORS[name](tile, rng)
    res = detect_slide(detector, field, tile=D.TILE, threshold=threshold)
    results["test_field"] = {"paths": save_overlays(field, res, out_dir, stem="test_field"), "report": res.report}
    return results


def _fmt(x, pct=True):
    return "nan" if x != x else (f"{100 * x:.1f}" if pct else f"{x:.3f}")


def summarise(by_seed: dict) -> list[str]:
    """Markdown tables: mean ± std over seeds of the main metrics, per detector."""
    names = list(next(iter(by_seed.values()))["detectors"])
    lines = []

    def stat(get):
        v = np.array([get(r["detectors"][current]) for r in by_seed.values()], dtype=float)
        return f"{100 * v.mean():.1f} ± {100 * v.std():.1f}" if len(v) > 1 else f"{100 * v.mean():.1f}"

    lines.append("| detector | threshold t* | F1 @0.5 | sens @0.5 | spec @0.5 | F1 @t* | sens @t* | spec @t* | "
                 "5-class acc @t* | pen sens @t* | coverslip sens @t* | real clean spec @t* |")
    lines.append("|" + "---|" * 12)
    for current in names:
        ts = np.array([r["detectors"][current]["threshold"] for r in by_seed.values()])
        pen = lambda d, tag: np.mean([d[tag]["held_out"][p]["sensitivity"]
                                      for p in ("pen_red", "pen_green", "pen_black")])
        spec = lambda d, tag: np.nanmean([d[tag]["held_out"][p]["specificity"] for p in d[tag]["held_out"]])
        lines.append(f"| {current} | {ts.mean():.3f} | " + " | ".join([
            stat(lambda d: d["t0.5"]["f1"]), stat(lambda d: d["t0.5"]["sensitivity"]),
            stat(lambda d: d["t0.5"]["specificity"]), stat(lambda d: d["tuned"]["f1"]),
            stat(lambda d: d["tuned"]["sensitivity"]), stat(lambda d: d["tuned"]["specificity"]),
            stat(lambda d: d["tuned"]["accuracy5"]), stat(lambda d: pen(d, "tuned")),
            stat(lambda d: d["tuned"]["held_out"]["coverslip_edge"]["sensitivity"]),
            stat(lambda d: spec(d, "tuned"))]) + " |")
    lines.append("")
    lines.append("| detector | " + " | ".join(f"{a} sens / F1 @t*" for a in D.ARTIFACTS) + " |")
    lines.append("|" + "---|" * (len(D.ARTIFACTS) + 1))
    for current in names:
        lines.append(f"| {current} | " + " | ".join(
            f"{stat(lambda d: d['tuned'][f'sens_{a}'])} / {stat(lambda d: d['tuned'][f'f1_{a}'])}"
            for a in D.ARTIFACTS) + " |")
    return lines


def main(argv=None, *, images=None, masks=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if images is None:
        images, masks = D.load_all()
    out_dir = Path(args.out)
    by_seed = {}
    for seed in args.seeds:
        sets = D.build_tile_sets(images, masks, seed=seed, max_train_clean=120 if args.quick else None)
        print(f"seed {seed}: train {len(sets.train[1])} tiles, val {len(sets.val[1])}, test {len(sets.test[1])}; "
              f"held-out real " + ", ".join(f"{n} {int(a.sum())}/{len(a)} artifact" for n, (_, a) in
                                            sets.held_out.items()), flush=True)
        detectors, results, costs = {}, {}, {}
        for kind in BACKBONES:
            trained = train_detectors(kind, sets.train, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                      seed=seed)
            for which in ("moe", "multiclass"):
                name = f"{kind.upper()}-MoE" if which == "moe" else f"{kind.upper()} multiclass"
                detectors[name] = trained[which]
                results[name] = evaluate(trained[which], sets, args.sensitivity)
                costs[name] = {**compute_cost(trained[which]), "train_s": trained["train_s"][which]}
                r = results[name]
                print(f"  {name:16s} t*={r['threshold']:.3f}  F1 {_fmt(r['t0.5']['f1'])} → {_fmt(r['tuned']['f1'])}"
                      f"  sens {_fmt(r['t0.5']['sensitivity'])} → {_fmt(r['tuned']['sensitivity'])}"
                      f"  spec {_fmt(r['t0.5']['specificity'])} → {_fmt(r['tuned']['specificity'])}"
                      f"  | {costs[name]['params']} params, {costs[name]['macs'] / 1e6:.2f} MMAC/tile, "
                      f"{costs[name]['latency_ms']:.3f} ms/tile, train {costs[name]['train_s']:.0f} s", flush=True)
        by_seed[seed] = {"detectors": results, "compute": costs}
        if seed == args.seeds[0]:
            best = detectors["CNN-MoE"]
            by_seed[seed]["overlays"] = slide_overlays(best, images, results["CNN-MoE"]["threshold"], out_dir, seed)
    table = summarise(by_seed)
    print("\n".join(table))
    wall = time.perf_counter() - t_start
    print(f"wall {wall:.0f} s, seeds {args.seeds}, {args.steps} steps per expert")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"args": vars(args), "wall_s": wall, "by_seed": by_seed},
                                                     indent=1, default=str))
    if args.figures:
        _readme_figures(by_seed[args.seeds[0]]["overlays"])
    return {"by_seed": by_seed, "table": table, "wall_s": wall}


def _readme_figures(overlays: dict, width: int = 480) -> None:
    """Small copies of the overlays for the README (the full-size ones stay in --out)."""
    from PIL import Image
    FIGURES.mkdir(exist_ok=True)
    for stem, info in overlays.items():
        with Image.open(info["paths"]["overlay"]) as im:
            im.thumbnail((width, width))
            im.save(FIGURES / f"{stem}_artifacts.png", optimize=True)


if __name__ == "__main__":
    main()
