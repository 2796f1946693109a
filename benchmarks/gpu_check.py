"""The prepared device check (issue 14 item 5): one command that builds the compiled extension, validates the
compiled Monte Carlo backend against the ``torch`` reference on the same device sample by sample, times both
on the standard decoder workload and on the end-to-end margin benchmark, and says whether ``auto`` may pick
the compiled backend.

    python benchmarks/gpu_check.py --device cuda --out OUT_DIR      # on a GPU: validates/times ``cuda``
    python benchmarks/gpu_check.py --device cpu --quick --out DIR    # anywhere: validates/times ``cpp``

``--device cuda`` checks the ``cuda`` backend against torch-on-CUDA; ``--device cpu`` checks ``cpp`` against
torch on the CPU (what tests/test_gpu_check.py runs at a tiny size, so this script cannot rot). Phases, each
recorded in ``OUT_DIR/gpu_check.json`` as soon as it ends (a run cut short keeps what it finished; a phase
that raises is recorded with its traceback and the next one still runs):

1. ``build``: load (build on first use) the extension, robbench/kernels.py; on CUDA the ``.cu`` sources are
   compiled in (csrc/cuda/montecarlo_cuda.cu).
2. ``validate``: on trained-shape MLP decoders (10 -> 256 -> 784 with sharp, partly saturated sigmoid
   outputs like a trained MNIST decoder; the standard 10 -> 512 -> 512 -> 784), one ReLU-output MLP and one
   generic decoder (compiled distance epilogue only): the counter-based normals bit for bit; the squared
   distances of both backends (how many are bit-identical, largest relative difference); decisions sample
   by sample, as tests/test_kernels.py does for ``cpp`` (B copies of one latent with distinct streams, one
   sample each, r^2 at each sample's own reference squared distance times 1 +- eps, eps from 0 (every
   decision a tie) to 0.6, and one ulp below it, and the median radius); and per-point counts with many
   samples at quantile radii. Validated = every decision equal.
3. ``standard``: the standard decoder workload (``robbench bench``: 10 -> 512 -> 512 -> 784, B = 64) at the
   median radius and at r = 4, reference and compiled interleaved, order rotated, per-repetition times
   (device synchronised around each call), counts asserted equal.
4. ``margin``: the end-to-end margin benchmark as ``robbench bench --margin`` runs it
   (robbench/paper/margin_bench.py: the main command's three beta-VAEs trained on ``--device``, their 25
   points, the margin job), both backends interleaved, identical margins asserted.
5. ``verdict``: ``auto`` may pick the compiled backend when it is validated (phase 2 and identical margins
   in phase 4) and faster (every Monte Carlo ratio of phases 3 and 4 above 1). Printed and stored; this script
   changes nothing (``auto_priority`` of the ``cuda`` backend stays as it is until someone reads the verdict).

The environment (GPU name and capability, driver and CUDA versions, nvcc, torch and its matmul settings,
CPU, threads, git commit or ``$ROBBENCH_COMMIT``, a digest of the sources, UTC date) is recorded first.
benchmarks/gpu_run.sh is the wrapper a session passes to the device tool (see benchmarks/README.md, "GPU").
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "torch"
FORMAT = "robbench-gpu-check/1"
EPSILONS = (0.0, 1e-6, 1e-4, 1e-3, 1e-2, 0.1, 0.6)


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------
def source_digest(root: Path = ROOT) -> str:
    """sha256 (first 16 hex digits) over the sources that decide the results (robbench/, plugins/, csrc/
    and this script): identifies the code on a machine that has no .git (the device machine gets a copy of
    the working tree). ``python benchmarks/gpu_check.py --digest`` prints it for the local checkout."""
    h = hashlib.sha256()
    files = [p for d in ("robbench", "plugins", "csrc") for p in (root / d).rglob("*")
             if p.is_file() and p.suffix in (".py", ".cpp", ".cu", ".h", ".yaml")]
    for p in sorted(files + [root / "benchmarks" / "gpu_check.py"]):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _command(*cmd: str) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device) -> dict[str, Any]:
    """Everything a figure of this script depends on (JSON-ready)."""
    from robbench import bench

    env: dict[str, Any] = dict(bench.environment())
    env["commit"] = env.get("commit") or os.environ.get("ROBBENCH_COMMIT") or None
    env["source_digest"] = source_digest()
    env["device"] = str(device)
    env["torch_cuda"] = torch.version.cuda
    env["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    env["cuda_matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    nvcc = shutil.which("nvcc")
    if not nvcc:
        from torch.utils import cpp_extension
        cand = Path(cpp_extension.CUDA_HOME or "/nonexistent") / "bin" / "nvcc"
        nvcc = str(cand) if cand.exists() else None
    env["nvcc"] = (_command(nvcc, "--version").splitlines() or [""])[-1] if nvcc else None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                      "multiprocessors": props.multi_processor_count,
                      "memory_gib": round(props.total_memory / 2 ** 30, 1)}
        env["driver"] = _command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") or None
        env["nvidia_smi"] = _command("nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,"
                                     "temperature.gpu,power.draw", "--format=csv") or None
    return env


# ---------------------------------------------------------------------------------------------
# Decoders of the validation
# ---------------------------------------------------------------------------------------------
class MLPVAE(nn.Module):
    """An MLP decoder k -> hidden... -> d with ReLU hidden layers and ``final`` output; the last layer scaled
    and shifted so outputs are sharp and partly saturated, as a trained MNIST decoder's are."""

    def __init__(self, k: int, hidden: tuple[int, ...], d: int, *, final: type[nn.Module] = nn.Sigmoid,
                 seed: int = 0, scale: float = 1.0, bias: float = 0.0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.latent_dim, self.input_shape = k, (d,)
        sizes = [k, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers += [nn.Linear(sizes[-1], d), final()]
        self.decoder = nn.Sequential(*layers)
        with torch.no_grad():
            for p in self.decoder.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
            self.decoder[-2].weight.mul_(scale)
            self.decoder[-2].bias.add_(bias)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).view(-1, *self.input_shape)


class GenericVAE(MLPVAE):
    """The same MLP behind a ``decode`` the decoder planner cannot read: the compiled backends then decode
    with torch and run only their distance / threshold / count epilogue (``count_le``)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.net = self.decoder
        del self.decoder

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, *self.input_shape)


def validation_models() -> dict[str, nn.Module]:
    from robbench.bench import StandardDecoderVAE

    return {"mnist-like 10-256-784 sigmoid": MLPVAE(10, (256,), 784, seed=0, scale=4.0, bias=-3.0),
            "mnist-like 10-256-784 sigmoid (seed 1)": MLPVAE(10, (256,), 784, seed=1, scale=4.0, bias=-3.0),
            "standard 10-512-512-784 sigmoid": StandardDecoderVAE(),
            "relu output 8-96-64-50": MLPVAE(8, (96, 64), 50, final=nn.ReLU, seed=2),
            "generic decoder (count_le epilogue) 10-256-784": GenericVAE(10, (256,), 784, seed=3, scale=4.0,
                                                                       bias=-3.0)}


def _points(model: nn.Module, B: int, seed: int, device: torch.device):
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same points on every device
    mu = torch.randn(B, model.latent_dim, generator=gen).to(device)
    sigma = (0.2 + 0.8 * torch.rand(B, model.latent_dim, generator=gen)).to(device)
    with torch.no_grad():
        center = model.decode(mu).flatten(1).contiguous()
    return mu.contiguous(), sigma.contiguous(), center


def _modes(backend: Any) -> list[tuple[str, bool]]:
    screens = [False, True] if getattr(backend, "has_screen", False) else [True]
    return [(p, s) for p in backend.precisions for s in screens]


# ---------------------------------------------------------------------------------------------
# Phase 2: validation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def validate(device: torch.device, compiled: str, *, per_sample: int, points: int, samples: int) -> dict[str, Any]:
    """Compare ``compiled`` with the reference on ``device``: normals, squared distances, decisions sample
    by sample (``per_sample`` copies of one latent, one sample each) and counts (``points`` x ``samples``).
    ``ok``: every decision equal."""
    from robbench import kernels, rng
    from robbench.plugins import get_registries

    regs = get_registries().backends
    ref, comp = regs.get(REFERENCE), regs.get(compiled)
    why = comp.unavailable(device, warn=True)
    if why is not None:
        raise RuntimeError(f"backend {compiled!r} cannot run on {device}: {why}")
    out: dict[str, Any] = {"backend": compiled, "reference": REFERENCE, "cases": []}

    gen = torch.Generator().manual_seed(0)
    ka, kb, j = (torch.randint(0, 2 ** 32, (max(per_sample, 1000),), generator=gen).to(device) for _ in range(3))
    out["normals_bit_exact"] = all(torch.equal(kernels.normals(ka, kb, j, k), rng.normals(ka, kb, j, k))
                                   for k in (1, 5, 10))

    def counts(backend: Any, model, mu, sigma, center, r2, n, seed, **kw) -> torch.Tensor:
        return backend.count_within(model, mu, sigma, center, r2.contiguous(), n, seed=seed,
                                    stream_ids=torch.arange(mu.shape[0], device=device), sample_offset=0,
                                    **kw).counts

    for ci, (label, model) in enumerate(validation_models().items()):
        model = model.to(device).eval()
        case: dict[str, Any] = {"decoder": label, "modes": [f"{p}{'+screen' if s else ''}" for p, s in _modes(comp)]}
        # sample by sample: B copies of one latent, distinct streams, one sample each
        mu0, sigma0, center0 = _points(model, 1, 5 + ci, device)
        B = per_sample
        mu, sigma, center = (t.expand(B, -1).contiguous() for t in (mu0, sigma0, center0))
        ids = torch.arange(B, device=device)
        d2 = ref.sq_distances(model, mu, sigma, center, 1, seed=4, stream_ids=ids)[:, 0]
        d2c = comp.sq_distances(model, mu, sigma, center, 1, seed=4, stream_ids=ids)[:, 0]
        rel = ((d2c - d2).abs() / d2.abs().clamp_min(1e-30))
        case["sq_distances"] = {"samples": B, "bit_identical": int((d2c == d2).sum()),
                                "max_rel_diff": float(rel.max()), "median_rel_diff": float(rel.median())}
        radii: list[tuple[str, torch.Tensor]] = [("median", d2.median().expand(B))]
        for eps in EPSILONS:
            for sign in ((1,) if eps == 0 else (1, -1)):
                radii.append((f"own x (1{'+' if sign > 0 else '-'}{eps:g})", d2 * (1 + sign * eps)))
        radii.append(("own, one ulp below", torch.nextafter(d2, torch.zeros((), device=device))))
        per: list[dict[str, Any]] = []
        for name, r2 in radii:
            want = counts(ref, model, mu, sigma, center, r2, 1, 4)
            assert torch.equal(want, (d2 <= r2).long()), "the reference disagrees with its own distances"
            for precision, screen in _modes(comp):
                got = counts(comp, model, mu, sigma, center, r2, 1, 4, precision=precision, screen=screen)
                per.append({"radius": name, "mode": f"{precision}{'+screen' if screen else ''}",
                            "decisions": B, "mismatches": int((got != want).sum())})
        case["per_sample"] = per
        # many samples per point at quantile radii of the reference's own distances
        mu, sigma, center = _points(model, points, 100 + ci, device)
        dist = ref.sq_distances(model, mu, sigma, center, samples, seed=9,
                                stream_ids=torch.arange(points, device=device))
        per_point: list[dict[str, Any]] = []
        for q in (0.01, 0.5, 0.99):
            r2 = dist.sort(1).values[:, int(q * (samples - 1))]  # an actual sample's distance: ties
            want = counts(ref, model, mu, sigma, center, r2, samples, 9)
            for precision, screen in _modes(comp):
                got = counts(comp, model, mu, sigma, center, r2, samples, 9, precision=precision, screen=screen)
                per_point.append({"quantile": q, "mode": f"{precision}{'+screen' if screen else ''}",
                                  "points": points, "samples": samples,
                                  "count_mismatches": int((got != want).sum()),
                                  "decision_difference": int((got - want).abs().sum())})
        case["per_point"] = per_point
        case["ok"] = all(r["mismatches"] == 0 for r in per) and all(r["count_mismatches"] == 0 for r in per_point)
        out["cases"].append(case)
    out["decisions_checked"] = sum(r["decisions"] for c in out["cases"] for r in c["per_sample"]) + \
        sum(r["points"] * r["samples"] for c in out["cases"] for r in c["per_point"])
    out["ok"] = bool(out["normals_bit_exact"]) and all(c["ok"] for c in out["cases"])
    return out


# ---------------------------------------------------------------------------------------------
# Phase 3: standard workload
# ---------------------------------------------------------------------------------------------
def standard(device: torch.device, compiled: str, *, points: int, samples: list[int], repeats: int) -> dict[str, Any]:
    """The standard decoder workload per S and radius (median, 4), backends interleaved, order rotated;
    per-repetition seconds, medians and the reference/compiled ratio; equal counts asserted."""
    from robbench import bench

    model = bench.StandardDecoderVAE().to(device).eval()
    backends = [REFERENCE, compiled]
    rows: list[dict[str, Any]] = []
    for S in samples:
        for radius in ("median", 4.0):
            times: dict[str, list[float]] = {b: [] for b in backends}
            digests: set[str] = set()
            last: dict[str, Any] = {}
            for name in backends:  # one-time costs (library handles, allocator, cached norms) outside the timing
                bench.run_case(model, "standard-mlp", name, "fp32", points, min(S, 256), radius, device=device)
            for rep in range(repeats):
                for name in backends[rep % 2:] + backends[:rep % 2]:
                    row = bench.run_case(model, "standard-mlp", name, "fp32", points, S, radius, device=device)
                    times[name].append(row.seconds)
                    digests.add(row.counts_sha1)
                    last[name] = row
            if len(digests) != 1:
                raise AssertionError(f"standard workload S={S} radius={radius}: backends gave different counts")
            med = {b: _median(v) for b, v in times.items()}
            rows.append({"S": S, "B": points, "radius": radius, "seconds": times, "median_s": med,
                         "ratio": med[REFERENCE] / med[compiled],
                         "gflops": {b: last[b].gflop / med[b] for b in backends},
                         "executed_gflops": {b: last[b].executed_gflops for b in backends},
                         "peak_mem_mib": {b: last[b].peak_mem_mib for b in backends}})
    return {"rows": rows, "ok": True}


# ---------------------------------------------------------------------------------------------
# Phase 4: end-to-end margin benchmark
# ---------------------------------------------------------------------------------------------
def margin(device: torch.device, compiled: str, *, config: Path | None, repeats: int,
           peak: dict[str, float], on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """``robbench bench --margin``'s margin rows on ``device`` (models trained there), both backends
    interleaved; margin_bench asserts identical margins, intervals and sample counts. ``on_row`` receives
    each row as it is measured (so a run cut short keeps them)."""
    from dataclasses import asdict

    from robbench.paper import margin_bench
    from robbench.plugins import get_registries

    cfg = margin_bench.margin_config(config)
    cfg.device = str(device)
    try:
        rows = margin_bench.margin_rows(cfg, get_registries(), [REFERENCE, compiled], repeats=repeats, peaks=peak,
                                        progress=lambda r: _progress(r, on_row))
    except AssertionError as err:  # margin_bench's check: a backend gave another margin, interval or count
        return {"ok": False, "identical_margins": False, "error": f"AssertionError: {err}"[:2000]}
    summary = margin_bench.summarize(rows, REFERENCE)
    return {"models": list(cfg.models), "dataset": cfg.dataset, "points": cfg.points, "repeats": repeats,
            "identical_margins": True, "summary": summary, "rows": [asdict(r) for r in rows], "ok": True}


def _progress(row: Any, on_row: Callable[[dict[str, Any]], None] | None) -> None:
    from dataclasses import asdict

    _say(f"  margin {row.model} {row.backend} rep {row.repeat}: {row.whole_s:.2f} s (attack {row.attack_s:.2f}, "
         f"MC {row.montecarlo_s:.2f})")
    if on_row is not None:
        on_row(asdict(row))


# ---------------------------------------------------------------------------------------------
# Verdict, output
# ---------------------------------------------------------------------------------------------
def verdict(doc: dict[str, Any]) -> dict[str, Any]:
    """Whether ``auto`` may pick the compiled backend: validated (phase 2, identical margins in phase 4) and
    faster (every Monte Carlo ratio of phases 3 and 4 above 1); and the issue's target (>= 3x) on CUDA."""
    phases = doc["phases"]
    compiled = doc["compiled_backend"]
    reasons: list[str] = []
    val = phases.get("validate", {})
    validated = bool(val.get("ok")) and phases.get("margin", {}).get("identical_margins") is not False
    if not val.get("ok"):
        reasons.append("validation " + ("failed: " + val["error"] if "error" in val else "found differing decisions"))
    ratios: dict[str, float] = {}
    for r in phases.get("standard", {}).get("rows", []):
        ratios[f"standard S={r['S']} r={r['radius']}"] = r["ratio"]
    summary = phases.get("margin", {}).get("summary", {})
    for key, stats in summary.items():
        if key.endswith(f"/ {compiled}") and "montecarlo_ratio" in stats:
            ratios[f"margin {key.split(' / ')[0]} (Monte Carlo)"] = stats["montecarlo_ratio"]
            ratios[f"margin {key.split(' / ')[0]} (whole)"] = stats["whole_ratio"]
    for name in ("standard", "margin"):
        if "error" in phases.get(name, {}):
            reasons.append(f"{name} phase failed: {phases[name]['error']}")
    mc = {k: v for k, v in ratios.items() if "(whole)" not in k}
    faster = bool(mc) and all(v > 1.0 for v in mc.values()) and not any("phase failed" in r for r in reasons)
    if mc and not faster:
        reasons.append("not faster everywhere: " + ", ".join(f"{k} {v:.2f}x" for k, v in mc.items() if v <= 1.0))
    if not mc:
        reasons.append("no timing")
    out = {"validated": validated, "faster": faster, "auto_may_pick": validated and faster,
           "monte_carlo_ratios": ratios, "reasons": reasons}
    if compiled == "cuda" and mc:
        out["issue14_target_3x"] = {"met": min(mc.values()) >= 3.0, "min_ratio": min(mc.values())}
    return out


def _median(vals: list[float]) -> float:
    vals = sorted(vals)
    n = len(vals)
    return math.nan if n == 0 else (vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2]))


