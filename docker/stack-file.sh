#!/usr/bin/env bash
# Print docker-compose.yml as `docker stack deploy` takes it: the Docker CLI's schema knows
# depends_on only as a list of names, not with health conditions (swarm ignores depends_on
# anyway; the orchestrator itself waits for its stages, --stage-wait-s).
# Usage: docker/stack-file.sh [FILE] | docker stack deploy -c - llamadist
set -euo pipefail
file=${1:-$(dirname "$0")/docker-compose.yml}
awk '
  /^ *depends_on:/ { print; inside = 1; match($0, /^ */); base = RLENGTH; next }
  inside && $0 !~ /^ *$/ {
    match($0, /^ */)
    if (RLENGTH <= base) inside = 0
    else if ($1 == "condition:") next
    else if ($0 ~ /^ *[A-Za-z0-9_.-]+:$/) {
      name = $1; sub(/:$/, "", name); print substr($0, 1, RLENGTH) "- " name; next
    }
  }
  { print }
' "$file"
