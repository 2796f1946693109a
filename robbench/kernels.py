"""Build, load and call the compiled Monte Carlo ops (``torch.ops.robbench.*``, sources in ``csrc/``).

The extension is built with ninja on first use (``torch.utils.cpp_extension.load``) and cached under
``$ROBBENCH_CACHE/ext`` (default ``~/.cache/robbench/ext``). Importing this module never builds or
fails; when no compiler is available robbench says so once and the engine falls back to ``torch``.
Builds are serialised by :func:`build_lock`, which also clears the lock file a killed build leaves (torch
would wait for it forever) and bounds the wait for a build running in another process.

The backends ``cpp`` and ``cuda`` (:class:`CppBackend`, :class:`CudaBackend`) wrap these ops; they know
the decoder plan (:mod:`robbench.decoding`), not the CLI or the config.

Ops (schemas in ``csrc/cpu/montecarlo_cpu.cpp``):
- ``robbench::mlp_count(z-free inputs..., precision, screen, chunk_rows) -> (counts, stats)``: the fused
  MLP path (Lipschitz screen, bf16 last layer with a rigorous band, fp32 recheck; see
  ``csrc/common/bounds.h``; fp32 last layer with an opt-in per-sample early exit,
  ``csrc/common/early_exit.h``, ``ROBBENCH_EARLY_EXIT=1``);
- ``robbench::mlp_count_ids(mu, sigma, center, r2, stream_ids, c, ...) -> (counts, stats)``: ``mlp_count`` with
  the stream keys made inside from the ids (c = ``rng.seed_key(seed)``) and the calling thread's subnormal check
  (stats = [-1] and nothing computed while it flushes subnormals): what :func:`count_within` calls on the CPU;
- ``robbench::mlp_sq_distances(...) -> Tensor``: fp32 squared distances of the same samples;
- ``robbench::count_le(Tensor y, Tensor center, Tensor r2, int rows_per_point) -> Tensor``: the fused
  distance-threshold-count epilogue for any decoder (generic path);
- ``robbench::normals(...)``: the counter-based RNG (bit-exact with :mod:`robbench.rng`);
- ``robbench::last_layer_cache_stats() -> int[]``: [entries, hits, misses] of ``mlp_count``'s per-last-layer
  cache (the band's SVD constants, keyed by the weights' contents).
- ``robbench::bf16_rows(Tensor h, Tensor rows, Tensor vt) -> (hq, hb, sb, sd, pv)``: the bf16 pass's per-row
  preparation (gather, bf16 rounding, ||ĥ||², ||δh||², δh V; ``csrc/common/bf16_rows.h``), for tests.
- ``robbench::bf16_product(Tensor hb, Tensor wt_bf16) -> Tensor``: ĥ Ŵ^T with fp32 output through oneDNN's
  brgemm ukernel (``csrc/common/bf16_product.h``; raises when brgemm is unusable here or ROBBENCH_BRGEMM=0),
  with ``bf16_product_self_check`` and ``bf16_product_timing``, for tests and ``benchmarks/bf16_product.py``.
- ``robbench::band_tiles_check(h, wt, b, cen, r2, act, tiles) -> (dec, dist, bound)``: the bf16 band's
  decisions, ||ŷ - c|| and E through the product's tiles (``decide_tiles``, ``bounds.h`` part 7) or the row
  path, for tests; ``band_tiles_timing`` times both (``benchmarks/band_tiles.py``).
- ``robbench::hidden_rows(Tensor x, Tensor wt, Tensor b, int act) -> (h, s2, eps)``: the last hidden layer by
  own loops (``csrc/common/fused_hidden.h``, ``bounds.h`` part 8): h' (n, K), ||h'||² (n,) and eps (n,) float64
  >= ||h_ATen - h'||, for tests.

The same build also carries the ``max_damage`` attack's compiled step (``csrc/cpu/attack_cpu.cpp``:
``robbench::mlp_attack_step``, ``robbench::project_ball_box``; schemas there, wrapper
:mod:`robbench_plugins.fused_attack`): every ``csrc/cpu/*.cpp`` is compiled into one extension.
"""
from __future__ import annotations

