"""The bf16 band's epilogue per row: inside the product's tiles (``LastLayerBound::decide_tiles``,
``csrc/common/bounds.h`` part 7) vs the whole product first and then ``decide_epilogue`` per row, on each
trained beta-VAE's own last layer (K = 256 -> P = 784) with hidden rows of its first recorded Monte Carlo
call's point (z = mu + sigma eps through the decoder's hidden layers).

Timed inside C++ (``robbench::band_tiles_timing``: the calling thread's CPU time, best of 8 interleaved rounds
of ``--calls`` passes each), per ``ROBBENCH_LEAN_TERMS`` setting (1: part 7's lean terms, the default; 0:
part 5's terms in the tiles). Prints microseconds per pass of ``--rows`` rows: the product alone, the row
path, the tile pass, and each one's epilogue (its time minus the product's).

Run: ``ROBBENCH_CACHE=... python benchmarks/band_tiles.py [--rows 128] [--calls 50] [--repeats 3]``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from robbench import decoding, kernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from margin_calls import record_calls  # noqa: E402


def rows_of(model: torch.nn.Module, call: dict, n: int) -> tuple[torch.Tensor, ...]:
    """(h, W^T, b, centers, r2) for n samples of the call's first point through the decoder's hidden layers."""
    center = call["center"][:1].reshape(1, -1)
    plan = decoding.decoder_plan(model, center.shape[1])
    g = torch.Generator().manual_seed(0)
    z = call["mu"][:1] + call["sigma"][:1] * torch.randn(n, call["mu"].shape[1], generator=g)
    h = z
    for wt, b, act in zip(plan.weights_t[:-1], plan.biases[:-1], plan.acts[:-1]):
        h = decoding.activate_(torch.addmm(b, h[:, :wt.shape[0]], wt), act)
    D = center.shape[1]
    wt, b = plan.weights_t[-1][:h.shape[1], :D].contiguous(), plan.biases[-1][:D].contiguous()
    cen = center.expand(n, -1).contiguous()
    r2 = torch.full((n,), float(call["r2"].reshape(-1)[0]))
    return h.contiguous(), wt, b, cen, r2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    assert kernels.load(), kernels.build_error()
    for label, model, calls in record_calls():
        h, wt, b, cen, r2 = rows_of(model, calls[0], args.rows)
        for lean in ("1", "0"):
            os.environ["ROBBENCH_LEAN_TERMS"] = lean
            for _ in range(args.repeats):
                prod, rows, tiles = torch.ops.robbench.band_tiles_timing(h, wt, b, cen, r2, args.calls)
                print(f"{label} rows {args.rows} lean {lean}: us product {prod:.1f}  row path {rows:.1f} "
                      f"(epilogue {rows - prod:.1f})  tiles {tiles:.1f} (epilogue {tiles - prod:.1f})")


if __name__ == "__main__":
    main()
