#!/usr/bin/env bash
# Old against new in one call: the mesh benchmark's (bench/mesh.py) numbers for two commits (or checkouts),
# run alternately (old, new, old, new, ... ROUNDS rounds) so that the machine's noise hits both,
# then a table of medians and new/old ratios: 2-stage batch-1 decode tok/s, mesh overhead per
# token at 2, 3 and 4 stages, aggregate tok/s at 64 sessions.
#
#   bench/compare.sh [OLD [NEW]]    each a commit (default HEAD~1 and HEAD) or a directory
#                                   holding a checkout (e.g. `.` with uncommitted changes)
#   environment: ROUNDS=2 TOKENS=64 REPEATS=3 SESSIONS=64 STAGE_COUNTS=2,3,4 MODEL=DIR
#                PY=.venv/bin/python (the venv both sides run with)
#
# A commit is checked out with `git worktree add --detach /tmp/llamadist-old` (or -new) and gets
# its protobuf code from `make protos` with this venv; the worktrees are removed at the end. Each
# side runs its own services and client code (cwd and PYTHONPATH point at it); the driver is this
# checkout's bench/mesh.py (with mesh_report.py and speculative.py), copied at start and run through its `run`,
# so both sides are measured by the same code (its fallback computes the overhead where an old
# orchestrator does not report it). The overhead is
# shown two ways, each by one formula on both sides: decode wall per token minus the stages'
# compute per token, and the orchestrator's per step (timings.mesh_overhead_ms, or on a commit
# from before that field hop_overhead_ms x stages, its same mean). Results stay in the printed
# folder (bench.json and service logs per run).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
VENV=$(cd "$(dirname "$PY")/.." && pwd)
OLD=${1:-HEAD~1}
NEW=${2:-HEAD}
ROUNDS=${ROUNDS:-2}
TOKENS=${TOKENS:-64}
REPEATS=${REPEATS:-3}
SESSIONS=${SESSIONS:-64}
STAGE_COUNTS=${STAGE_COUNTS:-2,3,4}
MODEL=${MODEL:-}

TMP=$(mktemp -d /tmp/llamadist-compare.XXXXXX)
# one driver for both, fixed for the whole call: the bench package copied, found first on the path
mkdir -p "$TMP/driver/bench"
cp "$ROOT"/bench/{__init__,mesh,mesh_report,speculative}.py "$TMP/driver/bench/"
# `run`, not `main`: main goes through client.cli, which each side brings in its own version;
# -P keeps the side's own bench/ (the cwd) off the path
DRIVER='import argparse, sys
from bench import mesh
parser = argparse.ArgumentParser()
mesh.add_arguments(parser)
sys.exit(mesh.run(parser.parse_args(sys.argv[1:])))'
WORKTREES=()
cleanup() {
  for wt in "${WORKTREES[@]}"; do
    git -C "$ROOT" worktree remove --force "$wt" || echo "compare: could not remove worktree $wt"
  done
  git -C "$ROOT" worktree prune
}
trap cleanup EXIT

# prepare SIDE SPEC: sets DIRS[SIDE] (where the side runs from) and NAMES[SIDE]
prepare() {
  local side=$1 spec=$2 dir sha
  if [ -d "$spec" ]; then
    dir=$(cd "$spec" && pwd)
    [ -f "$dir/client/cli.py" ] || { echo "compare: $spec is no llamadist checkout" >&2; exit 2; }
    NAMES[$side]="$dir ($(git -C "$dir" rev-parse --short HEAD 2>/dev/null || echo '?')"
    NAMES[$side]+="$(git -C "$dir" diff --quiet HEAD 2>/dev/null || echo ' + changes'))"
  else
    sha=$(git -C "$ROOT" rev-parse --verify --quiet "$spec^{commit}") ||
      { echo "compare: $spec is neither a directory nor a commit" >&2; exit 2; }
    dir=/tmp/llamadist-$side
    if git -C "$ROOT" worktree list --porcelain | grep -qx "worktree $dir"; then
      echo "compare: removing the worktree a previous run left at $dir"
      git -C "$ROOT" worktree remove --force "$dir"
    elif [ -e "$dir" ]; then
      echo "compare: $dir exists and is no worktree of $ROOT; move it away" >&2
      exit 2
    fi
    git -C "$ROOT" worktree add --detach "$dir" "$sha" >/dev/null
    WORKTREES+=("$dir")
    NAMES[$side]="$spec = $(git -C "$ROOT" log -1 --format='%h %s' "$sha" | cut -c1-60)"
  fi
  # the worktree has no venv: point make at ours, and -o keeps it from reinstalling that venv
  make -s -C "$dir" protos VENV="$VENV" -o "$VENV/.installed" >/dev/null
  DIRS[$side]=$dir
}

