#!/usr/bin/env bash
# One edge of a grpc job (docs/hosts-and-security.md): it dials the central over mutual TLS and
# listens on nothing. It is who its certificate says.
#
#   launch/grpc_edge.sh --central HOST:PORT --certs DIR [--restarts K] [--config FILE] [--set data.root=DIR ...]
#
# --certs: this edge's folder from `python -m split_trainer certs` (certs/job/edge1). Give it the
# central's config and this host's own data.root: the edge refuses a central whose config differs
# from its own on what leaves the edge (docs/privacy.md, an edge's own policy). An edge whose central goes away dials it again
# for up to rpc.startup_timeout_s by itself. This script starts the edge's process again only when
# it was killed (exit above 128: SIGKILL, the OOM killer, a crash; not Ctrl-C or SIGTERM), up to
# --restarts times (default 3): it redials, and the central resumes the job from its newest checkpoint.
exec "$(dirname "$0")/supervise.sh" launch/grpc_edge.sh python -m split_trainer edge "$@"
