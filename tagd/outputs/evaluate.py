"""How good is a model on the user's own tags: pure metrics plus ground-truth readers.

Per-file score as in tagger-showdown: (hits - false tags) / truth size. Per category:
precision, recall and F1 at the stored decision, the threshold that maximises F1 and the
one where precision equals recall (over stored scores, so only thresholds above the score
floor can be explored), and the most over- and under-predicted tags.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tagd.tagtext import with_underscores

Key = tuple[str, str]  # (namespace, name)
HYDRUS_TO_TAGD = {"creator": "artist", "series": "copyright"}


def file_score(predicted: set[Key], truth: set[Key]) -> float | None:
    """tagger-showdown: tags in truth minus tags not in truth, over the truth size."""
    if not truth:
        return None
    return (len(predicted & truth) - len(predicted - truth)) / len(truth)


@dataclass(frozen=True)
class PRF:
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


@dataclass(frozen=True)
class Sample:
    """One file: the model's stored scores, its selected tags, and the truth."""

    scores: Mapping[Key, float]
    selected: set[Key]
    truth: set[Key]


@dataclass(frozen=True)
class Sweep:
    best_f1_threshold: float | None
    best_f1: float
    equal_pr_threshold: float | None
    equal_pr: PRF | None


@dataclass
class CategoryReport:
    at_thresholds: PRF
    sweep: Sweep


@dataclass
class Report:
    model: str
    files: int
    mean_file_score: float | None
    categories: dict[str, CategoryReport] = field(default_factory=dict)
    over_predicted: list[tuple[str, int]] = field(default_factory=list)
    under_predicted: list[tuple[str, int]] = field(default_factory=list)


def sweep(pairs: Sequence[tuple[float, bool]], positives: int) -> Sweep:
    """Best-F1 and P≈R thresholds over (score, is_true) pairs; `positives` = truth count."""
    ordered = sorted(pairs, key=lambda p: -p[0])
    best_t, best_f1, eq_t, eq, eq_gap = None, 0.0, None, None, float("inf")
    tp = fp = 0
    i = 0
    while i < len(ordered):
        t = ordered[i][0]
        while i < len(ordered) and ordered[i][0] == t:
            tp += ordered[i][1]
            fp += not ordered[i][1]
            i += 1
        prf = PRF(tp, fp, positives - tp)
        if prf.f1 > best_f1:
            best_t, best_f1 = t, prf.f1
        gap = abs(prf.precision - prf.recall)
        if gap < eq_gap:
            eq_t, eq, eq_gap = t, prf, gap
    return Sweep(best_t, best_f1, eq_t, eq)


def evaluate(model: str, samples: Iterable[Sample], *, top: int = 10) -> Report:
    samples = list(samples)
    per_file = [s for s in (file_score(x.selected, x.truth) for x in samples) if s is not None]
    counts: dict[str, list[int]] = {}
    pairs: dict[str, list[tuple[float, bool]]] = {}
    positives: Counter[str] = Counter()
    over: Counter[str] = Counter()
    under: Counter[str] = Counter()
    for s in samples:
        for key in s.selected | s.truth:
            ns = key[0]
            c = counts.setdefault(ns, [0, 0, 0])
            if key in s.selected and key in s.truth:
                c[0] += 1
            elif key in s.selected:
                c[1] += 1
                over[f"{ns}:{key[1]}"] += 1
            else:
                c[2] += 1
                under[f"{ns}:{key[1]}"] += 1
        for key in s.truth:
            positives[key[0]] += 1
        for key, score in s.scores.items():
            pairs.setdefault(key[0], []).append((score, key in s.truth))
    report = Report(model, len(samples), sum(per_file) / len(per_file) if per_file else None)
    for ns in sorted(counts):
        report.categories[ns] = CategoryReport(
            PRF(*counts[ns]), sweep(pairs.get(ns, []), positives[ns])
        )
    report.over_predicted = over.most_common(top)
    report.under_predicted = under.most_common(top)
    return report


# Ground truth: (path or sha256) → tags, normalised to (namespace, name) keys.


def normalise(tag: str, known: Mapping[str, str]) -> Key:
    """Hydrus/kohya/Danbooru text → key; an unnamespaced tag takes the model's namespace."""
    tag = tag.strip()
    ns, sep, name = tag.partition(":")
    if sep and ns and name and (ns in HYDRUS_TO_TAGD or ns in set(known.values())):
        return (HYDRUS_TO_TAGD.get(ns, ns), with_underscores(name))
    name = tag[1:] if tag.startswith("::") else tag
    name = with_underscores(name)
    return (known.get(name, "general"), name)


def read_sidecar(image: str) -> list[str] | None:
    """Tags of the sidecar next to `image`: image.ext.txt (Hydrus), image.txt (kohya), .json."""
    p = Path(image)
    hydrus = p.with_name(p.name + ".txt")
    kohya = p.with_suffix(".txt")
    js = p.with_name(p.name + ".json")
    try:
        if hydrus.is_file():
            return [line for line in hydrus.read_text(encoding="utf-8").splitlines() if line]
        if kohya.is_file():
            text = kohya.read_text(encoding="utf-8").replace("\\(", "(").replace("\\)", ")")
            return [t for t in (x.strip() for x in text.split(",")) if t]
        if js.is_file():
            data = json.loads(js.read_text(encoding="utf-8"))
            return _json_tags(data.get("tags", []))
    except (OSError, ValueError, AttributeError):
        return None
    return None


def _json_tags(tags: object) -> list[str]:
    if isinstance(tags, dict):  # {namespace: {name: score}} as tagd's json sidecars
        return [f"{ns}:{n}" for ns, names in tags.items() for n in names]
    out = []
    for t in tags if isinstance(tags, list) else []:
        if isinstance(t, str):
            out.append(t)
        elif isinstance(t, dict) and "tag" in t:
            out.append(f"{t.get('namespace', 'general')}:{t['tag']}")
    return out


class TruthError(Exception):
    """A ground-truth file that cannot be read; phrased for the user."""


def read_truth_file(path: Path) -> dict[str, list[str]]:
    """CSV (path|sha256, tags: comma-separated) or JSON Lines ({path|paths|sha256, tags})."""
    out: dict[str, list[str]] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TruthError(f"--truth {path}: {exc.strerror or exc}") from None
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                tags = _json_tags(rec["tags"])
            except (ValueError, KeyError, TypeError):
                raise TruthError(f"--truth {path} line {n}: expected {{path, tags}}") from None
            for key in [rec.get("sha256"), rec.get("path"), *rec.get("paths", [])]:
                if key:
                    out[str(key)] = tags
        return out
    reader = csv.DictReader(text.splitlines())
    cols = reader.fieldnames or []
    if "tags" not in cols or not ({"path", "sha256"} & set(cols)):
        raise TruthError(f"--truth {path}: expected CSV columns path or sha256, and tags")
    for row in reader:
        tags = [t for t in (x.strip() for x in (row.get("tags") or "").split(",")) if t]
        for key in (row.get("sha256"), row.get("path")):
            if key:
                out[key] = tags
    return out
