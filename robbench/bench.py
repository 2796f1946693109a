"""``robbench bench``: time the Monte Carlo engine per backend and precision.

Rows are data (:class:`BenchRow`); :func:`render` turns them into a rich table, ``--json`` writes them.
Standard workload: MLP decoder 10 -> 512 -> 512 -> 784 (ReLU, sigmoid output; seeded random weights),
B = 64 points, S in {256, 1024, 10^4, 10^5}, r = 4. ``--model module:callable`` benchmarks a user's own
model (the callable returns an ``nn.Module`` with ``latent_dim`` and ``decoder`` or ``decode``).
GFLOP counts 2 * (multiply-adds of the decoder's linear layers) per sample ("effective": work a full
decode would do); "executed" leaves out the last layers the Lipschitz screen skipped. The peak is this
machine's measured large-GEMM throughput (2048^3 ``torch.mm``, same thread count) per precision; "% peak"
is the executed work's time at those peaks (bf16 last layers at the bf16 peak, hidden layers and fp32 last
layers, fp32 rechecks of bf16 rows included, at the fp32 peak) over the measured time.
``--margin``: the end-to-end margin benchmark (:mod:`robbench.paper.margin_bench`) and the standard workload at
the median radius, backends interleaved, repeated. Rechecked: fraction of the bf16 last-layer samples recomputed in fp32; screened: fraction of
all samples decided with no last-layer work.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.table import Table
from torch import nn

from robbench import kernels, montecarlo, terminal
from robbench.backends import Backend
from robbench.config import ConfigError
from robbench.decoding import DEFAULT_CHUNK_ROWS
from robbench.plugins import get_registries

STANDARD_SAMPLES = (256, 1024, 10_000, 100_000)


class StandardDecoderVAE(nn.Module):
    """The standard workload's model: MLP decoder 10 -> 512 -> 512 -> 784 with a sigmoid output."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.latent_dim, self.input_shape = 10, (1, 28, 28)
        self.decoder = nn.Sequential(nn.Linear(10, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                     nn.Linear(512, 784), nn.Sigmoid())
        with torch.no_grad():
            for p in self.decoder.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).view(-1, *self.input_shape)


@dataclass
class BenchRow:
    model: str
    backend: str
    precision: str
    B: int
    S: int
    D: int
    seconds: float
    samples_per_s: float
    gflop: float
    gflops: float
    peak_fraction: float | None
    speedup_vs_torch: float | None
    peak_mem_mib: float
    recheck_fraction: float | None
    screen: bool = False
    screened_fraction: float | None = None
    executed_gflops: float | None = None
    counts_sha1: str = ""  # digest of the per-point counts of the last repeat: equal digests, equal decisions
    bf16_gflop: float = 0.0  # of the executed GFLOP, the last layers run in bf16 (the rest is fp32)


def row_peak_fraction(row: BenchRow, peaks: dict[str, float]) -> float | None:
    """Executed work's time at the measured peaks (bf16 last layers at the bf16 peak, everything else, fp32
    rechecks included, at the fp32 peak) over the measured time; None without a FLOP count or a peak."""
    if not row.gflop or not row.executed_gflops or "fp32" not in peaks or (row.bf16_gflop and "bf16" not in peaks):
        return None
    executed = row.executed_gflops * row.seconds
    ideal = (executed - row.bf16_gflop) / peaks["fp32"] + (row.bf16_gflop / peaks["bf16"] if row.bf16_gflop else 0.0)
    return ideal / row.seconds


def decoder_flops(model: nn.Module, D: int) -> float:
    """FLOPs per sample of the decoder's linear layers (0 when unknown: generic decoders)."""
    dec = getattr(model, "decoder", None)
    if not isinstance(dec, nn.Module):
        return 0.0
    return float(sum(2 * m.in_features * m.out_features for m in dec.modules() if isinstance(m, nn.Linear)))


