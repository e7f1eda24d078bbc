"""What an honest-but-curious central could learn of the edges' data, measured on the model at a
checkpoint, with exactly what the central receives under that run's config (its defences
included): the attacks of split_trainer.privacy.attacks, run at every cut whose activation reaches
the central, scored, and pictured. The command is ``python -m split_trainer audit`` (cli.audit);
which segments it attacks is the run's placement driver's business (``AuditTarget``).

At every such cut it attacks the inputs: decoders and an optimisation that know the edge weights
(what the central has when it holds them, and an upper bound when the edges keep them), and
UnSplit, which knows only the architecture. Private images come from the training split, public
ones (the decoders' training set) from the test split. In a U-shaped plan it also attacks the
labels.

The decoder attack trains one decoder per capacity (``--decoders``, default ``small,residual``),
each from scratch on the same public images for the same budget (``decoder_budget`` in
audit.json). Each has its row, ``decoder[small]``, ``decoder[residual]``; the row ``decoder`` is
the worst case among them at that cut (the highest re-identification, then SSIM; ``worst_of``
names it), and is the one the picture shows: an edge trained against a decoder of its own
(privacy.adversary) is judged by the decoder that beats it, not by the one it learned to fool.
Nothing trained on an edge but its segment's weights is used (records.parts.merged_state takes
each part's ``module`` only).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from split_trainer.config import Config, PrivacyConfig
from split_trainer.core.files import atomic_write
from split_trainer.core.hops import Hop, HopKind
from split_trainer.data.datasets import Source, load
from split_trainer.model.losses import Loss
from split_trainer.model.plan import Plan
from split_trainer.privacy import attacks
from split_trainer.privacy.defences import Defences

Tensor = torch.Tensor


@dataclasses.dataclass
class AuditTarget:
    """Segments to attack: ``plan`` with the checkpoint's weights, its ``cuts`` (cut index, the
    report's name for it), and for a part of the inputs (a party's region of the images) how the images
    are cropped to it (``crop``) and its reconstructions put back in place (``placed``)."""
    plan: Plan
    cuts: list[tuple[int, str]]
    crop: Optional[Callable[[Tensor], Tensor]] = None
    placed: Optional[Callable[[Tensor], Tensor]] = None


def edge_cuts(plan: Plan) -> list[tuple[int, str]]:
    """Every cut whose activation goes from an edge to the central (one the central made itself
    teaches it nothing)."""
    return [(cut, f"after {name}") for cut, name in enumerate(plan.cuts) if plan.places[cut] == "edge"]


class Views:
    """What the central receives at a cut for images (normalised): ``received`` exactly, the
    activation defence's noise included; ``model`` the same without the noise (what an attacker can
    differentiate). What leaves an edge is the edge's own rule (privacy.defences.Defences.outgoing)."""

    def __init__(self, plan: Plan, cfg: PrivacyConfig, cut: int):
        self.plan, self.cut = plan, cut
        self.defences = Defences(cfg, plan.places)
        self.noiseless = Defences(dataclasses.replace(cfg, noise=0.0), plan.places)

    def _through(self, x: Tensor, defences: Defences) -> Tensor:
        for i, segment in enumerate(self.plan.segments[:self.cut + 1]):
            out = segment.module(x)
            x = defences.outgoing(Hop(HopKind.INFER, i, segment.place), x, out)
        return x

    def received(self, x: Tensor) -> Tensor:
        return self._through(x, self.defences)

    def model(self, x: Tensor) -> Tensor:
        return self._through(x, self.noiseless)


def _pixels(x: Tensor, source: Source) -> Tensor:
    return (x * source.std.view(1, -1, 1, 1) + source.mean.view(1, -1, 1, 1)).clamp(0, 1)


