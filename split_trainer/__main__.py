"""Entry point: ``torchrun --nproc_per_node 4 -m split_trainer --config configs/mnist.yaml``, and
the one-process commands ``evaluate``, ``export`` and ``config``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import faults
from .config import ConfigError, load_config
from .failures import Terminated, short


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
    where = ""
    try:
        cfg = load_config(args.config, args.overrides)
        from .topology import device_for, set_threads, topology_from_env  # torch imports after argument checks

        from .plan import plan_for

        plan = plan_for(cfg, cfg.train.seed)  # an unknown model or a bad plan fails on every rank, now
        topo = topology_from_env(cfg)
        where = f"[{topo.name}] "
        faults.arm(topo.name, topo.restart)
        role = "central" if topo.is_central else "edge"
        device_for(getattr(cfg.train, f"{role}_device"), f"train.{role}_device", topo.local_rank)  # one line, now
        threads = set_threads(cfg.train.threads, topo)
        if topo.is_central:
            from .central import run_central
            run_central(cfg, topo, plan, threads, args.resume, args.quiet)
        else:
            from .edge import serve
            serve(topo, cfg)
        return 0
    except ConfigError as exc:
        _say(where, str(exc))
        return 2
    except KeyboardInterrupt:  # Ctrl-C reaches every rank of the process group: one line is enough
        if where in ("", "[central] "):
            _say(where, "interrupted (SIGINT): run the same command to resume from the newest checkpoint")
        return 130
    except (Exception, Terminated) as exc:  # one line for the person; the cause chain is not for them
        if isinstance(exc, Terminated) and isinstance(exc.__context__, Exception):
            exc = exc.__context__  # the signal came while this error was on its way here
        _say(where, short(exc))
        from torch.distributed import rpc
        try:
            rpc.shutdown(graceful=False)  # a dead or hung peer would block a graceful one
        except Exception:
            pass
        return 143 if isinstance(exc, Terminated) else 1


COMMANDS = {"evaluate": "standalone", "export": "standalone", "config": "reference", "audit": "audit"}


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