def last_layer_flops(model: nn.Module) -> float:
    """FLOPs per sample of the decoder's last linear layer (0 when unknown)."""
    dec = getattr(model, "decoder", None)
    lins = [m for m in dec.modules() if isinstance(m, nn.Linear)] if isinstance(dec, nn.Module) else []
    return float(2 * lins[-1].in_features * lins[-1].out_features) if lins else 0.0


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously; a timer around a launch alone
    measures the launch). No-op on the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure_peak(dtype: torch.dtype, *, n: int = 2048, seconds: float = 1.0,
                 device: torch.device | str = "cpu") -> float:
    """Measured matrix-product throughput (GFLOP/s) of a large square (n x n) @ (n x n) ``torch.mm`` in
    ``dtype`` on ``device`` (on the CPU at the current torch thread count): best of repeated timed products
    over ``seconds``. Large so that the library's GEMM runs at its steady rate (a small product under-reports
    the peak, which made the old "% peak" column exceed 100 %)."""
    a, b = torch.randn(n, n).to(device, dtype), torch.randn(n, n).to(device, dtype)
    torch.mm(a, b)
    synchronize(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def environment() -> dict[str, object]:
    """What a benchmark figure depends on, recorded with every ``--json`` output (as torch.utils.benchmark
    / pytest-benchmark do): torch version, CPU model and its matrix-relevant ISA flags, threads, git
    commit (with "+dirty" for uncommitted changes), date (UTC)."""
    import datetime
    import platform
    import subprocess

    model, flags = platform.processor() or "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            if key.strip() == "flags":
                flags = value.split()
                break
    except OSError:
        pass
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")
    root = Path(__file__).resolve().parent.parent

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": model,
            "cpu_flags": [f for f in wanted if f in flags], "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "commit": commit or None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


class _PeakRSS:
    """Samples the process RSS every few ms; ``peak_mib`` is the peak above the starting RSS."""

    def __init__(self):
        self._stop = threading.Event()
        self.base = self.peak = self._rss()

    @staticmethod
    def _rss() -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.003)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_mib(self) -> float:
        return (self.peak - self.base) / 2 ** 20


def run_case(model: nn.Module, name: str, backend: str | Backend, precision: str, B: int, S: int,
             radius: float | str, seed: int = 0, repeats: int = 1, screen: bool = True,
             device: torch.device | str = "cpu") -> BenchRow:
    """Time one backend's count_within once per repeat (best kept) for one configuration. ``backend``:
    a registered name or a backend object; ``radius``: the output-space r, or "median"; ``device``: where
    the points live (the model must already be there); CUDA work is synchronised before and after each
    timed call, and ``peak_mem_mib`` is then the device's peak allocation above the start."""
    impl = get_registries().backends.get(backend) if isinstance(backend, str) else backend
    has_screen = bool(getattr(impl, "has_screen", False))
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same points on every device
    mu = torch.randn(B, model.latent_dim, generator=gen).to(dev)
    sigma = (0.3 + 0.5 * torch.rand(B, model.latent_dim, generator=gen)).to(dev)
    with torch.no_grad():
        center = model.decode(mu).flatten(1)
    D = center.shape[1]
    if radius == "median":
        r = montecarlo.sample_distances(model, mu, sigma, center, 64, seed=seed + 1).median(1).values
    else:
        r = torch.full((B,), float(radius))
    r2 = montecarlo.radius_sq(r, B, mu.device)
    best, rech, mem, screened = math.inf, None, 0.0, None
    for _ in range(repeats):
        if dev.type == "cuda":
            synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        with _PeakRSS() as rss:
            t0 = time.perf_counter()
            with torch.no_grad():
                res = impl.count_within(model, mu, sigma, center, r2, S, seed=seed,
                                        stream_ids=torch.arange(B, device=dev), sample_offset=0,
                                        chunk_rows=DEFAULT_CHUNK_ROWS, precision=precision, screen=screen)
            synchronize(dev)
            elapsed = time.perf_counter() - t0
        rech = res.recheck_fraction if precision == "bf16" else None
        screened = res.screened / res.total if has_screen and res.total else None
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20 if dev.type == "cuda" else rss.peak_mib
        best, mem = min(best, elapsed), max(mem, peak)
        digest = hashlib.sha1(res.counts.cpu().to(torch.int64).numpy().tobytes()).hexdigest()
    gflop = decoder_flops(model, D) * B * S / 1e9
    saved = getattr(res, "last_layer_saved", 0.0)  # early exit: last layers not computed, in samples
    last = last_layer_flops(model)
    # executed: last layers skipped by the screen / early exit left out, fp32 rechecks of bf16 rows added
    executed = gflop - ((screened or 0.0) * B * S + saved - res.rechecked) * last / 1e9
    return BenchRow(name, impl.name, precision, B, S, D, best, B * S / best, gflop, gflop / best, None, None, mem,
                    rech, screen=has_screen and screen, screened_fraction=screened,
                    executed_gflops=executed / best, counts_sha1=digest, bf16_gflop=res.bf16_samples * last / 1e9)


