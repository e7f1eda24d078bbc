"""``python -m split_trainer audit``: what an honest-but-curious central could learn of the edges'
data, measured on the model at a checkpoint (privacy.audit says how). One process, no cluster.

    python -m split_trainer audit --checkpoint runs/mnist/checkpoints [--set data.root=DIR]

Writes audit.json and audit.png (originals above their reconstructions) and prints a table. The
run's placement driver says which segments are attacked (every edge cut of the model; each party's
first segment on its own part of the images).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from split_trainer.cli.watch import Watch
from split_trainer.config import Config, ConfigError, config_from_dict
from split_trainer.core.files import write_json
from split_trainer.model.losses import loss_fn
from split_trainer.privacy import attacks
from split_trainer.privacy.audit import AuditTarget, attack, audit_data, label_attacks, picture, score_inputs
from split_trainer.privacy.defences import epsilon
from split_trainer.records import checkpoint
from split_trainer.records.parts import load_parts
from split_trainer.training import malicious
from split_trainer.training.drivers import driver_for


def _count(text: str) -> int:
    """A number of images, epochs or steps: an attack on none of them would report NaN."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def _steps(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number (0: none), got {text!r}")
    return int(text)


HIJACK_STEPS = 600
QUICK = {"public": 1000, "private": 500, "reidentify": 100, "decoder_epochs": 5, "decoders": ("small",),
         "inversions": 4, "inversion_steps": 100, "unsplit": 16, "unsplit_rounds": 10, "hijack_steps": 300}
"""--quick: every attack, on fewer images for fewer epochs: a first answer, weaker than the default's."""


