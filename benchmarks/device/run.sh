#!/usr/bin/env bash
# One prepared GPU run, started by one command on the device machine (docs/benchmarks.md, "Performance"):
#
#   benchmarks/device/run.sh             # installs .whl/*.whl into /tmp/site, then python -m benchmarks device
#   benchmarks/device/run.sh --smoke     # the same code on the CPU, tiny model, seconds (make test runs it)
#
# Other arguments go to `python -m benchmarks device` (--out DIR, --budget-s S, --served auto|off|only).
# Results go to $OUT (the device tool's output folder) when it is set, else benchmarks/results. The
# whole run stays within DEVICE_BUDGET_S (default 450 s, under the issue's 8 minutes): the Python side
# plans its items to fit, and `timeout` stops it (SIGTERM, SIGKILL 15 s later) if it overruns anyway;
# what it measured is on disk by then. PYTHON: the interpreter (default python3, the image's).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
budget=${DEVICE_BUDGET_S:-450}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [[ -n ${OUT:-} ]]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/device-run.log") 2>&1  # the whole log comes back, whatever the reply's tail holds
fi

smoke=0
for arg in "$@"; do [[ $arg == --smoke ]] && smoke=1; done
if ((smoke)); then
  echo "install: skipped (--smoke runs in the environment it is started from)"
elif compgen -G ".whl/*.whl" >/dev/null; then
  echo "install: $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "install: no wheels in .whl/ (make device-wheels fetches them); using the environment as it is"
fi
"$PYTHON" -c "import diffusers, pydantic_settings" || {
  echo "diffusers or pydantic-settings missing: run make device-wheels and carry .whl" >&2
  exit 3
}

left=$((budget - SECONDS))
echo "python -m benchmarks device: ${left} s of the ${budget} s budget left"
status=0
timeout -k 15 $((left + 20)) "$PYTHON" -m benchmarks device --budget-s "$left" "$@" || status=$?
exit "$status"