def render(rows: list[BenchRow], peaks: dict[str, float]) -> Table:
    """Fixed headers and number formats."""
    table = Table(title="robbench Monte Carlo engine (measured GEMM peak: "
                        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()) + ")")
    for head in ("model", "backend", "precision", "screen", "B", "S", "D", "time [s]", "samples/s", "GFLOP/s eff.",
                 "GFLOP/s exec.", "% peak (exec.)", "speed-up", "peak mem [MiB]", "screened", "rechecked"):
        table.add_column(head, justify="left" if head in ("model", "backend", "precision") else "right")
    for r in rows:
        table.add_row(r.model, r.backend, r.precision, "yes" if r.screen else "no", str(r.B), str(r.S), str(r.D),
                      f"{r.seconds:.3f}", f"{r.samples_per_s:,.0f}", f"{r.gflops:.1f}",
                      "-" if r.executed_gflops is None else f"{r.executed_gflops:.1f}",
                      "-" if r.peak_fraction is None else f"{100 * r.peak_fraction:.0f}%",
                      "-" if r.speedup_vs_torch is None else f"{r.speedup_vs_torch:.2f}x",
                      f"{r.peak_mem_mib:.0f}",
                      "-" if r.screened_fraction is None else f"{100 * r.screened_fraction:.1f}%",
                      "-" if r.recheck_fraction is None else f"{100 * r.recheck_fraction:.1f}%")
    return table


