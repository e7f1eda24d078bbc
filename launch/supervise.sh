#!/usr/bin/env bash
# supervise.sh LABEL COMMAND... [--restarts K] ...: run COMMAND (without --restarts K, default 3),
# and again when it was killed (exit above 128 other than 130, Ctrl-C, and 143, SIGTERM), at most
# K more times. Its exit status is the last run's. An error the command reports (exit 1, or 2 for
# usage and config) is its own decision: not retried here.
set -uo pipefail
label="$1"; shift
restarts=3 cmd=()
while [ $# -gt 0 ]; do
  case "$1" in
    --restarts) restarts="${2:-}"; shift 2 || shift ;;
    *) cmd+=("$1"); shift ;;
  esac
done
[[ "$restarts" =~ ^[0-9]+$ ]] || { echo "$label: error: --restarts ${restarts}: give 0 or more" >&2; exit 2; }
for ((attempt = 0; ; attempt++)); do
  "${cmd[@]}"
  code=$?
  if [ "$code" -le 128 ] || [ "$code" -eq 130 ] || [ "$code" -eq 143 ] || [ "$attempt" -ge "$restarts" ]; then
    exit "$code"
  fi
  echo "$label: the process was killed (exit $code): starting it again ($((attempt + 1)) of $restarts)" >&2
done
