#!/usr/bin/env bash
# Start dockerd when none answers. Every network it makes stays inside 198.18.0.0/15 (the range
# reserved for network tests): the default bridge and the pool that compose networks come from.
# Exits non-zero, saying why, when dockerd is missing or cannot start (e.g. no privileges).
set -uo pipefail
if docker info >/dev/null 2>&1; then
  echo "dockerd: already running"
  exit 0
fi
if ! command -v dockerd >/dev/null; then
  echo "dockerd: not installed (apt-get install docker.io)"
  exit 1
fi
log=${DOCKERD_LOG:-/var/log/llamadist-dockerd.log}
nohup dockerd --bip 198.19.0.1/24 --default-address-pool base=198.19.16.0/20,size=24 \
  >"$log" 2>&1 &
pid=$!
# Poll the daemon (at most 60 s); stop early if dockerd exits.
for _ in $(seq 120); do
  if docker info >/dev/null 2>&1; then
    echo "dockerd: started (pid $pid, log $log)"
    exit 0
  fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.5
done
echo "dockerd: could not start; last lines of $log:"
tail -n 15 "$log"
kill "$pid" 2>/dev/null
exit 1
