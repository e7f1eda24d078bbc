#!/usr/bin/env bash
# supervise.sh K LABEL COMMAND...: run COMMAND, and again when it was killed (exit above 128 other than
# 130, Ctrl-C, and 143, SIGTERM), at most K more times. Its exit status is the last run's. An error
# the command reports (exit 1, or 2 for usage and config) is its own decision: not retried here.
set -uo pipefail
restarts="$1" label="$2"; shift 2
for ((attempt = 0; ; attempt++)); do
  "$@"
  code=$?
  if [ "$code" -le 128 ] || [ "$code" -eq 130 ] || [ "$code" -eq 143 ] || [ "$attempt" -ge "$restarts" ]; then
    exit "$code"
  fi
  echo "$label: the process was killed (exit $code): starting it again ($((attempt + 1)) of $restarts)" >&2
done
