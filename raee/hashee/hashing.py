"""Hash functions of HashEE: a fixed exit layer for every token id of the vocabulary.

Every function returns ``token_to_layer``, a LongTensor of shape (V,) with values in 1..L:
the token is updated by layers 1..e and frozen (copied upward) after its exit layer e.
Special tokens ([CLS], [SEP], [PAD], [UNK], [MASK]) always get L, so the classification
token runs every layer; frequency and MI hashes also give L to types never seen in training
(nothing is known about them). All functions are deterministic: same inputs, same map.

Bucketing follows the authors' code (txsun1997/HashEE, utils.py): the ranked types are cut
into L buckets of ``n // L`` distinct types each (at least 1), the last bucket taking the
remainder, so every layer 1..L is used as soon as there are at least L rankable types.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from raee.errors import UserError

#: hashes that give every token id one exit layer (a (V,) map)
TYPE_HASHES = ("random", "frequency", "mi", "cluster")
#: every hash: the type hashes and the per-occurrence random hash (a layer per token occurrence)
HASHES = ("random", "random_occurrence", "frequency", "mi", "cluster")

#: a Mersenne prime: products of two residues fit in int64, so the occurrence hash is exact integer arithmetic
_PRIME = 2_147_483_647


# ---------------------------------------------------------------------------- helpers
def _check_layers(num_layers: int) -> None:
    if int(num_layers) < 1:
        raise ValueError(f"num_layers={num_layers} must be at least 1 (the number of transformer layers)")


def _special_mask(vocab_size: int, special_ids: Sequence[int]) -> torch.Tensor:
    """(V,) bool, True at special token ids (ids outside the vocabulary are ignored)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    ids = torch.tensor([i for i in special_ids if 0 <= int(i) < vocab_size], dtype=torch.long)
    mask[ids] = True
    return mask