def load_model(spec: str) -> nn.Module:
    """``module:callable`` (or ``path/to/file.py:callable``) returning a model with ``decode`` and
    ``latent_dim``; ConfigError (exit 2) naming what went wrong otherwise."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ConfigError(f"bad value for --model: {spec!r}; allowed: module:callable or path/to/file.py:callable")
    try:
        if mod_name.endswith(".py"):
            spec_ = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
            if spec_ is None or not Path(mod_name).is_file():
                raise FileNotFoundError(f"no file {mod_name}")
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except Exception as err:  # noqa: BLE001 - whatever the import raised, it is the user's input
        raise ConfigError(f"bad value for --model: {spec!r}; cannot import {mod_name!r} "
                          f"({type(err).__name__}: {err})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"bad value for --model: {spec!r}; {mod_name!r} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"bad value for --model: {spec!r}; calling {attr}() with no arguments failed "
                          f"({type(err).__name__}: {err})") from None
    if not (isinstance(model, nn.Module) and callable(getattr(model, "decode", None))
            and isinstance(getattr(model, "latent_dim", None), int)):
        raise ConfigError(f"bad value for --model: {spec!r}; {attr}() returned {type(model).__name__}, "
                          "expected an nn.Module with decode(z) and an integer latent_dim")
    return model.eval()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; give an integer >= 1")
    return value


def _sample_list(text: str) -> list[int]:
    """Comma-separated S values, each an integer >= 1."""
    try:
        return [_positive_int(part.strip()) for part in text.split(",")]
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}; allowed: comma-separated integers >= 1, "
                                         "e.g. 256,1024") from None


def _radius(text: str) -> float | str:
    if text == "median":
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; give a finite number > 0 or 'median'")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", action="append",
                        help="backends to time, by registered name (repeatable or comma-separated; default: all "
                             "available on the CPU)")
    parser.add_argument("--precision", action="append", choices=["fp32", "bf16"],
                        help="precisions for compiled backends (default: fp32 and, where supported, bf16)")
    parser.add_argument("--samples", type=_sample_list, default=list(STANDARD_SAMPLES),
                        help=f"comma-separated S values (default: {','.join(map(str, STANDARD_SAMPLES))})")
    parser.add_argument("--points", type=_positive_int, default=64, help="B (default: %(default)s)")
    parser.add_argument("--radius", type=_radius, default=4.0,
                        help="r, or 'median' (each point's median distance: the bisection's hardest case) "
                             "(default: %(default)s)")
    parser.add_argument("--model", help="module:callable returning your own model (default: standard workload)")
    parser.add_argument("--repeats", type=_positive_int, default=1, help="runs per row, best kept (default: %(default)s)")
    parser.add_argument("--screen", choices=["on", "off", "both"], default="on",
                        help="Lipschitz screen before the last layer for compiled backends (default: %(default)s)")
    parser.add_argument("--threads", type=_positive_int, help="torch/OpenMP threads (default: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the rows (and the environment) to this JSON file")
    parser.add_argument("--margin", action="store_true",
                        help="end-to-end margin benchmark on the main command's models (attack / Monte Carlo / "
                             "other split, identical margins asserted), then the standard workload at the median "
                             "radius; backends interleaved, --repeats times (default 3 here)")
    parser.add_argument("--margin-config", type=Path,
                        help="YAML with run-config keys applied on top of the main command's defaults for "
                             "--margin (e.g. points, model_params, train, estimator_params)")


REFERENCE = "torch"  # the engine's reference backend: speed-ups are relative to it


def _chosen_backends(requested: list[str] | None) -> list[Backend]:
    """The backends to time, reference first: the requested names (validated against the registry,
    ConfigError naming the allowed ones) or every backend available on the CPU."""
    from robbench.config import ConfigError

    registry = get_registries().backends
    if requested:
        names = [n.strip() for item in requested for n in item.split(",") if n.strip()]
        for n in names:
            if n not in registry:
                raise ConfigError(f"bad value for '--backend': {n!r}; allowed: {', '.join(registry.names())}")
        names = [n for n in names if registry.get(n).unavailable(torch.device("cpu"), warn=True) is None
                 or n == REFERENCE]
    else:
        names = montecarlo.available_backends("cpu")
    names = sorted(dict.fromkeys(names), key=lambda n: n != REFERENCE)
    return [registry.get(n) for n in names]


def _check_json_target(path: Path | None) -> None:
    """ConfigError before any timing when ``--json`` cannot be written (it used to fail after the whole
    benchmark had run)."""
    from robbench.config import ConfigError

    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"--json {path}: that is a directory; give a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"--json {path}: the directory {path.parent} does not exist")


def run(args: argparse.Namespace) -> int:
    console = terminal.console()
    _check_json_target(args.json)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.margin:
        return run_margin(args, console)
    model, name = (load_model(args.model), args.model) if args.model else (StandardDecoderVAE(), "standard-mlp")
    backends = _chosen_backends(args.backend)
    precisions = args.precision or (["fp32", "bf16"] if kernels.bf16_supported() else ["fp32"])
    radius: float | str = args.radius
    peaks = {"fp32": measure_peak(torch.float32)}
    if "bf16" in precisions:
        peaks["bf16"] = measure_peak(torch.bfloat16)
    rows: list[BenchRow] = []
    for S in args.samples:
        base = None
        for backend in backends:
            screen_modes = {"on": [True], "off": [False], "both": [False, True]}[getattr(args, "screen", "on")]
            screens = screen_modes if getattr(backend, "has_screen", False) else [True]
            for precision in [p for p in precisions if p in backend.precisions] or [backend.precisions[0]]:
                for screen in screens:
                    row = run_case(model, name, backend, precision, args.points, S, radius, repeats=args.repeats,
                                   screen=screen)
                    # executed work only: screened samples did no last layer, so the effective rate is not
                    # something the hardware did (it printed 129-154 % of peak)
                    row.peak_fraction = row_peak_fraction(row, peaks)
                    if backend.name == REFERENCE:
                        base = row.seconds
                    row.speedup_vs_torch = base / row.seconds if base else None
                    rows.append(row)
                    console.print(f"  {backend.name}/{precision}{'/screen' if row.screen else ''} S={S}: "
                                  f"{row.seconds:.3f} s", style="dim")
    console.print(render(rows, peaks))
    if args.json:
        env = environment()
        args.json.write_text(json.dumps({"environment": env, "peaks_gflops": peaks,
                                         "rows": [{**asdict(r), "environment": env} for r in rows]}, indent=2))
    return 0


def run_margin(args: argparse.Namespace, console) -> int:
    """``bench --margin``: the end-to-end margin benchmark, then the standard workload at the median radius.
    The GEMM peak is re-measured after every run (best window kept: one window on a shared machine can be
    slow, which would push "% peak" over 100); every row is checked for identical decisions."""
    from robbench.paper import margin_bench

    chosen = _chosen_backends(args.backend)
    backends = [b.name for b in chosen]
    precision = {b.name: b.precisions[0] for b in chosen}  # each backend as a margin run uses it: its default
    repeats = args.repeats if args.repeats > 1 else 3
    threads = torch.get_num_threads()
    cfg = margin_bench.margin_config(args.margin_config)
    peaks = {"fp32": measure_peak(torch.float32)}
    if kernels.bf16_supported():
        peaks["bf16"] = measure_peak(torch.bfloat16)
    console.print(f"margin benchmark: models {', '.join(cfg.models)} on {cfg.dataset}, {cfg.points} points, "
                  f"backends {', '.join(backends)}, {repeats} repetitions, {threads} threads", style="dim")
    samples = {k: [v] for k, v in peaks.items()}

    def remeasure() -> None:  # the peak is the best window over the whole run: a shared machine has slow ones
        for k in samples:
            samples[k].append(measure_peak(torch.float32 if k == "fp32" else torch.bfloat16, seconds=0.3))
            peaks[k] = max(samples[k])

    rows = margin_bench.margin_rows(
        cfg, get_registries(), backends, repeats=repeats, peaks=peaks, between=remeasure,
        progress=lambda r: console.print(f"  {r.model} {r.backend} rep {r.repeat}: {r.whole_s:.2f} s "
                                         f"(attack {r.attack_s:.2f}, MC {r.montecarlo_s:.2f})", style="dim"))
    # standard workload at the median radius, same backends interleaved
    std = StandardDecoderVAE()
    S = int(args.samples[0]) if list(args.samples) != list(STANDARD_SAMPLES) else 1024
    std_rows: list[BenchRow] = []
    for name in backends:  # untimed: a backend's first call pays one-time costs (the bf16 product's JIT code,
        # workspaces), which made its first timed repetition ~1.5x slower than the next
        run_case(std, "standard-mlp", name, precision[name], args.points, 64, "median", repeats=1)
    for rep in range(repeats):
        order = backends[rep % len(backends):] + backends[:rep % len(backends)]
        for name in order:
            row = run_case(std, "standard-mlp", name, precision[name], args.points, S, "median", repeats=1)
            row.peak_fraction = row_peak_fraction(row, peaks)
            std_rows.append(row)
            remeasure()
    if len({r.counts_sha1 for r in std_rows}) > 1:
        raise AssertionError("standard workload at the median radius: backends gave different counts: "
                             + ", ".join(f"{r.backend} {r.counts_sha1[:10]}" for r in std_rows))
    remeasure()
    for r in rows:  # final peaks (best windows); mixed-precision runs: each part at its own peak
        r.peak_gflops = peaks.get("bf16" if r.bf16_gflop else "fp32")
        r.peak_fraction = margin_bench.peak_fraction(r, peaks)
    ref = sorted(r.seconds for r in std_rows if r.backend == REFERENCE)
    for r in std_rows:
        r.peak_fraction = row_peak_fraction(r, peaks)
        r.speedup_vs_torch = ref[len(ref) // 2] / r.seconds if ref else None  # vs the reference's median
    summary = margin_bench.summarize(rows, REFERENCE)
    console.print(margin_bench.render(rows, peaks, threads))
    console.print(margin_bench.render_summary(summary))
    console.print(render(std_rows, peaks))
    if args.json:
        env = environment()
        args.json.write_text(json.dumps({
            "environment": env, "peaks_gflops": peaks, "peak_windows_gflops": samples, "summary": summary,
            "margin_rows": [{**asdict(r), "environment": env} for r in rows],
            "standard_median_rows": [{**asdict(r), "environment": env} for r in std_rows]}, indent=2))
    return 0
