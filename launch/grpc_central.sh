#!/usr/bin/env bash
# The central of a grpc job (docs/hosts-and-security.md): it listens on ADDR:PORT and every edge
# dials it over mutual TLS; no edge host needs an open port.
#
#   launch/grpc_central.sh --listen ADDR:PORT --certs DIR [--restarts K] [--config FILE] [split_trainer args...]
#
# --certs: the central's folder from `python -m split_trainer certs` (certs/job/central).
# The central resumes by itself after losing an edge (serve --max-restarts, default 3). This script
# starts its process again only when it was killed (exit above 128: SIGKILL, the OOM killer, a
# crash; not Ctrl-C or SIGTERM, and not an error it reported), up to --restarts times (default 3):
# the edges redial it within rpc.startup_timeout_s and it resumes from the newest checkpoint.
exec "$(dirname "$0")/supervise.sh" launch/grpc_central.sh python -m split_trainer serve "$@"