import functools
import os
import shutil
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from robbench import faults, paths, rng
from robbench.backends import CountResult, TorchBackend
from robbench.decoding import DEFAULT_CHUNK_ROWS, MLPPlan, decoded_blocks, decoder_plan
from robbench.locks import FileLock

BUILD_WAIT_ENV = "ROBBENCH_BUILD_WAIT"
DEFAULT_BUILD_WAIT = 600
CSRC = Path(__file__).resolve().parents[1] / "csrc"
_LOCK = threading.Lock()
_STATE: dict = {"loaded": False, "error": None, "warned": False}


def ext_dir() -> Path:
    """Where the built extension lives: ``paths.cache_dir() / "ext"``."""
    return paths.cache_dir() / "ext"


def compiler_available() -> bool:
    """True when a C++ compiler and ninja exist (what ``cpp_extension.load`` needs)."""
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) is not None and shutil.which("ninja") is not None


def cpu_sources() -> list[Path]:
    return sorted((CSRC / "cpu").glob("*.cpp"))


def cuda_sources() -> list[Path]:
    return sorted((CSRC / "cuda").glob("*.cu"))


def _build() -> None:
    from torch.utils import cpp_extension

    if not compiler_available():
        raise RuntimeError("no C++ compiler/ninja found")
    sources = [str(p) for p in cpu_sources()]
    if not sources:
        raise RuntimeError(f"no C++ sources under {CSRC / 'cpu'}")
    with_cuda = torch.cuda.is_available() and bool(cuda_sources()) and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += [str(p) for p in cuda_sources()]
    build_dir = ext_dir() / ("robbench_ops_cuda" if with_cuda else "robbench_ops")
    build_dir.mkdir(parents=True, exist_ok=True)
    # -ffp-contract=off: no FMA contraction, so the RNG and epilogue round exactly like the torch ops.
    cflags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", f"-I{CSRC}"]
    with build_lock(build_dir):
        faults.reached("ext-build")
        cpp_extension.load(name="robbench_ops", sources=sources, build_directory=str(build_dir),
                           extra_cflags=cflags, extra_cuda_cflags=["-O3", "-std=c++20", "--fmad=false", f"-I{CSRC}"],
                           extra_ldflags=["-fopenmp"], with_cuda=with_cuda, is_python_module=False,
                           verbose=os.environ.get("ROBBENCH_VERBOSE_BUILD") == "1")


def build_wait_seconds() -> float:
    """How long to wait for another process's build: $ROBBENCH_BUILD_WAIT seconds (default 600)."""
    try:
        return max(0.0, float(os.environ.get(BUILD_WAIT_ENV, DEFAULT_BUILD_WAIT)))
    except ValueError:
        return float(DEFAULT_BUILD_WAIT)


@contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """Hold ``<build_dir>.build.lock`` while building. torch's own ``build_dir/lock`` is a plain file that
    a killed build leaves behind, after which torch waits for it forever; every robbench build takes this
    kernel-released lock first, so a torch lock found while holding it is stale and is removed. A build
    still running in another process is waited for at most :func:`build_wait_seconds`, then the caller
    falls back to the torch backend (RuntimeError)."""
    lock = FileLock(build_dir.parent / f"{build_dir.name}.build.lock")
    if not lock.try_acquire():
        wait = build_wait_seconds()
        print(f"robbench: {lock.describe_holder()} is building the compiled kernels in {build_dir}; "
              f"waiting up to {wait:.0f} s (${BUILD_WAIT_ENV})", file=sys.stderr)
        if not lock.acquire(wait):
            raise RuntimeError(f"{lock.describe_holder()} held the build lock {lock.path} for more than "
                               f"{wait:.0f} s")
    try:
        stale = build_dir / "lock"
        if stale.exists():
            print(f"robbench: removing the stale build lock {stale} (left by a build that was killed; "
                  "no process is building)", file=sys.stderr)
            stale.unlink(missing_ok=True)
        yield
    finally:
        lock.release()


