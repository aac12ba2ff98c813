"""Statistics behind the `report` and `data_analysis` pipelines (seed 004's data_analysis
agent): numeric statistics of JSON documents per key path, text statistics, and k-means
clustering of text embeddings.

Pure functions over plain values and numpy arrays: nothing here touches the database,
the model or the network, and every result is deterministic (the same input gives the
same output, clusters included) and JSON-serializable.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Decimal places kept in computed floats: enough for any report, and stable across runs.
DECIMALS = 6
TOP_TERMS = 10
CLUSTER_TOP_TERMS = 5
CLUSTERS_MAX = 10
KMEANS_MAX_ITERATIONS = 100
EXCERPT_CHARS = 160

# Letters and digits, with inner apostrophes ("don't", "l'eau"); underscores are not
# word characters in prose.
WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
# A sentence ends at a run of terminal punctuation followed by a space or the end.
SENTENCE_END = re.compile(r"[.!?\u2026]+(?=\s|$)")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Terms shorter than this are rarely what a text is about.
TERM_MIN_CHARS = 3
_STOP_WORD_LIST = """
    about above after again against all also and any are aren't because been before being
    below between both but can can't cannot could couldn't did didn't does doesn't doing
    don't down during each few for from further had hadn't has hasn't have haven't having
    her here hers herself him himself his how into isn't it's its itself just let's more
    most mustn't myself nor not now off once only other ought our ours ourselves out over
    own same shan't she she'd she'll she's should shouldn't some such than that that's the
    their theirs them themselves then there there's these they they'd they'll they're
    they've this those through too under until very was wasn't we'd we'll we're we've were
    weren't what what's when when's where where's which while who who's whom why why's
    will with won't would wouldn't you you'd you'll you're you've your yours yourself
    yourselves
    """
STOP_WORDS = frozenset(_STOP_WORD_LIST.split())


def _rounded(value: float) -> float:
    return round(value, DECIMALS)


# --- JSON --------------------------------------------------------------------------------


def _child_path(path: str, key: str) -> str:
    if IDENTIFIER.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def numeric_summary(values: Sequence[float]) -> dict[str, Any]:
    """count, mean, median, stdev (population: defined for one value too), min, max."""
    return {
        "count": len(values),
        "mean": _rounded(statistics.fmean(values)),
        "median": _rounded(float(statistics.median(values))),
        "stdev": _rounded(statistics.pstdev(values)),
        "min": min(values),
        "max": max(values),
    }


def json_statistics(documents: Iterable[Any]) -> dict[str, Any]:
    """Numeric statistics per key path over every document together.

    Paths start at `$`; an object key is `.key` (or `["odd key"]`), every element of an
    array is `[]`, so `$.sales[].amount` gathers the amount of every sale. Booleans are
    not numbers here, and non-finite floats are skipped. `types` counts every value
    (containers included) by JSON type; `numeric` keeps paths in first-seen order.
    """
    numbers: dict[str, list[float]] = {}
    types: Counter[str] = Counter()
    count = 0
    for document in documents:
        count += 1
        # Depth-first with an explicit stack: documents may nest deeper than Python's
        # recursion limit.
        stack: list[tuple[str, Any]] = [("$", document)]
        while stack:
            path, value = stack.pop()
            kind = _type_name(value)
            types[kind] += 1
            if kind == "number" and math.isfinite(value):
                numbers.setdefault(path, []).append(value)
            elif kind == "object":
                stack.extend((_child_path(path, key), value[key]) for key in reversed(value))
            elif kind == "array":
                stack.extend((f"{path}[]", item) for item in reversed(value))
    return {
        "documents": count,
        "values": sum(types.values()),
        "types": dict(sorted(types.items())),
        "numeric": {path: numeric_summary(values) for path, values in numbers.items()},
    }


# --- text --------------------------------------------------------------------------------


def words_of(text: str) -> list[str]:
    return WORD.findall(text)


def sentence_count(text: str) -> int:
    """Sentences with at least one word; text after the last full stop counts as one."""
    return sum(1 for part in SENTENCE_END.split(text) if WORD.search(part))


def top_terms(texts: Iterable[str], limit: int = TOP_TERMS) -> list[dict[str, Any]]:
    """The most frequent content words (lower-cased, no stop words or bare numbers), most
    frequent first, ties alphabetical."""
    counts: Counter[str] = Counter(
        word
        for text in texts
        for word in (w.lower() for w in words_of(text))
        if len(word) >= TERM_MIN_CHARS and word not in STOP_WORDS and not word.isdigit()
    )
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [{"term": term, "count": n} for term, n in ranked[:limit]]


def text_counts(text: str) -> dict[str, int]:
    """Words, sentences and characters of one text."""
    return {
        "words": len(words_of(text)),
        "sentences": sentence_count(text),
        "characters": len(text),
    }


def text_statistics(texts: Sequence[str]) -> dict[str, Any]:
    """Statistics of several texts together."""
    words = [word for text in texts for word in words_of(text)]
    sentences = sum(sentence_count(text) for text in texts)
    return {
        "documents": len(texts),
        "words": len(words),
        "sentences": sentences,
        "characters": sum(len(text) for text in texts),
        "unique_words": len({word.lower() for word in words}),
        "average_word_length": _rounded(
            sum(len(word) for word in words) / len(words) if words else 0.0
        ),
        "average_sentence_words": _rounded(len(words) / sentences if sentences else 0.0),
        "top_terms": top_terms(texts),
    }


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` on one line, cut at a word boundary near `limit` characters."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    cut = flat[:limit].rsplit(" ", 1)[0] or flat[:limit]
    return cut + "\u2026"


# --- clustering ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray  # the cluster of each vector, numbered by first member
    centroids: np.ndarray
    silhouette: float | None  # mean silhouette, None for a single cluster


def kmeans(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with a deterministic farthest-point start: the first vector, then
    each time the vector farthest from the centers chosen so far (lowest index on ties).
    Returns (labels, centroids); stops when no assignment changes."""
    if not 1 <= k <= len(vectors):
        raise ValueError(f"k must be between 1 and {len(vectors)}, got {k}")
    chosen = [0]
    nearest = ((vectors - vectors[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        chosen.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, ((vectors - vectors[chosen[-1]]) ** 2).sum(axis=1))
    centroids = vectors[chosen].astype(np.float64)
    labels = np.full(len(vectors), -1)
    for _ in range(KMEANS_MAX_ITERATIONS):
        distances = ((vectors[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
        assigned = distances.argmin(axis=1)
        if np.array_equal(assigned, labels):
            break
        labels = assigned
        for cluster in range(k):
            members = vectors[labels == cluster]
            if len(members):  # an emptied cluster keeps its centroid
                centroids[cluster] = members.mean(axis=0)
    return labels, centroids


def silhouette(vectors: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette coefficient (Euclidean); a point alone in its cluster scores 0."""
    clusters = np.unique(labels)
    if len(clusters) < 2:
        raise ValueError("the silhouette needs at least two clusters")
    distances = np.sqrt(((vectors[:, None, :] - vectors[None, :, :]) ** 2).sum(axis=2))
    scores = []
    for index, own in enumerate(labels):
        same = labels == own
        if same.sum() == 1:
            scores.append(0.0)
            continue
        inside = distances[index, same].sum() / (same.sum() - 1)
        outside = min(
            distances[index, labels == other].mean() for other in clusters if other != own
        )
        widest = max(inside, outside)
        scores.append(0.0 if widest == 0 else (outside - inside) / widest)
    return float(np.mean(scores))


def candidate_cluster_counts(n: int, distinct: int) -> range:
    """The k tried for n vectors: 2 up to about sqrt(n) + 1, fewer than n, at most
    CLUSTERS_MAX and the number of distinct vectors; empty below 3 vectors."""
    return range(2, min(n - 1, math.isqrt(n) + 1, distinct, CLUSTERS_MAX) + 1)


def cluster_vectors(vectors: Sequence[Sequence[float]]) -> Clustering:
    """k-means for each candidate k (from the number of vectors), keeping the k with the
    best mean silhouette (the smaller k on ties); one cluster when fewer than 3."""
    points = np.asarray(vectors, dtype=np.float64)
    if points.ndim != 2 or len(points) == 0:
        raise ValueError("expected a non-empty list of vectors of one length")
    distinct = len(np.unique(points.round(DECIMALS), axis=0))
    best: Clustering | None = None
    best_score = -math.inf
    for k in candidate_cluster_counts(len(points), distinct):
        labels, centroids = kmeans(points, k)
        score = silhouette(points, labels)
        # Strictly better only: on a tie the smaller k (tried first) stays.
        if score > best_score + 1e-12:
            best, best_score = Clustering(labels, centroids, score), score
    if best is None:
        return Clustering(np.zeros(len(points), dtype=int), points.mean(axis=0)[None, :], None)
    return _numbered_by_first_member(best)


def _numbered_by_first_member(clustering: Clustering) -> Clustering:
    order: list[int] = []
    for label in clustering.labels.tolist():
        if label not in order:
            order.append(label)
    renumber = {old: new for new, old in enumerate(order)}
    return Clustering(
        labels=np.array([renumber[label] for label in clustering.labels.tolist()]),
        centroids=clustering.centroids[order],
        silhouette=clustering.silhouette,
    )


def text_clusters(
    texts: Sequence[tuple[str, str]], vectors: Sequence[Sequence[float]], *, model: str
) -> dict[str, Any]:
    """Topics of `(input_id, text)` pairs from their embeddings: each cluster's members,
    top terms, and the member nearest its centroid as the representative."""
    if len(texts) != len(vectors):
        raise ValueError(f"{len(texts)} texts but {len(vectors)} vectors")
    clustering = cluster_vectors(vectors)
    points = np.asarray(vectors, dtype=np.float64)
    clusters = []
    for number, centroid in enumerate(clustering.centroids):
        members = [index for index, label in enumerate(clustering.labels) if label == number]
        nearest = min(members, key=lambda index: float(((points[index] - centroid) ** 2).sum()))
        clusters.append(
            {
                "id": number,
                "size": len(members),
                "input_ids": [texts[index][0] for index in members],
                "top_terms": [
                    entry["term"]
                    for entry in top_terms(
                        (texts[index][1] for index in members), CLUSTER_TOP_TERMS
                    )
                ],
                "representative": {
                    "input_id": texts[nearest][0],
                    "excerpt": excerpt(texts[nearest][1]),
                },
            }
        )
    return {
        "model": model,
        "k": len(clusters),
        "silhouette": None if clustering.silhouette is None else round(clustering.silhouette, 3),
        "clusters": clusters,
    }


# --- images --------------------------------------------------------------------------------


def image_statistics(images: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts by shape category and each image's classification (jobs.pipelines.lib.imaging)."""
    return {
        "count": len(images),
        "by_category": dict(sorted(Counter(image["category"] for image in images).items())),
        "items": list(images),
    }