def audit_data(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    """Public images (test split) and a seeded pool of private training images, with labels."""
    train, test, spec = load(cfg.data)
    gen = torch.Generator().manual_seed(args.seed)
    public_idx = torch.arange(min(args.public, len(test)))
    pool_idx = torch.randperm(len(train), generator=gen)[:args.private]
    (px, py), (qx, qy) = test.batch(public_idx), train.batch(pool_idx)
    # The attacked images: the first of each class in turn, so that every class is attacked alike.
    order = torch.cat([(qy == c).nonzero().flatten()[: -(-args.reidentify // spec.classes)]
                       for c in range(spec.classes)])
    order = order[torch.argsort(order)][: args.reidentify]
    return {"public": px, "public_pixels": _pixels(px, test), "public_labels": py, "pool": qx,
            "pool_pixels": _pixels(qx, train), "pool_labels": qy, "targets": order, "source": train,
            "classes": spec.classes}


def _input_attacks(views: Views, plan: Plan, data: dict, args: argparse.Namespace, tick: attacks.Tick = None
                   ) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, int]]:
    """attack name -> (indices into the pool it attacked, reconstructions in pixels), one
    ``decoder[capacity]`` per decoder; and each decoder's parameter count."""
    pool, targets = data["pool"], data["targets"]
    with torch.no_grad():
        received = torch.cat([views.received(b) for b in pool.split(256)])
    start = data["public"].mean(0, keepdim=True)
    decoded = attacks.decoder_attack(views.received, data["public"], data["public_pixels"], received,
                                     args.decoder_epochs, args.seed, args.decoders, tick)
    found = {f"decoder[{kind}]": (torch.arange(len(pool)), images) for kind, (images, _) in decoded.items()}
    some = targets[:args.inversions]
    found["inversion"] = (some, attacks.stretched(attacks.inversion_attack(
        views.model, received[some], start.expand(len(some), -1, -1, -1), args.inversion_steps, tick=tick)))
    if views.cut == 0:  # UnSplit clones the edge segment that makes this activation
        some = targets[:args.unsplit]
        found["unsplit"] = (some, attacks.stretched(attacks.unsplit_attack(
            plan.segments[0].module, received[some], start.expand(len(some), -1, -1, -1), args.unsplit_rounds,
            args.seed, tick=tick)))
    return found, {kind: parameters for kind, (_, parameters) in decoded.items()}


def _worst_case(found: dict, data: dict, args: argparse.Namespace, knows_weights: bool
                ) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[Tensor, Tensor]], str]:
    """A cut's scored rows, the worst-case ``decoder`` first (a copy of its capacity's row, with
    ``worst_of``); the reconstructions the picture shows (that decoder's, not every capacity's);
    and the worst case's capacity. Attacks that need the edge weights are labelled so when the
    edges keep them."""
    scored = score_inputs(found, data, args)
    kind = attacks.worst_case({k: scored[f"decoder[{k}]"] for k in args.decoders})
    rows = {"decoder": {**scored[f"decoder[{kind}]"], "worst_of": kind}, **scored}
    shown = {"decoder": found[f"decoder[{kind}]"],
             **{name: v for name, v in found.items() if not name.startswith("decoder[")}}
    if not knows_weights:
        rows, shown = ({(name if name == "unsplit" else f"{name} (given the edge weights)"): v
                        for name, v in named.items()} for named in (rows, shown))
    return rows, shown, kind


def attack(targets: list[AuditTarget], cfg: Config, data: dict, args: argparse.Namespace, tick: attacks.Tick = None
           ) -> tuple[dict[str, Any], list[tuple[str, tuple[Tensor, Tensor]]], dict[str, Any]]:
    """Every target's cuts attacked: the report's rows per cut, the picture's captioned rows, and
    the decoders' budget (the same for every capacity)."""
    cuts, pictures, budget = {}, [], _budget(data, args)
    for target in targets:
        own = data if target.crop is None else {
            **data, **{key: target.crop(data[key]) for key in ("public", "public_pixels", "pool", "pool_pixels")}}
        for cut, where in target.cuts:
            told = None if tick is None else (lambda what, done, total, where=where: tick(f"{where}: {what}", done, total))
            _attack_cut(target.plan, cut, where, cfg, own, args, (cuts, pictures, budget), target.placed, told)
    return cuts, pictures, budget


def _budget(data: dict, args: argparse.Namespace) -> dict[str, Any]:
    """The decoders' budget (the same for every capacity); their sizes are added per cut."""
    return {"public_images": len(data["public"]), "epochs": args.decoder_epochs, "batch": attacks.DECODER_BATCH,
            "optimizer": f"Adam, lr {attacks.DECODER_LR:g}", "capacities": list(args.decoders),
            "parameters": {kind: {} for kind in args.decoders}}


