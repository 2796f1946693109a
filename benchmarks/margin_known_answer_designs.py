"""The margin estimator's designs on the known-answer linear-Gaussian VAEs of
tests/test_margin_known_answer.py, with the real default attack (no oracle): error against the exact
margin, coverage of [margin_lo, margin_hi], interval width and samples per point, 200 independent
streams per configuration (each point its own attack draws and Monte Carlo stream).

    python benchmarks/margin_known_answer_designs.py [--streams 200] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_margin_known_answer import CONFIGS, CONFIDENCE  # noqa: E402

from margin_samples import DESIGNS  # noqa: E402
from robbench.protocols import EstimationContext  # noqa: E402
from robbench.settings import RunSettings  # noqa: E402
from robbench_plugins.analytic import LinearGaussianVAE  # noqa: E402
from robbench_plugins.attacks import MaxDamageAttack  # noqa: E402
from robbench_plugins.estimators import ESTIMATORS  # noqa: E402

MARGIN = next(e for e in ESTIMATORS if e.name == "margin")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--designs", default="bisect,refine")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = []
    for cname in sorted(CONFIGS):
        kwargs, r = CONFIGS[cname]
        model = LinearGaussianVAE(**kwargs)
        exact = model.exact_margin(r)
        for design in args.designs.split(","):
            ctx = EstimationContext(model=model, attack=MaxDamageAttack(), attack_params=dict(MaxDamageAttack().defaults),
                                    params={**MARGIN.defaults, **DESIGNS[design], "keep_adversarial": False,
                                            "keep_witness": False},
                                    point_ids=torch.arange(args.streams),
                                    run=RunSettings(r=r, m=0.5, confidence=CONFIDENCE, backend="auto", seed=0))
            rows = MARGIN(ctx, torch.full((args.streams, *model.input_shape), 0.5))
            err = torch.tensor([row["margin"] / exact - 1.0 for row in rows])
            width = torch.tensor([(row["margin_hi"] - row["margin_lo"]) / exact for row in rows])
            rec = {"config": cname, "design": design, "exact": exact,
                   "rms_err_pct": 100 * float(err.pow(2).mean().sqrt()), "mean_err_pct": 100 * float(err.mean()),
                   "max_abs_err_pct": 100 * float(err.abs().max()),
                   "coverage": sum(row["margin_lo"] <= exact <= row["margin_hi"] for row in rows) / len(rows),
                   "width_median_pct": 100 * float(width.median()),
                   "samples_mean": sum(row["samples"] for row in rows) / len(rows),
                   "undecided": sum(row["undecided"] for row in rows)}
            out.append(rec)
            print(f"{cname:30s} {design:7s} R={exact:.4f} rms {rec['rms_err_pct']:.2f}% mean {rec['mean_err_pct']:+.2f}% "
                  f"max {rec['max_abs_err_pct']:.2f}% coverage {rec['coverage']:.3f} width {rec['width_median_pct']:.1f}% "
                  f"samples/point {rec['samples_mean']:.0f} undecided {rec['undecided']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"streams": args.streams, "rows": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