declare -A DIRS NAMES
prepare old "$OLD"
prepare new "$NEW"
echo "old: ${NAMES[old]}"
echo "new: ${NAMES[new]}"
echo "rounds $ROUNDS (old then new), $TOKENS tokens x $REPEATS per stage count ($STAGE_COUNTS)," \
  "$SESSIONS sessions; results in $TMP"

bench_one() {  # SIDE ROUND
  local dir=${DIRS[$1]} out=$TMP/$1-$2 t0=$SECONDS
  if ! (cd "$dir" && PYTHONPATH="$TMP/driver:$dir" "$PY" -P -c "$DRIVER" --no-transformers \
    --contexts '' --stages 2 --stage-counts "$STAGE_COUNTS" --concurrency "$SESSIONS" \
    --tokens "$TOKENS" --repeats "$REPEATS" ${MODEL:+--model "$MODEL"} --out "$out" \
    >"$out.log" 2>&1); then
    echo "compare: the $1 bench failed (round $2); the end of $out.log:" >&2
    tail -n 15 "$out.log" >&2
    exit 1
  fi
  echo "  round $2 $1: $((SECONDS - t0)) s"
}

for round in $(seq 1 "$ROUNDS"); do
  bench_one old "$round"
  bench_one new "$round"
done

"$PY" - "$TMP" "$ROUNDS" "$SESSIONS" "$STAGE_COUNTS" <<'EOF'
import json
import statistics
import sys
from pathlib import Path

tmp, rounds, sessions = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
counts = [c.strip() for c in sys.argv[4].split(",") if c.strip()]
results = {
    side: [json.loads((tmp / f"{side}-{i}" / "bench.json").read_text()) for i in range(1, rounds + 1)]
    for side in ("old", "new")
}


def per_run(key, n=None):
    """Every batch-1 generation's `key` (at n stages; None: the 2-stage main mesh)."""
    def get(r):
        b = r["batch1"] if n is None else r["mesh_overhead"].get(n, {})
        return [x[key] for x in b.get("runs", [])]
    return get


rows = [("2-stage batch-1 decode tok/s", per_run("decode_tokens_per_s"))]
rows += [(f"overhead ms/token, {n} stages, wall - compute", per_run("overhead_ms_per_token_computed", n)) for n in counts]
rows += [(f"overhead ms/step, {n} stages, orchestrator", per_run("overhead_ms_per_step", n)) for n in counts]
rows += [(f"aggregate tok/s, {sessions} sessions", lambda r: [r["aggregate_tokens_per_s"][sessions]])]


def cell(values):
    if not values:
        return "-", None
    m = statistics.median(values)
    return f"{m:.2f} ({min(values):.1f}..{max(values):.1f}, n={len(values)})", m


print(f"\n{'median (min..max, n): every run of every round':46s} {'old':>28s} {'new':>28s} {'new/old':>8s}")
for name, get in rows:
    (old, old_m), (new, new_m) = (cell([v for r in results[s] for v in get(r)]) for s in ("old", "new"))
    ratio = f"{new_m / old_m:8.3f}" if old_m and new_m is not None else "       -"
    print(f"{name:46s} {old:>28s} {new:>28s} {ratio}")
reported = {
    s: all(o["overhead_from_timings"] for r in results[s] for o in r["mesh_overhead"].values())
    for s in results
}
print("timings.mesh_overhead_ms reported: " + ", ".join(
    f"{s} {'yes' if v else 'no (per step: hop_overhead_ms x stages)'}" for s, v in reported.items()
))
EOF
