#!/usr/bin/env bash
# Print docker-compose.yml as `docker stack deploy` takes it: the Docker CLI's schema knows
# depends_on only as a list of names, not with health conditions (swarm ignores depends_on
# anyway; the orchestrator itself waits for its stages, --stage-wait-s).
# The stage key: a volume on one host is no use to tasks on others, so the lines marked
# "# compose only" (the stage-key service and volume) go, and the "#swarm " lines come in: a
# swarm secret made from the key file $LLAMADIST_STAGE_KEY_FILE (default
# ~/.config/llamadist/stage-key), which this script makes (owner-only) when there is none.
# Usage: docker/stack-file.sh [FILE] | docker stack deploy -c - llamadist
set -euo pipefail
file=${1:-$(dirname "$0")/docker-compose.yml}
key=${LLAMADIST_STAGE_KEY_FILE:-${XDG_CONFIG_HOME:-$HOME/.config}/llamadist/stage-key}
if [ ! -s "$key" ]; then
  mkdir -p "$(dirname "$key")"
  (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$key" && echo >>"$key")
  echo "stack-file.sh: made the stage key $key (keep it; every deploy reads it)" >&2
fi
key=$(cd "$(dirname "$key")" && pwd)/$(basename "$key")
grep -v '# compose only$' "$file" \
  | sed -e 's/^\( *\)#swarm /\1/' -e "s|@STAGE_KEY_FILE@|$key|" \
  | awk '
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
'