def _decoders(text: str) -> tuple[str, ...]:
    """A comma-separated choice of decoder capacities, in the order they are trained."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in attacks.DECODERS]
    if unknown or not names:
        what = f"{', '.join(unknown)}: not a decoder" if unknown else f"{text!r} names no decoder"
        raise argparse.ArgumentTypeError(f"{what}; choose among {','.join(attacks.DECODERS)}")
    return tuple(name for name in attacks.DECODERS if name in names)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m split_trainer audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder or checkpoint directory")
    parser.add_argument("--edge-parts", type=Path, metavar="DIR", help="as for export, with edge-held weights")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="folder for audit.json and audit.png (default: beside the checkpoints)")
    parser.add_argument("--public", type=_count, default=5000, help="public images (test split) the decoders train on")
    parser.add_argument("--private", type=_count, default=2000, help="private training images attacked by the decoders")
    parser.add_argument("--reidentify", type=_count, default=200, help="of those, how many are re-identified")
    parser.add_argument("--candidates", type=_count, default=100, help="same-class private images to pick each from")
    parser.add_argument("--decoder-epochs", type=_count, default=30, help="each decoder's passes over the public set")
    parser.add_argument("--decoders", type=_decoders, default=attacks.DECODERS, metavar="NAMES",
                        help=f"decoder capacities, comma-separated, each reported and their worst case too "
                             f"(default {','.join(attacks.DECODERS)})")
    parser.add_argument("--inversions", type=_count, default=8, help="images attacked by optimisation, with weights")
    parser.add_argument("--inversion-steps", type=_count, default=300)
    parser.add_argument("--unsplit", type=_count, default=64, help="images attacked by UnSplit (no weights)")
    parser.add_argument("--unsplit-rounds", type=_count, default=40)
    parser.add_argument("--hijack-steps", type=_steps, default=HIJACK_STEPS,
                        help=f"steps of the malicious central's hijacking attack against edge1, with edge-held data "
                             f"(default {HIJACK_STEPS}; 0: not run)")
    parser.add_argument("--quick", action="store_true",
                        help="a first answer in a few minutes: " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                                             for k, v in QUICK.items()))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv[1:])
    if args.quick:  # what the command line names itself stays as given
        given = {a.split("=")[0] for a in argv[1:] if a.startswith("--")}
        for key, value in QUICK.items():
            if f"--{key.replace('_', '-')}" not in given:
                setattr(args, key, value)
    if args.reidentify > args.private:
        parser.error(f"--reidentify {args.reidentify} is more than the --private {args.private} images attacked")
    return args


def _hijacking(cfg: Config, parts: dict[str, Any], targets: list[AuditTarget], data: dict[str, Any],
               args: argparse.Namespace, into: tuple[dict, list], tick: attacks.Tick) -> dict[str, Any]:
    """The malicious central's attack (training.malicious), where it means something: its row joins
    the first cut's (``into``: the rows by cut, the picture's rows)."""
    if not args.hijack_steps:
        return {"measured": False, "why": "--hijack-steps 0"}
    if cfg.data.placement != "edge":
        why = ("the central holds the inputs (data.placement=central): it needs no attack" if
               cfg.data.placement == "central" else "not built for vertical parties")
        return {"measured": False, "why": why}
    every = torch.arange(len(data["pool"]))

    def score(images: torch.Tensor) -> dict[str, Any]:
        return score_inputs({NAME: (every, images)}, data, args)[NAME]

    images, info = malicious.hijack(cfg, parts, targets[0], data, args.hijack_steps, args.seed, score,
                                    lambda done: tick("hijacking", done, args.hijack_steps))
    row = {**score(images), **info}
    cuts, pictures = into
    where = targets[0].cuts[0][1]
    cuts[where][NAME] = row
    pictures.append((f"{NAME}, {where}", (every, images)))
    return {"measured": True, "cut": where, **info}


NAME = "hijacking (malicious central, no weights)"


def _table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    holder = "the central holds" if report["edge_weights"] == "central" else "the edges hold"
    table = Table(title=f"what the central can learn ({holder} the edge weights); re-id: reconstructions "
                        f"picked out among same-class images")
    for column in ("cut", "attack", "SSIM", "class mean", "PSNR", "re-id", "chance"):
        table.add_column(column, justify="left" if column in ("cut", "attack") else "right")
    for cut, rows in report["cuts"].items():
        for name, r in rows.items():
            shown = f"{name}, worst: {r['worst_of']}" if "worst_of" in r else name
            # escaped: rich would take the brackets of decoder[small] for a style and drop them
            table.add_row(cut, escape(shown), f"{r['ssim']:.3f}", f"{r['class_mean_ssim']:.3f}", f"{r['psnr_db']:.1f}",
                          f"{r['reidentified']:.1%}", f"{r['chance']:.1%}")
    console = Console(highlight=False)
    console.print(table)
    for name, r in report.get("labels", {}).items():
        if isinstance(r, dict):
            console.print(f"labels {name}: {r['accuracy']:.1%} (chance {report['labels']['chance']:.1%})")


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if not args.checkpoint.is_dir():
        raise ConfigError(f"--checkpoint {args.checkpoint}: not a checkpoint folder or directory (the audit needs "
                          f"the run's config, which a checkpoint holds)")
    # an import path as model.name runs only if args.overrides name it (load_parts refuses it otherwise)
    config, _, parts = load_parts(args.checkpoint, args.edge_parts, args.overrides)
    cfg = config_from_dict(config, args.overrides)
    targets = driver_for(cfg).audit_targets(cfg, parts)
    torch.manual_seed(args.seed)
    data = audit_data(cfg, args)
    with Watch() as watch:
        cuts, pictures, budget = attack(targets, cfg, data, args, watch.tick)
        report: dict[str, Any] = {"checkpoint": str(args.checkpoint), "edge_weights": cfg.privacy.edge_weights,
                                  "privacy": dataclasses.asdict(cfg.privacy),
                                  "epsilon": epsilon(cfg.privacy, cfg.train.epochs), "decoder_budget": budget,
                                  "cuts": cuts,
                                  "hijacking": _hijacking(cfg, parts, targets, data, args, (cuts, pictures), watch.tick)}
    plan = targets[0].plan
    if plan.places[-1] == "edge":
        report["labels"] = label_attacks(plan, cfg.privacy, data, args.seed, loss_fn(cfg.train.loss))
    folder = args.checkpoint.parent if (args.checkpoint / checkpoint.MANIFEST).is_file() else args.checkpoint
    out = args.out or folder.parent / "audit"  # beside the run's checkpoints folder
    write_json(out / "audit.json", report)
    picture(out / "audit.png", data, pictures)
    _table(report)
    print(f"wrote {out / 'audit.json'} and {out / 'audit.png'}")
    return 0
