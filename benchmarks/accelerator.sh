#!/usr/bin/env bash
# The device call's command (benchmarks/README.md, "On an accelerator"): install the carried
# wheels offline, put the repository on the path, run benchmarks/accelerator.py with $OUT.
# Extra arguments go to accelerator.py (e.g. --sections volume train).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
site=/tmp/gram_jax_site
if ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" benchmarks/wheels/*.whl || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "accelerator.sh: no benchmarks/wheels/*.whl (run benchmarks/fetch_wheels.sh and carry" \
    "benchmarks/wheels); grain / tensorflow-datasets / ml-collections must be installed" >&2
fi
# The package itself, without its dependencies; no build isolation, as there is no network to
# fetch the build backend. The repository root on PYTHONPATH covers a failed editable install.
"$py" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || echo "accelerator.sh: editable install failed; using PYTHONPATH" >&2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import grain, tensorflow_datasets, ml_collections, gram_jax" \
  || echo "accelerator.sh: an import failed (above); the sections that need it will say so" >&2
export PYTHONUNBUFFERED=1
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  "$py" benchmarks/accelerator.py --out "$OUT" "$@" 2> >(tee "$OUT/accelerator.log" >&2)
else
  "$py" benchmarks/accelerator.py "$@"
fi