def _bucket_ranked(ranked_ids: torch.Tensor, vocab_size: int, num_layers: int) -> torch.Tensor:
    """Ranked ids (n,), first = earliest exit -> (V,) map; ids not ranked get L.

    Buckets of ``max(n // L, 1)`` consecutive types, layers 1..L, the last bucket takes the rest.
    """
    token_to_layer = torch.full((vocab_size,), num_layers, dtype=torch.long)
    n = ranked_ids.numel()
    if n == 0:
        return token_to_layer
    size = max(n // num_layers, 1)
    ranks = torch.arange(n)
    token_to_layer[ranked_ids] = (ranks // size).clamp(max=num_layers - 1) + 1
    return token_to_layer


def _rank(primary: torch.Tensor, secondary: torch.Tensor | None = None) -> torch.Tensor:
    """Indices sorted by ``primary`` descending, ties by ``secondary`` descending, then by id ascending."""
    order = torch.arange(primary.numel())
    if secondary is not None:  # stable sorts, least significant key first
        order = order[torch.sort(secondary[order], descending=True, stable=True).indices]
    return order[torch.sort(primary[order], descending=True, stable=True).indices]


# ---------------------------------------------------------------------------- hashes
def random_hash(vocab_size: int, num_layers: int, seed: int = 42, special_ids: Sequence[int] = ()) -> torch.Tensor:
    """Uniform random layer per type, fixed per type (the paper's consistent random hash).

    A seeded random permutation of the non-special ids is cut into L equal buckets, so every
    layer gets the same number of types (and is used whenever there are at least L of them).
    Returns (V,) long in 1..L.
    """
    _check_layers(num_layers)
    special = _special_mask(vocab_size, special_ids)
    candidates = torch.nonzero(~special).flatten()
    generator = torch.Generator().manual_seed(int(seed))
    shuffled = candidates[torch.randperm(candidates.numel(), generator=generator)]
    token_to_layer = torch.full((vocab_size,), num_layers, dtype=torch.long)
    token_to_layer[shuffled] = torch.arange(shuffled.numel()) % num_layers + 1
    return token_to_layer


def occurrence_random_layers(input_ids: torch.Tensor, attention_mask: torch.Tensor, num_layers: int,
                             seed: int = 42, special_ids: Sequence[int] = ()) -> torch.Tensor:
    """Per-occurrence random hash (the paper's inconsistent random hash): a uniform random layer per
    token *occurrence*, so one type gets different layers at different positions and in different texts.

    input_ids, attention_mask: (B, T), right-padded. Returns (B, T) long in 1..L; special tokens and
    padding get L. The draw is a seeded hash of (the example's real token ids, position): the same
    example gets the same layers in every batch, whatever its padding or batch neighbours (so results
    are reproducible and fine-tuning sees the same assignment every epoch), and another seed gives
    another assignment.
    """
    _check_layers(num_layers)
    ids = torch.as_tensor(input_ids).long()
    real = torch.as_tensor(attention_mask).bool().to(ids.device)
    if ids.dim() != 2 or real.shape != ids.shape:
        raise ValueError(f"input_ids {tuple(ids.shape)} and attention_mask {tuple(real.shape)} must both be (B, T)")
    generator = torch.Generator().manual_seed(int(seed))
    a, b, c, d, e, r = (int(v) for v in torch.randint(1, _PRIME, (6,), generator=generator))
    # the example's key: a polynomial hash of its real tokens (padding leaves it unchanged)
    key = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    for t in range(ids.shape[1]):
        key = torch.where(real[:, t], (key * r + ids[:, t] + 1) % _PRIME, key)
    position = torch.arange(1, ids.shape[1] + 1, device=ids.device)
    h = (key.unsqueeze(1) * a % _PRIME + position * b + c) % _PRIME  # (B, T)
    h = (h * h % _PRIME * d + e) % _PRIME  # two quadratic rounds: positions no longer in arithmetic progression
    h = (h * h % _PRIME + a) % _PRIME
    layers = h % num_layers + 1
    special = torch.isin(ids, torch.tensor(list(special_ids), dtype=torch.long, device=ids.device))
    return torch.where(real & ~special, layers, torch.full_like(layers, num_layers))


def frequency_hash(token_counts: torch.Tensor, num_layers: int, special_ids: Sequence[int] = ()) -> torch.Tensor:
    """Frequency hash (the paper's default). token_counts: (V,) occurrences in the training texts.

    Seen non-special types sorted most frequent first (ties: lower id first) and cut into L
    buckets with equal numbers of distinct types: the most frequent types exit after layer 1.
    Unseen and special types get L. Returns (V,) long in 1..L.
    """
    _check_layers(num_layers)
    counts = torch.as_tensor(token_counts).long()
    if counts.dim() != 1:
        raise ValueError(f"token_counts must have shape (vocab_size,), got {tuple(counts.shape)}")
    special = _special_mask(counts.numel(), special_ids)
    ranked = _rank(counts.double())
    ranked = ranked[(counts[ranked] > 0) & ~special[ranked]]
    return _bucket_ranked(ranked, counts.numel(), num_layers)


def token_label_information(token_label_counts: torch.Tensor, class_counts: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """Each type's term of the token-label mutual information I(X; Y).

    token_label_counts: (V, C) occurrences of type x in training examples of class c.
    class_counts: (C,) training examples per class for p(c) (as the authors' code does); None
    takes p(c) from the token occurrences instead.
    Returns (V,) float64: MI(x) = sum_c p(x, c) log(p(x, c) / (p(x) p(c))), with p(x, c) and
    p(x) over token occurrences and 0 log 0 = 0. This is the paper's binary-label formula
    summed over C classes instead of 2.
    """
    joint = torch.as_tensor(token_label_counts).double()
    if joint.dim() != 2:
        raise ValueError(f"token_label_counts must have shape (vocab_size, num_classes), got {tuple(joint.shape)}")
    total = joint.sum()
    if total <= 0:
        return torch.zeros(joint.shape[0], dtype=torch.float64)
    p_xy = joint / total
    p_x = p_xy.sum(1, keepdim=True)
    if class_counts is None:
        p_y = p_xy.sum(0, keepdim=True)
    else:
        cc = torch.as_tensor(class_counts).double().flatten()
        if cc.numel() != joint.shape[1]:
            raise ValueError(f"class_counts has {cc.numel()} classes but token_label_counts has {joint.shape[1]}")
        p_y = (cc / cc.sum().clamp(min=1.0)).unsqueeze(0)
    ratio = p_xy / (p_x * p_y)
    terms = torch.where(p_xy > 0, p_xy * torch.log(ratio), torch.zeros_like(p_xy))
    return terms.sum(1)


def mutual_information_hash(token_label_counts: torch.Tensor, num_layers: int, special_ids: Sequence[int] = (),
                            class_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Mutual-information hash. token_label_counts: (V, C); class_counts: (C,) examples per class.

    Order (as in the authors' code, generalised from 2 to C classes): seen non-special types by
    their MI term (see :func:`token_label_information`) from highest to lowest, ties by
    frequency then id; the highest-MI types exit after layer 1, on the view that a token whose
    identity alone tells the label needs little context, and [CLS] can still read its shallow
    state. Equal numbers of distinct types per layer; unseen and special types get L.
    Returns (V,) long in 1..L.
    """
    _check_layers(num_layers)
    joint = torch.as_tensor(token_label_counts)
    mi = token_label_information(joint, class_counts)
    counts = joint.sum(1)
    special = _special_mask(joint.shape[0], special_ids)
    ranked = _rank(mi, counts.double())
    ranked = ranked[(counts[ranked] > 0) & ~special[ranked]]
    return _bucket_ranked(ranked, joint.shape[0], num_layers)


def kmeans(points: torch.Tensor, k: int, seed: int = 42, iterations: int = 10) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding, in torch. points: (N, D) -> (N,) cluster ids in 0..k-1.

    No cluster ends empty when N >= k: an empty cluster takes the point farthest from its centre.
    """
    x = points.detach().double()
    n = x.shape[0]
    k = min(int(k), n)
    generator = torch.Generator().manual_seed(int(seed))
    centres = x[torch.randint(n, (1,), generator=generator)]
    for _ in range(1, k):  # k-means++: next centre drawn with probability ~ squared distance
        d2 = torch.cdist(x, centres).pow(2).min(1).values
        if d2.sum() <= 0:
            pick = torch.randint(n, (1,), generator=generator)
        else:
            pick = torch.multinomial(d2 / d2.sum(), 1, generator=generator)
        centres = torch.cat([centres, x[pick]])
    assign = torch.cdist(x, centres).argmin(1)
    for _ in range(int(iterations)):
        assign = _fill_empty(x, centres, assign, k)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        sizes = torch.bincount(assign, minlength=k).clamp(min=1).unsqueeze(1)
        centres = sums / sizes
        new = torch.cdist(x, centres).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return _fill_empty(x, centres, assign, k)


def _fill_empty(x: torch.Tensor, centres: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Give each empty cluster the point farthest from its own centre (taken from a cluster of 2+)."""
    assign = assign.clone()
    for c in range(k):
        sizes = torch.bincount(assign, minlength=k)
        if sizes[c] > 0:
            continue
        dist = (x - centres[assign]).norm(dim=1)
        dist[sizes[assign] < 2] = -1.0  # never empty another cluster
        assign[int(dist.argmax())] = c
    return assign


def cluster_hash(embeddings: torch.Tensor, num_layers: int, seed: int = 42, special_ids: Sequence[int] = (),
                 iterations: int = 10) -> torch.Tensor:
    """Clustering hash. embeddings: (V, D) word-embedding matrix.

    k-means with L clusters on the non-special rows; clusters sorted by the summed L2 norm of
    their members, smallest first (as in the authors' code), cluster i -> layer i + 1.
    Special tokens get L. Returns (V,) long in 1..L.
    """
    _check_layers(num_layers)
    emb = torch.as_tensor(embeddings).detach().float().cpu()
    if emb.dim() != 2:
        raise ValueError(f"embeddings must have shape (vocab_size, dim), got {tuple(emb.shape)}")
    vocab_size = emb.shape[0]
    special = _special_mask(vocab_size, special_ids)
    ids = torch.nonzero(~special).flatten()
    token_to_layer = torch.full((vocab_size,), num_layers, dtype=torch.long)
    if ids.numel() == 0:
        return token_to_layer
    assign = kmeans(emb[ids], num_layers, seed=seed, iterations=iterations)
    k = int(assign.max()) + 1
    norm_sums = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, emb[ids].double().norm(dim=1))
    order = torch.sort(norm_sums, stable=True).indices  # ascending summed norm
    cluster_to_layer = torch.empty(k, dtype=torch.long)
    cluster_to_layer[order] = torch.arange(k) + 1
    token_to_layer[ids] = cluster_to_layer[assign]
    return token_to_layer


# ---------------------------------------------------------------------------- counting
def add_token_counts(counts: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Add the real tokens of a batch to ``counts`` (V,) in place. input_ids, attention_mask: (B, T)."""
    ids = input_ids[attention_mask.bool()].flatten().cpu()
    counts += torch.bincount(ids, minlength=counts.numel())[: counts.numel()]


def add_token_label_counts(counts: torch.Tensor, class_counts: torch.Tensor, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor, labels: torch.Tensor) -> None:
    """Add a batch to ``counts`` (V, C) and ``class_counts`` (C,) in place. labels: (B,) class ids."""
    labels = torch.as_tensor(labels).cpu()
    if labels.is_floating_point():
        raise UserError("the mutual-information hash needs class labels, not regression targets: "
                        "use exit.hash=frequency, random or cluster for regression data")
    vocab_size, num_classes = counts.shape
    real = attention_mask.bool().cpu()
    ids = input_ids.cpu()[real]
    rows = labels.long().unsqueeze(1).expand_as(real)[real]
    if rows.numel() and (rows.min() < 0 or rows.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {int(rows.min())}..{int(rows.max())}")
    flat = torch.bincount(ids * num_classes + rows, minlength=vocab_size * num_classes)[: vocab_size * num_classes]
    counts += flat.view(vocab_size, num_classes)
    class_counts += torch.bincount(labels.long(), minlength=num_classes)[:num_classes]


def _encode(tokenizer: Any, texts: list[str], text_pairs: list[str] | None, max_length: int | None
            ) -> dict[str, torch.Tensor]:
    return tokenizer(list(texts), list(text_pairs) if text_pairs is not None else None, padding=True,
                     truncation=max_length is not None, max_length=max_length, return_tensors="pt")


def count_tokens(tokenizer: Any, texts: list[str], text_pairs: list[str] | None = None,
                 vocab_size: int | None = None, max_length: int | None = None,
                 batch_size: int = 256) -> torch.Tensor:
    """Occurrences of every token id in ``texts`` as the tokenizer encodes them (specials included).

    Returns (V,) long; V = ``vocab_size`` or ``len(tokenizer)``.
    """
    vocab_size = int(vocab_size or len(tokenizer))
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for start in range(0, len(texts), batch_size):
        pairs = text_pairs[start:start + batch_size] if text_pairs is not None else None
        enc = _encode(tokenizer, texts[start:start + batch_size], pairs, max_length)
        add_token_counts(counts, enc["input_ids"], enc["attention_mask"])
    return counts


def count_token_labels(tokenizer: Any, texts: list[str], labels: Sequence[int], num_classes: int,
                       text_pairs: list[str] | None = None, vocab_size: int | None = None,
                       max_length: int | None = None, batch_size: int = 256
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-label co-occurrences: ((V, C) occurrences of each id in examples of each class,
    (C,) examples per class)."""
    if len(labels) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(labels)} labels: give one label per text")
    vocab_size = int(vocab_size or len(tokenizer))
    counts = torch.zeros(vocab_size, int(num_classes), dtype=torch.long)
    class_counts = torch.zeros(int(num_classes), dtype=torch.long)
    labels_t = torch.as_tensor(list(labels))
    for start in range(0, len(texts), batch_size):
        pairs = text_pairs[start:start + batch_size] if text_pairs is not None else None
        enc = _encode(tokenizer, texts[start:start + batch_size], pairs, max_length)
        add_token_label_counts(counts, class_counts, enc["input_ids"], enc["attention_mask"],
                               labels_t[start:start + batch_size])
    return counts, class_counts


def layer_histogram(token_to_layer: torch.Tensor, num_layers: int) -> list[int]:
    """Number of vocabulary types per layer 1..L (index 0 unused, kept so index = layer)."""
    return torch.bincount(token_to_layer.long(), minlength=num_layers + 1)[: num_layers + 1].tolist()
