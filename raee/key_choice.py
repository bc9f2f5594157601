"""Choose how backbone keys are pooled (``key_encoder.pooling=auto``) on the validation split.

For keys at layer l, one pass up to layer l over the exit database's training examples and the validation
split pools every example each way of :data:`raee.keys.AUTO_POOLINGS` (last token, the text's tokens, the
whole prompt). Each validation example is then given its k nearest training examples' majority label (the
kNN vote of ``exit=knn``, exact search on the normalised keys); the pooling whose vote is right most often
wins (ties: the order of AUTO_POOLINGS). The test split is never read. The choice is cached as JSON under
``cache_dir/key_pooling/<content hash>``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from raee.atomic import atomic_write_text
from raee.calibration.tables import split_fingerprint
from raee.errors import UserError
from raee.features import iterate_to_layer
from raee.keys import AUTO_POOLINGS, BackboneKeys

log = logging.getLogger("raee")


@torch.no_grad()
def pooled_keys(keys: BackboneKeys, backbone: Any, head: Any, batches: Any, poolings: tuple[str, ...],
                take: torch.Tensor | None = None, desc: str = "keys", progress: bool = True
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({pooling: (N, H) normalised keys}, labels (N,)) of the examples of ``batches`` (only split positions in
    ``take`` when given), from one pass up to the key layer."""
    out: dict[str, list[torch.Tensor]] = {p: [] for p in poolings}
    labels = []
    for state, batch in iterate_to_layer(backbone, head, batches, keys.plan_layer, desc=desc, progress=progress):
        keep = torch.isin(torch.as_tensor(batch["index"]), take) if take is not None else None
        for p in poolings:
            pooled = torch.nn.functional.normalize(keys.pool(state, p).float(), dim=-1).cpu()
            out[p].append(pooled if keep is None else pooled[keep])
        label = torch.as_tensor(batch["label"]).long().cpu()
        labels.append(label if keep is None else label[keep])
    if not labels:
        raise UserError(f"{desc}: no examples to choose the key pooling with")
    return {p: torch.cat(v) for p, v in out.items()}, torch.cat(labels)


def knn_accuracy(train: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor,
                 k: int, num_classes: int) -> float:
    """Accuracy of the k nearest training examples' majority label (ties: the nearest's), cosine similarity."""
    from raee.exits.knn import neighbour_vote

    k = min(k, len(train))
    similarity, ids = (queries @ train.T).topk(k, dim=1)
    votes = neighbour_vote(1.0 - similarity, ids, train_labels, num_classes)
    return float((votes.argmax(1) == labels).float().mean())


def choose_pooling(keys: BackboneKeys, backbone: Any, head: Any, datamodule: Any, *, k: int, fraction: float = 1.0,
                   seed: int = 42, cache_dir: str | Path | None = None, progress: bool = True,
                   poolings: tuple[str, ...] = AUTO_POOLINGS) -> dict[str, Any]:
    """Set ``keys.pooling`` to the pooling of ``poolings`` whose kNN vote is most accurate on the validation split;
    returns {"pooling", "validation_accuracy": {pooling: accuracy}, "cached"}."""
    from raee.database.build import select_fraction
    from raee.experiment import data_description, fingerprint

    keys.bind(backbone, head)
    description = {"backbone": backbone.describe(), "head": head.describe(), "data": data_description(datamodule),
                   "train": split_fingerprint(datamodule.split("train")),
                   "validation": split_fingerprint(datamodule.split("validation")), "layer": keys.plan_layer,
                   "poolings": list(poolings), "k": int(k), "fraction": fraction, "seed": seed, "rule": "knn majority"}
    path = Path(cache_dir) / "key_pooling" / f"{fingerprint(description)}.json" if cache_dir is not None else None
    if path is not None and path.exists():
        result = json.loads(path.read_text()) | {"cached": True}
    else:
        take = torch.from_numpy(select_fraction(len(datamodule.split("train")), fraction, seed))
        train, train_labels = pooled_keys(keys, backbone, head, datamodule.train_dataloader(), poolings, take,
                                          f"keys at layer {keys.plan_layer} (train)", progress)
        val, val_labels = pooled_keys(keys, backbone, head, datamodule.val_dataloader(), poolings, None,
                                      f"keys at layer {keys.plan_layer} (validation)", progress)
        classes = max(int(train_labels.max()), int(val_labels.max())) + 1
        accuracy = {p: knn_accuracy(train[p], train_labels, val[p], val_labels, k, classes) for p in poolings}
        best = max(poolings, key=lambda p: (accuracy[p], -poolings.index(p)))
        result = {"pooling": best, "validation_accuracy": accuracy, "num_validation": len(val_labels),
                  "description": description}
        if path is not None:
            atomic_write_text(path, json.dumps(result, indent=1, default=str))
        result["cached"] = False
    keys.pooling = result["pooling"]
    log.info("key_encoder.pooling=auto at layer %d: %s (validation kNN accuracy %s)", keys.plan_layer,
             result["pooling"], result["validation_accuracy"])
    return result
