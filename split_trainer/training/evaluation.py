"""Evaluation of the synchronised model through the whole plan, at every epoch end.

One test batch per edge at a time (so no call waits behind another on its edge): the central's
test batches spread over the edges, or in edge placement each edge's own test data. The scores
are combined by sample count, summed in a fixed order so that every run adds them up the same way.
"""

from __future__ import annotations

from typing import Any

from split_trainer.data.placement import Score
from split_trainer.training.engines import Engine
from split_trainer.training.fleet import Fleet


def evaluate(engine: Engine, fleet: Fleet, placement: Any, epoch: int) -> tuple[float, float, dict[str, Any]]:
    """(test loss, test accuracy, the placement's extra record) of the model as it stands."""
    scores: dict[tuple[int, int], Score] = {}

    def drive(k: int, share: list[tuple[int, Any]]) -> None:
        for j, key in share:
            source, y = placement.test_batch(key)
            scores[(k, j)] = engine.evaluate(fleet.links[k], source, y)

    engine.stage.train(False)
    try:
        fleet.per_edge(drive, placement.eval_shares(epoch))
    finally:
        engine.stage.train(True)
    ordered = [scores[kj] for kj in sorted(scores, key=lambda kj: (kj[1], kj[0]))]
    loss_sum, correct, count = (sum(s[i] for s in ordered) for i in range(3))
    return loss_sum / count, correct / count, placement.eval_record(scores, fleet.names)