def load(*, warn: bool = False) -> bool:
    """Build (first time) and load the extension; True when ``torch.ops.robbench`` is usable."""
    with _LOCK:
        if not _STATE["loaded"] and _STATE["error"] is None:
            try:
                _build()
                _register_fakes()
                _STATE["loaded"] = True
            except Exception as exc:  # noqa: BLE001 - any build failure means "use torch"
                _STATE["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        if _STATE["error"] is not None and warn and not _STATE["warned"]:
            _STATE["warned"] = True
            print(f"robbench: compiled kernels unavailable ({_STATE['error']}); using the torch backend",
                  file=sys.stderr)
        return _STATE["loaded"]


def build_error() -> str | None:
    return _STATE["error"]


def cpp_available(*, warn: bool = False) -> bool:
    return load(warn=warn)


_cuda_warned = False


def _warn_cuda_unvalidated() -> None:
    """The CUDA ops compile in CI but have not yet run on a GPU in this project: say so once."""
    global _cuda_warned
    if not _cuda_warned:
        _cuda_warned = True
        warnings.warn("robbench: the CUDA kernels have not been validated on a GPU yet; run "
                      "tests/test_kernels.py on this machine before trusting backend 'cuda'", stacklevel=3)


def cuda_available() -> bool:
    return torch.cuda.is_available() and load() and hasattr(torch.ops.robbench, "mlp_count") and \
        torch._C._dispatch_has_kernel_for_dispatch_key("robbench::mlp_count", "CUDA")


def _register_fakes() -> None:
    """Shape-only implementations, so the ops work under FakeTensor / torch.compile tracing."""
    ops = torch.ops.robbench
    if getattr(_register_fakes, "done", False):
        return

    @torch.library.register_fake("robbench::normals")
    def _(ka, kb, j, k):
        return ka.new_empty((ka.shape[0], k), dtype=torch.float32)

    @torch.library.register_fake("robbench::mlp_count_ids")
    def _(mu, sigma, center, r2, stream_ids, c, n, offset, weights_t, biases, acts, precision, screen, chunk_rows):
        return mu.new_empty((mu.shape[0],), dtype=torch.int64), mu.new_empty((6,), dtype=torch.int64)

    @torch.library.register_fake("robbench::mlp_sq_distances")
    def _(mu, sigma, center, ka, kb, n, offset, weights_t, biases, acts, chunk_rows):
        return mu.new_empty((mu.shape[0], n))

    @torch.library.register_fake("robbench::mlp_count")
    def _(mu, sigma, center, r2, ka, kb, n, offset, weights_t, biases, acts, precision, screen, chunk_rows):
        return mu.new_empty((mu.shape[0],), dtype=torch.int64), mu.new_empty((6,), dtype=torch.int64)

    @torch.library.register_fake("robbench::count_le")
    def _(y, center, r2):
        return y.new_empty((y.shape[0],), dtype=torch.int64)

    @torch.library.register_fake("robbench::sigmoid_fp32")
    def _(x, portable=False, fast=False):
        return torch.empty_like(x)

    @torch.library.register_fake("robbench::bf16_rows")
    def _(h, rows, vt):
        m, K = rows.shape[0], h.shape[1]
        return (h.new_empty((m, K)), h.new_empty((m, K), dtype=torch.bfloat16), h.new_empty((m,)),
                h.new_empty((m,)), h.new_empty((m, vt.shape[0])))

    @torch.library.register_fake("robbench::bf16_product")
    def _(hb, wt_bf16):
        return hb.new_empty((hb.shape[0], wt_bf16.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("robbench::band_tiles_check")
    def _(h, wt, b, cen, r2, act, tiles):
        n = h.shape[0]
        return (h.new_empty((n, r2.shape[1]), dtype=torch.int8), h.new_empty((n,), dtype=torch.float64),
                h.new_empty((n,), dtype=torch.float64))

    @torch.library.register_fake("robbench::hidden_rows")
    def _(x, wt, b, act):
        n = x.shape[0]
        return x.new_empty((n, wt.shape[1])), x.new_empty((n,)), x.new_empty((n,), dtype=torch.float64)

    assert ops.mlp_count is not None
    _register_fakes.done = True


# ---------------------------------------------------------------------------------------------
# Typed wrappers
# ---------------------------------------------------------------------------------------------
PRECISIONS = {"fp32": 0, "bf16": 1}  # the op's ``precision`` argument


@functools.lru_cache(maxsize=1)
def bf16_supported() -> bool:
    """True when this CPU has native bf16 dot products (AVX512-BF16 or AMX), where bf16 pays off."""
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX") or \
            "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def default_precision() -> str:
    """The cpp last layer's precision: bf16 on CPUs with native bf16 (:func:`bf16_supported`), else fp32;
    ROBBENCH_PRECISION=fp32|bf16 overrides (bf16 only where native). Decisions are identical either way
    (rigorous band, fp32 recheck of the samples it leaves undecided); on the margin workload the bf16
    pass made the Monte Carlo phase 1.3-2x faster than torch, fp32 1.1-1.2x (benchmarks/README.md)."""
    want = os.environ.get("ROBBENCH_PRECISION", "bf16")
    return "bf16" if want == "bf16" and bf16_supported() else "fp32"


def normals(ka: Tensor, kb: Tensor, j: Tensor, k: int) -> Tensor:
    """robbench::normals: (N,) keys and sample indices -> (N, k) float32 (== robbench.rng.normals)."""
    return torch.ops.robbench.normals(ka, kb, j, k)


def fp32_matmul_is_ieee() -> bool:
    """Whether CPU fp32 matrix products run in fp32 (torch's default). The fused op's bounds
    (csrc/common/bounds.h) model the reference's last layer as an fp32 GEMM; after
    ``torch.set_float32_matmul_precision("medium")`` (or ``torch.backends.mkldnn.matmul.fp32_precision =
    "bf16"``) oneDNN may compute the reference's products in bf16, so :func:`count_within` then decodes with the
    reference's own calls and only the distance epilogue runs compiled (the same decisions either way)."""
    return getattr(torch.backends.mkldnn.matmul, "fp32_precision", "none") in ("none", "ieee")


def denormals_are_ieee() -> bool:
    """Whether this thread's fp32 arithmetic keeps subnormal numbers (IEEE; torch's default). After
    ``torch.set_flush_denormal(True)`` the CPU flushes them to zero in the calling thread only (MXCSR is per
    thread), so the reference's own results depend on which thread computed them and the bounds' underflow
    terms (csrc/common/bounds.h) no longer model them: :func:`count_within` and :func:`sample_sq_distances`
    then run the torch reference itself. A 2^-140 * 0.5 on this thread tells (a scalar op: no worker thread)."""
    return float(torch.full((1,), 2.0 ** -140) * 0.5) != 0.0


def count_within(model: nn.Module, mu: Tensor, sigma: Tensor, center: Tensor, r2: Tensor, n_samples: int, *,
                 seed: int, stream_ids: Tensor, sample_offset: int = 0, backend: str = "cpp",
                 chunk_size: int | None = None, precision: str | None = None,
                 screen: bool | str = True) -> CountResult:
    """Compiled count (see montecarlo.count_within; here r2: (B,) float32 squared radii).
    MLP decoders run fully fused; any other decoder is decoded by torch and only the distance /
    threshold / count epilogue runs compiled; so does an MLP decoder while fp32 products are not IEEE fp32
    (:func:`fp32_matmul_is_ieee`). ``precision``: "fp32" or "bf16" last layer (default: see
    :func:`default_precision`); ``screen``: decide samples certainly inside by a Lipschitz bound before
    the last layer (True: on every call; "auto": on while it decides enough, :func:`_screen_now`). Every combination gives the same decisions as the fp32 torch reference; while this
    thread flushes subnormals (:func:`denormals_are_ieee`) the reference itself runs."""
    if backend == "cuda":
        _warn_cuda_unvalidated()
    if not isinstance(screen, bool) and screen != "auto":  # "off" would be truthy: screen on
        raise ValueError(f"screen must be True, False or 'auto', got {screen!r}")
    precision = precision or default_precision()
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {sorted(PRECISIONS)}")
    load(warn=True)
    plan = decoder_plan(model, center.shape[1])
    rows = chunk_size or DEFAULT_CHUNK_ROWS
    B = mu.shape[0]
    fused = isinstance(plan, MLPPlan) and fp32_matmul_is_ieee()
    cpu = mu.device.type == "cpu"
    adaptive = screen == "auto"
    if adaptive:
        screen = _screen_now(plan) if fused else True
    if fused and cpu and stream_ids.dtype == torch.int64:
        # One op call per Monte Carlo call: the stream keys and this thread's subnormal check are made inside
        # it (benchmarks/README.md, session 10). stats [-1]: the thread flushes subnormals, nothing was
        # computed, and the reference runs below.
        counts, stats = torch.ops.robbench.mlp_count_ids(
            mu, sigma, center, r2, stream_ids, _seed_key(seed), n_samples, sample_offset, plan.weights_t,
            plan.biases, plan.acts, PRECISIONS[precision], bool(screen), rows)
        s = stats.tolist()
        if s[0] >= 0:
            result = _fused_result(counts, s, B * n_samples, center.shape[1], precision)
            if adaptive and screen:
                _screen_outcome(plan, result.screened, result.total)
            return result
    if cpu and not denormals_are_ieee():
        return TorchBackend().count_within(model, mu, sigma, center, r2, n_samples, seed=seed,
                                           stream_ids=stream_ids, sample_offset=sample_offset, chunk_rows=rows)
    if fused:
        ka, kb = rng.stream_keys(seed, stream_ids)
        counts, stats = torch.ops.robbench.mlp_count(
            mu, sigma, center, r2, ka, kb, n_samples, sample_offset, plan.weights_t, plan.biases, plan.acts,
            PRECISIONS[precision], bool(screen), rows)
        return _fused_result(counts, stats.tolist(), B * n_samples, center.shape[1], precision)
    counts = torch.zeros(B, dtype=torch.int64, device=mu.device)
    for blk, y in decoded_blocks(plan, mu, sigma, n_samples, seed, stream_ids, sample_offset, rows):
        counts[blk.p0:blk.p1] += torch.ops.robbench.count_le(y, center[blk.p0:blk.p1], r2[blk.p0:blk.p1])
    return CountResult(counts, 0, 0, B * n_samples, "fp32")


def _fused_result(counts: Tensor, s: list[int], total: int, out_dim: int, precision: str) -> CountResult:
    """The CountResult of a fused MLP op (mlp_count, mlp_count_ids); ``s``: its stats as ints, [rechecked,
    bf16 samples, screened, then the early exit's three counts] (csrc/cpu/montecarlo_cpu.cpp)."""
    saved = s[3] - s[4] / out_dim - s[5]  # early exit: last layers not computed, in samples
    return CountResult(counts, s[0], s[1], total, precision, s[2], saved)


SCREEN_MISSES = 2  # calls in a row whose screen decided < 1/8 of their samples, after which it is skipped ...
SCREEN_PROBE = 8  # ... except on every SCREEN_PROBE-th call, which tries it again


def _screen_now(plan: MLPPlan) -> bool:
    """screen="auto": whether this call runs the Lipschitz screen. It costs a last-layer GEMM on the points'
    centres and a norm pass over the first block's rows per call, and on the margin job's calls it decided
    0-1.2 % of the samples (benchmarks/README.md, session 10). After SCREEN_MISSES calls in a row on this
    plan (this decoder's weights) where it decided less than 1/8 of the samples, only every SCREEN_PROBE-th
    call runs it; one that decides more switches it back on for every call. Decisions are the reference's
    either way: the screen only saves last-layer work."""
    if plan.screen_misses < SCREEN_MISSES:
        return True
    plan.screen_skips += 1
    return plan.screen_skips % SCREEN_PROBE == 0


def _screen_outcome(plan: MLPPlan, screened: int, total: int) -> None:
    if 8 * screened < total:
        plan.screen_misses += 1
    else:
        plan.screen_misses, plan.screen_skips = 0, 0


@functools.lru_cache(maxsize=64)
def _seed_key(seed: int) -> int:
    """rng.seed_key, cached: a run uses one seed for all its Monte Carlo calls."""
    return rng.seed_key(seed)


def sample_sq_distances(model: nn.Module, mu: Tensor, sigma: Tensor, center: Tensor, n_samples: int, *,
                        seed: int, stream_ids: Tensor, sample_offset: int = 0, backend: str = "cpp",
                        chunk_size: int | None = None) -> Tensor:
    """(B, n_samples) fp32 squared distances of the same samples (MLP decoders: bit-identical to the
    torch reference; other decoders, and while this thread flushes subnormals: computed by the torch
    reference)."""
    if backend == "cuda":
        _warn_cuda_unvalidated()
    load(warn=True)
    plan = decoder_plan(model, center.shape[1])
    rows = chunk_size or DEFAULT_CHUNK_ROWS
    if not isinstance(plan, MLPPlan) or (mu.device.type == "cpu" and not denormals_are_ieee()):
        return TorchBackend().sq_distances(model, mu, sigma, center, n_samples, seed=seed, stream_ids=stream_ids,
                                           sample_offset=sample_offset, chunk_rows=rows)
    ka, kb = rng.stream_keys(seed, stream_ids)
    return torch.ops.robbench.mlp_sq_distances(mu, sigma, center, ka, kb, n_samples, sample_offset,
                                               plan.weights_t, plan.biases, plan.acts, rows)


# ---------------------------------------------------------------------------------------------
# The backends over these ops
# ---------------------------------------------------------------------------------------------
class CppBackend:
    """``cpp``: the compiled CPU ops (fused RNG, reference hidden layers, Lipschitz screen, bf16
    last layer with fp32 recheck): the same decisions as ``torch``, faster."""

    name = "cpp"
    description = ("compiled CPU op (csrc/cpu): fused RNG and hidden layers, Lipschitz screen, bf16 last layer "
                   "with a rigorous band and fp32 recheck (default where the CPU has native bf16); decisions "
                   "equal the torch reference's")
    auto_priority = 10
    has_screen = True  # optional attribute: the Lipschitz screen can be switched off (bench --screen)

    @property
    def precisions(self) -> tuple[str, ...]:
        """Both last-layer precisions, first the default on this CPU (:func:`default_precision`)."""
        return ("bf16", "fp32") if default_precision() == "bf16" else ("fp32", "bf16")

    def unavailable(self, device: torch.device, *, warn: bool = False) -> str | None:
        if device.type != "cpu":
            return f"runs on the CPU only, not {device}"
        return None if cpp_available(warn=warn) else f"the compiled extension is unavailable ({build_error()})"

    def count_within(self, model, mu, sigma, center, r2, n_samples, *, seed, stream_ids, sample_offset=0,
                     chunk_rows=DEFAULT_CHUNK_ROWS, precision=None, screen="auto") -> CountResult:
        return count_within(model, mu, sigma, center, r2, n_samples, seed=seed, stream_ids=stream_ids,
                            sample_offset=sample_offset, backend=self.name, chunk_size=chunk_rows,
                            precision=precision, screen=screen)

    def sq_distances(self, model, mu, sigma, center, n_samples, *, seed, stream_ids, sample_offset=0,
                     chunk_rows=DEFAULT_CHUNK_ROWS) -> Tensor:
        return sample_sq_distances(model, mu, sigma, center, n_samples, seed=seed, stream_ids=stream_ids,
                                   sample_offset=sample_offset, backend=self.name, chunk_size=chunk_rows)


class CudaBackend(CppBackend):
    """``cuda``: the same ops' CUDA implementations (csrc/cuda). Not yet validated on a GPU, so
    ``auto`` never picks it (``auto_priority = None``); it runs when asked for by name, with a warning."""

    name = "cuda"
    description = "compiled CUDA op (csrc/cuda); only when asked for by name until validated on a GPU"
    precisions = ("fp32",)
    auto_priority = None
    has_screen = False  # the GPU path computes every last layer

    def unavailable(self, device: torch.device, *, warn: bool = False) -> str | None:
        if device.type != "cuda":
            return f"runs on CUDA devices only, not {device}"
        return None if cuda_available() else "no CUDA device or no CUDA build of the extension"
