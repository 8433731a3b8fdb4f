#!/usr/bin/env bash
# Build the image's wheels on the host: the project's own wheel into docker/dist (with the generated
# protobuf code, so run `make protos` first) and a wheel of every dependency into docker/wheelhouse,
# at the versions installed in the venv, torch as the CPU build. Apart, so that a change of the
# code rebuilds only the image's last layer. Usage: docker/wheelhouse.sh [PYTHON] [TORCH_SPEC]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
torch_spec=${2:-torch==2.13.0}
out=docker/wheelhouse
dist=docker/dist
mkdir -p "$out" "$dist"
ls protos/llamadist_pb2.py protos/llamadist_pb2_grpc.py >/dev/null  # generated code present?

# The project wheel, built from a clean copy (no stale build/ leftovers in it).
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
cp -r pyproject.toml README.md protos stage_service orchestrator client "$src"/
find "$src" -name __pycache__ -prune -exec rm -rf {} +
# The quantized CPU kernels, compiled here: the image has no C compiler.
"$py" -m stage_service.cpu_kernels "$src/stage_service/kernels"
rm -f "$dist"/llamadist-*.whl "$out"/llamadist-*.whl
"$py" -m pip wheel -q --no-deps -w "$dist" "$src"
wheel=$(ls "$dist"/llamadist-*.whl)
"$py" - "$wheel" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
missing = {"protos/llamadist_pb2.py", "protos/llamadist_pb2_grpc.py"} - names
if not any(n.startswith("stage_service/kernels/qlinear-") and n.endswith(".so") for n in names):
    missing.add("stage_service/kernels/qlinear-*.so")
sys.exit(f"{sys.argv[1]} lacks {sorted(missing)}" if missing else 0)
PY

# Every dependency, pinned to what the venv runs (the same code the host's tests run).
"$py" -m pip freeze --exclude-editable | grep -v '^llamadist' >"$src/constraints.txt"
"$py" -m pip wheel -q -w "$src/all" --find-links "$out" -c "$src/constraints.txt" \
  "$wheel" "$torch_spec"
# Keep the wheelhouse's files untouched when nothing changed (the image layer cache sees them).
rm -f "$src"/all/llamadist-*.whl
for w in "$src"/all/*.whl; do
  cmp -s "$w" "$out/$(basename "$w")" || cp "$w" "$out"/
done
for w in "$out"/*.whl; do
  [ -e "$src/all/$(basename "$w")" ] || rm -f "$w"
done
echo "wheelhouse $out: $(ls "$out" | wc -l) wheels, $(du -sh "$out" | cut -f1); $wheel"