def _attack_cut(plan: Plan, cut: int, where: str, cfg: Config, data: dict, args: argparse.Namespace,
                into: tuple[dict, list, dict], placed: Any = None, tick: attacks.Tick = None) -> None:
    """One cut attacked: its rows, captioned pictures and decoder sizes added to ``into`` (cuts,
    pictures, budget). ``placed`` puts a party's reconstructions back where its region lies."""
    cuts, pictures, budget = into
    found, parameters = _input_attacks(Views(plan, cfg.privacy, cut), plan, data, args, tick)
    cuts[where], shown, worst = _worst_case(found, data, args, cfg.privacy.edge_weights == "central")
    for attack, (idx, reconstructed) in shown.items():
        which = f" (worst: {worst})" if attack.startswith("decoder") else ""
        pictures.append((f"{attack}, {where}{which}", (idx, placed(reconstructed) if placed else reconstructed)))
    for kind, count in parameters.items():  # a decoder's size depends on the cut's shape
        budget["parameters"][kind][where] = count


def score_inputs(found: dict, data: dict, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Scores on every image an attack reconstructed; re-identification on those among the targets."""
    means = torch.stack([data["public_pixels"][data["public_labels"] == c].mean(0) for c in range(data["classes"])])
    results = {}
    for name, (idx, recon) in found.items():
        labels = data["pool_labels"][idx]
        row = attacks.scores(recon, data["pool_pixels"][idx], means[labels])
        chosen = torch.isin(idx, data["targets"])
        row["reidentified"], row["chance"] = attacks.reidentified(
            recon[chosen], idx[chosen], data["pool_pixels"], data["pool_labels"], labels[chosen], args.candidates,
            args.seed)
        row["images"], row["reidentification_images"] = len(idx), int(chosen.sum())
        results[name] = row
    return results


def label_attacks(plan: Plan, cfg: PrivacyConfig, data: dict, seed: int, loss_of: Loss) -> dict[str, Any]:
    """U-shaped plans: the labels from the gradients the edge sends back at the last cut (label noise
    included), and from the central's own features there; clusters named at best."""
    last = len(plan.segments) - 1
    views, defences = Views(plan, cfg, last - 1), Defences(cfg, plan.places)
    grads, features = [], []
    for x, y in zip(data["pool"].split(64), data["pool_labels"].split(64)):  # batches as in training
        with torch.no_grad():
            features.append(views.received(x))
        a = features[-1].clone().requires_grad_()
        hop = Hop(HopKind.TURNAROUND, last, "edge")
        loss = loss_of(plan.segments[last].module(defences.incoming(hop, a)), y)
        grads.append(torch.autograd.grad(loss, a)[0])
    labels, k = data["pool_labels"], data["classes"]
    chance = float(torch.bincount(labels, minlength=k).max() / len(labels))
    result = {"chance": chance, "samples": len(labels)}
    for name, seen in (("from the returned gradients", torch.cat(grads)), ("from its own features", torch.cat(features))):
        flat = F.normalize(seen.flatten(1), dim=1)
        result[name] = {"accuracy": attacks.matched_accuracy(attacks.kmeans(flat, k, seed), labels, k)}
        if k == 2:
            result[name]["auc_gap"] = abs(attacks.norm_auc(seen, labels) - 0.5)
    return result


def picture(path: Path, data: dict, attacked: list[tuple[str, tuple[Tensor, Tensor]]], shown: int = 8) -> None:
    """Originals above their reconstructions, one row per (caption, (indices, reconstructions))."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    targets = data["targets"][:shown]
    rows = [("original", data["pool_pixels"][targets])]
    for caption, (idx, recon) in attacked:
        where = [int((idx == t).nonzero()[0]) for t in targets if (idx == t).any()]
        rows.append((caption, recon[where]))
    tiles = [torch.cat([images, torch.zeros(shown - len(images), *images.shape[1:])]) for _, images in rows]
    grid = make_grid(torch.cat(tiles), nrow=shown, padding=2, pad_value=1.0)
    picture = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).astype("uint8")).convert("RGB")
    picture = picture.resize((picture.width * 3, picture.height * 3), Image.NEAREST)
    margin = 12 + int(max(ImageDraw.Draw(picture).textlength(caption) for caption, _ in rows))
    canvas = Image.new("RGB", (picture.width + margin, picture.height), "white")
    canvas.paste(picture, (margin, 0))
    draw, height = ImageDraw.Draw(canvas), picture.height / len(rows)
    for i, (caption, _) in enumerate(rows):
        draw.text((6, int(i * height + height / 2 - 6)), caption, fill="black")
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))
