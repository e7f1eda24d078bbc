"""Entry point: ``torchrun --nproc_per_node 4 -m split_trainer --config configs/mnist.yaml``, and
the one-process commands ``evaluate``, ``export``, ``audit``, ``config`` and ``certs``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from split_trainer.config import ConfigError, load_config
from split_trainer.core import faults
from split_trainer.core.errors import short
from split_trainer.training.failures import Terminated


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m split_trainer", description="Split-learning trainer.")
    parser.add_argument("--config", help="YAML config file (defaults apply to keys it omits)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set train.max_steps=60 data.root=DIR")
    parser.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                        help="auto: newest complete checkpoint, else a fresh start (default); never; or a "
                             "checkpoint folder")
    parser.add_argument("--quiet", action="store_true", help="print only errors and the final summary")
    return parser.parse_args(argv)


def _say(where: str, message: str) -> None:
    print(f"split_trainer: {where}error: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return _command(argv)
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a log file or pipe as they happen
    # torch's C++ side logs every torn pipe with a stack of frames when a peer dies; the central's
    # one-line reason says it better. TORCH_CPP_LOG_LEVEL=INFO brings them back.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    where, built = "", []
    try:
        cfg = load_config(args.config, args.overrides)
        # torch imports after argument checks
        from split_trainer.training.drivers import driver_for
        from split_trainer.transport.topology import device_for, loopback_topology, set_threads, topology_from_env

        plan = driver_for(cfg).plan(cfg, cfg.train.seed)  # an unknown model or a bad plan fails on every rank, now
        loopback = cfg.topology.transport == "loopback"
        # grpc without torchrun: the central alone, which the edges dial (with torchrun: rank 0)
        alone = loopback or (cfg.topology.transport == "grpc" and "WORLD_SIZE" not in os.environ)
        topo = loopback_topology() if alone else topology_from_env(cfg)
        where = f"[{topo.name}] "
        faults.arm(topo.name, topo.restart)
        role = "central" if topo.is_central else "edge"
        device_for(getattr(cfg.train, f"{role}_device"), f"train.{role}_device", topo.local_rank)  # one line, now
        if loopback:  # the edges are in this process too
            device_for(cfg.train.edge_device, "train.edge_device", 0)
        threads = set_threads(cfg.train.threads, topo)
        if topo.is_central:
            from split_trainer.cli.console import Console
            from split_trainer.training.central import run_central

            def transport_for():
                built.append(_transport(cfg, topo))
                return built[-1]

            run_central(cfg, topo, plan, threads, transport_for, Console(quiet=args.quiet), args.resume)
        else:
            from split_trainer.training.hosting import EdgeHost
            from split_trainer.transport.topology import edge_number

            def host():
                return EdgeHost(cfg, [edge_number(topo.name)], topo.local_rank)
            if cfg.topology.transport == "grpc":
                from split_trainer.transport.grpc_edge import serve_edge_rank
                serve_edge_rank(topo.name, cfg, host)
                # Done: gRPC's threads can abort a finished edge in the interpreter's teardown
                # ("terminate called without an active exception", 1 run in 3 under load).
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
            else:
                from split_trainer.transport.rpc import serve_edge
                serve_edge(topo, cfg, host)
        return 0
    except ConfigError as exc:
        _say(where, str(exc))
        return 2
    except KeyboardInterrupt:  # Ctrl-C reaches every rank of the process group: one line is enough
        if where in ("", "[central] "):
            _say(where, "interrupted (SIGINT): run the same command to resume from the newest checkpoint")
        _shut_down(built)
        return 130
    except (Exception, Terminated) as exc:  # one line for the person; the cause chain is not for them
        if isinstance(exc, Terminated) and isinstance(exc.__context__, Exception):
            exc = exc.__context__  # the signal came while this error was on its way here
        _say(where, short(exc))
        _shut_down(built)
        return 143 if isinstance(exc, Terminated) else 1


def _transport(cfg, topo):
    if cfg.topology.transport == "loopback":
        from split_trainer.training.hosting import loopback_transport
        return loopback_transport(cfg)
    if cfg.topology.transport == "grpc":  # on one machine: certificates and address in the run folder
        from split_trainer.transport.grpc_central import GrpcTransport
        return GrpcTransport(cfg)
    from split_trainer.transport.rpc import RpcTransport
    return RpcTransport(topo, cfg)


def _shut_down(built: list) -> None:
    """Non-gracefully: a dead or hung peer would block a graceful shutdown. An edge rank built no
    transport object of its own, but it may be in an RPC group."""
    try:
        if built:
            built[0].shutdown(graceful=False)
        elif "torch.distributed.rpc" in sys.modules:
            sys.modules["torch.distributed.rpc"].shutdown(graceful=False)
    except Exception:
        pass


COMMANDS = {"evaluate": "cli.standalone", "export": "cli.standalone", "config": "cli.reference", "audit": "cli.audit",
            "certs": "cli.certs"}


def _command(argv: list[str]) -> int:
    """A one-process command: no torchrun, no RPC."""
    try:
        module = importlib.import_module(f".{COMMANDS[argv[0]]}", __package__)
        return module.main(argv)
    except ConfigError as exc:
        _say("", str(exc))
        return 2


if __name__ == "__main__":
    try:
        code = main()
    except Terminated:  # the signal came while an earlier error was being reported: that report stands
        code = 143
    sys.stdout.flush()
    sys.stderr.flush()
    # RPC and loader threads can keep a failed process alive; the outcome is already decided.
    os._exit(code) if code else sys.exit(0)
