"""Entry point: ``torchrun --nproc_per_node 4 -m split_trainer --config configs/mnist.yaml``; the
grpc transport's commands across machines, ``serve`` (the central), ``edge`` and ``edges`` (several
in one process); and the one-process commands ``evaluate``, ``export``, ``audit``, ``config`` and ``certs``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys

from split_trainer.config import ConfigError, load_config
from split_trainer.core import faults
from split_trainer.core.errors import JobError, say, short
from split_trainer.training.failures import Terminated


def parse_args(argv: list[str] | None, mode: str | None = None) -> argparse.Namespace:
    from split_trainer.cli.launchers import add_arguments

    prog = "python -m split_trainer" + (f" {mode}" if mode else "")
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTIONS[mode])
    parser.add_argument("--config", help="YAML config file (defaults apply to keys it omits)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set train.max_steps=60 data.root=DIR")
    parser.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                        help="auto: newest complete checkpoint, else a fresh start (default); never; or a "
                             "checkpoint folder")
    parser.add_argument("--quiet", action="store_true", help="print only errors and the final summary")
    add_arguments(parser, mode)
    return parser.parse_args(argv)


DESCRIPTIONS = {None: "Split-learning trainer.",
                "serve": "The central of a grpc job across machines: it listens, and the edges dial it.",
                "edge": "One edge of a grpc job across machines: it dials the central; it is who its certificate says.",
                "edges": "Several edges of a grpc job in one process, each with its own certificate and stream (tests and "
                         "simulation)."}


def _say(where: str, message: str, level: str = "error") -> None:
    say(f"split_trainer: {where}{level}: {message}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return _command(argv)
    mode = argv[0] if argv and argv[0] in ("serve", "edge", "edges") else None
    args = parse_args(argv[1:] if mode else argv, mode)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a log file or pipe as they happen
    # torch's C++ side logs every torn pipe with a stack of frames when a peer dies; the central's
    # one-line reason says it better. TORCH_CPP_LOG_LEVEL=INFO brings them back.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    where, built = "", []
    try:
        cfg = load_config(args.config, [*args.overrides, *(["topology.transport=grpc"] if mode else [])])
        # torch imports after argument checks
        from split_trainer.cli.launchers import launcher_for
        from split_trainer.training.drivers import driver_for
        from split_trainer.transport.topology import device_for, set_threads

        launcher = launcher_for(cfg, mode, args)  # who this process is, chosen once
        plan = driver_for(cfg).plan(cfg, cfg.train.seed)  # an unknown model or a bad plan fails on every rank, now
        topo = launcher.topology(cfg)
        where = f"[{topo.name}] "
        faults.arm(launcher.names_here(cfg, topo), topo.restart)
        role = "central" if topo.is_central else "edge"
        device_for(getattr(cfg.train, f"{role}_device"), f"train.{role}_device", topo.local_rank)  # one line, now
        if launcher.edges_here:
            device_for(cfg.train.edge_device, "train.edge_device", 0)
        threads = set_threads(cfg.train.threads, topo)
        if topo.is_central:
            _central(cfg, topo, plan, threads, launcher, args, built)
        else:
            from split_trainer.training.hosting import EdgeHost
            from split_trainer.transport.topology import edge_number

            launcher.serve(cfg, topo, lambda number=None: EdgeHost(cfg, [number or edge_number(topo.name)],
                                                                   topo.local_rank))
            if launcher.exit_hard:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
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
        # The signal came while this run's own error was on its way here: that error is the report. Not
        # any exception: a signal inside a library's own handled one (pathlib's mkdir catches EEXIST)
        # would report "File exists" and exit 1 for a plain SIGTERM.
        if isinstance(exc, Terminated) and isinstance(exc.__context__, (JobError, ConfigError)):
            exc = exc.__context__
        _say(where, short(exc))
        _shut_down(built)
        return 143 if isinstance(exc, Terminated) else 1


def _central(cfg, topo, plan, threads: int, launcher, args: argparse.Namespace, built: list) -> None:
    """Train, and where the launcher allows it (serve), resume in this process after an attempt
    fails: the transport stays up and the edges that are left, or that dial again, go on."""
    from split_trainer.cli.console import Console
    from split_trainer.training.central import run_central

    def transport_for():
        if not built:
            built.append(launcher.transport(cfg, topo))
        return built[0]

    for attempt in range(launcher.restarts + 1):
        try:
            run_central(cfg, dataclasses.replace(topo, restart=topo.restart + attempt), plan, threads, transport_for,
                        Console(quiet=args.quiet), args.resume)
            return
        except JobError as exc:
            if attempt == launcher.restarts:
                raise
            _say("[central] ", f"{short(exc)}; attempt {attempt + 2} of {launcher.restarts + 1} resumes from the "
                               f"newest checkpoint once the edges are back (within rpc.startup_timeout_s)", "warning")
            faults.arm(launcher.names_here(cfg, topo), topo.restart + attempt + 1)


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