def _say(text: str) -> None:
    print(text, flush=True)


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """The short summary printed at the end (also stored in the JSON)."""
    env, phases, v = doc["environment"], doc["phases"], doc.get("verdict", {})
    comp = doc["compiled_backend"]
    where = env.get("gpu", {}).get("name") if doc["device"].startswith("cuda") else env.get("cpu")
    lines = [f"robbench gpu_check: {comp} vs {REFERENCE} on {doc['device']} ({where}); torch {env.get('torch')}, "
             f"CUDA {env.get('torch_cuda')}, driver {env.get('driver')}, commit {env.get('commit')}, "
             f"sources {env.get('source_digest')}, {env.get('date')}"]
    for name in ("build", "validate", "standard", "margin"):
        ph = phases.get(name)
        if ph is None:
            lines.append(f"  {name}: not run")
        elif "error" in ph:
            lines.append(f"  {name}: FAILED after {ph.get('seconds', 0):.1f} s: {ph['error']}")
        elif name == "build":
            lines.append(f"  build: ok in {ph['seconds']:.1f} s")
        elif name == "validate":
            bad = [(c["decoder"], sum(r["mismatches"] for r in c["per_sample"]),
                    sum(r["count_mismatches"] for r in c["per_point"]),
                    sorted({r["radius"] for r in c["per_sample"] if r["mismatches"]}))
                   for c in ph["cases"] if not c["ok"]]
            lines.append(f"  validate: {'identical decisions' if ph['ok'] else 'DIFFERENT decisions'} "
                         f"({ph['decisions_checked']:,} decisions, normals bit-exact: {ph['normals_bit_exact']})"
                         + "".join(f"; {d}: {a} per-sample mismatches (radii {', '.join(rs) or '-'}), "
                                   f"{b} per-point count mismatches" for d, a, b, rs in bad))
            for c in ph["cases"]:
                sq = c["sq_distances"]
                lines.append(f"    {c['decoder']}: squared distances bit-identical {sq['bit_identical']}/"
                             f"{sq['samples']}, max rel diff {sq['max_rel_diff']:.2e}")
        elif name == "standard":
            for r in ph["rows"]:
                m = r["median_s"]
                lines.append(f"  standard B={r['B']} S={r['S']} r={r['radius']}: {REFERENCE} {m[REFERENCE]:.4f} s, "
                             f"{comp} {m[comp]:.4f} s, ratio {r['ratio']:.2f}x")
        elif name == "margin":
            for key, s in ph["summary"].items():
                lines.append(f"  margin {key}: whole {s['whole_s']['median']:.2f} s, MC {s['montecarlo_s']['median']:.2f} s"
                             + (f", MC ratio {s['montecarlo_ratio']:.2f}x, whole ratio {s['whole_ratio']:.2f}x"
                                if "montecarlo_ratio" in s and not key.endswith(f"/ {REFERENCE}") else ""))
    if v:
        lines.append(f"  auto may pick {comp}: {'YES' if v['auto_may_pick'] else 'no'} "
                     f"(validated {v['validated']}, faster {v['faster']})"
                     + (f"; {'; '.join(v['reasons'])}" if v["reasons"] else ""))
        if "issue14_target_3x" in v:
            t = v["issue14_target_3x"]
            lines.append(f"  issue 14 target cuda >= 3x torch-CUDA: {'met' if t['met'] else 'not met'} "
                         f"(smallest Monte Carlo ratio {t['min_ratio']:.2f}x)")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default; checks backend 'cuda'), cuda:N, or cpu "
                                                    "(checks backend 'cpp')")
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="directory for gpu_check.json")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI): few samples, a tiny margin config")
    p.add_argument("--repeats", type=int, help="interleaved repetitions of every timing (default 3; quick 1)")
    p.add_argument("--samples", help="comma-separated S of the standard workload (default 1024,16384; quick 64)")
    p.add_argument("--points", type=int, help="B of the standard workload (default 64; quick 4)")
    p.add_argument("--per-sample", type=int, help="per-sample decisions per radius and decoder "
                                                  "(default 8192 on CUDA, 512 on the CPU; quick 64)")
    p.add_argument("--margin-config", type=Path, help="YAML keys on top of the main command's defaults for the "
                                                      "margin phase (default: none; quick: a tiny digits config)")
    p.add_argument("--skip", default="", help="comma-separated phases to leave out: validate,standard,margin")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    p.add_argument("--digest", action="store_true", help="print the source digest of this checkout and exit")
    return p.parse_args(argv)


QUICK_MARGIN = {"dataset": "digits", "points": 2, "r": 1.0, "model_params": {"beta_vae": {"beta": [1.0]}},
                "train": {"epochs": 1}, "estimator_params": {"margin": {"samples_max": 1024, "tolerance": 0.5}}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.digest:
        print(source_digest())
        return 0
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"gpu_check: --device must be cpu, cuda or cuda:N; got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch sees no CUDA device (torch.cuda.is_available() is "
                         "False); use --device cpu to check the cpp backend")
    if args.threads:
        torch.set_num_threads(args.threads)
    compiled = "cuda" if device.type == "cuda" else "cpp"
    repeats = args.repeats or (1 if args.quick else 3)
    samples = [int(s) for s in args.samples.split(",")] if args.samples else ([64] if args.quick else [1024, 16384])
    points = args.points or (4 if args.quick else 64)
    per_sample = args.per_sample or (64 if args.quick else (8192 if device.type == "cuda" else 512))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "gpu_check.json"
    margin_cfg = args.margin_config
    if args.quick and margin_cfg is None:
        import yaml
        margin_cfg = args.out / "quick_margin.yaml"
        margin_cfg.write_text(yaml.safe_dump(QUICK_MARGIN))

    doc: dict[str, Any] = {"format": FORMAT, "device": str(device), "compiled_backend": compiled,
                           "reference": REFERENCE, "settings": {"quick": args.quick, "repeats": repeats,
                                                                "samples": samples, "points": points,
                                                                "per_sample": per_sample, "skip": sorted(skip),
                                                                "margin_config": str(margin_cfg) if margin_cfg else None},
                           "environment": environment(device), "phases": {}}

    def save() -> None:
        tmp = out_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        tmp.replace(out_file)

    def phase(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        _say(f"gpu_check: {name} ...")
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - a failed phase is a result; the next phases still run
            result = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
                      "traceback": traceback.format_exc()[-6000:]}
            _say(f"gpu_check: {name} FAILED: {result['error']}")
        result["seconds"] = time.perf_counter() - start
        doc["phases"][name] = result
        save()

    save()

    def build() -> dict[str, Any]:
        from robbench import kernels
        if not kernels.load(warn=True):
            raise RuntimeError(f"extension build failed: {kernels.build_error()}")
        if compiled == "cuda" and not kernels.cuda_available():
            raise RuntimeError("the extension loaded without CUDA kernels (is CUDA_HOME/nvcc found?)")
        return {"ok": True, "ext_dir": str(kernels.ext_dir())}

    phase("build", build)
    if "validate" not in skip:
        phase("validate", lambda: validate(device, compiled, per_sample=per_sample, points=max(points // 4, 2),
                                           samples=samples[0] if args.quick else 4096))
    if "standard" not in skip:
        phase("standard", lambda: standard(device, compiled, points=points, samples=samples, repeats=repeats))
    if "margin" not in skip:
        def run_margin() -> dict[str, Any]:
            from robbench.bench import measure_peak
            peak = {"fp32": measure_peak(torch.float32, n=256 if args.quick else (8192 if device.type == "cuda"
                                                                                  else 2048),
                                         seconds=0.05 if args.quick else 1.0, device=device)}
            def on_row(row: dict[str, Any]) -> None:  # kept if the run is cut short inside this phase
                doc["phases"].setdefault("margin_partial", {"rows": []})["rows"].append(row)
                save()

            res = margin(device, compiled, config=margin_cfg, repeats=max(repeats - 1, 1) if not args.quick else 1,
                         peak=peak, on_row=on_row)
            doc["phases"].pop("margin_partial", None)
            res["peak_gflops"] = peak
            return res
        phase("margin", run_margin)
    doc["verdict"] = verdict(doc)
    doc["summary"] = summary_lines(doc)
    save()
    for line in doc["summary"]:
        _say(line)
    _say(f"gpu_check: results in {out_file}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
