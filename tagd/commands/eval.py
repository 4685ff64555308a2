"""`tagd eval`: compare models' tags with the user's own tags (sidecars, Hydrus, a file)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagd.commands import Context, UserError
from tagd.index import inventory

if TYPE_CHECKING:
    from tagd.outputs.effective import FileTagSet
    from tagd.outputs.evaluate import Report

Lookup = Callable[["FileTagSet"], "list[str] | None"]

EPILOG = """examples:
  tagd eval --model wd-vit-tagger-v3 --truth sidecars          # image.jpg.txt / image.txt / .json
  tagd eval --model wd-vit --model wd-swinv2 --truth hydrus "rating:general"
  tagd eval --model wd-vit --truth truth.csv --json            # CSV: path|sha256,tags
  tagd export --format jsonl > me.jsonl && tagd eval -m wd-vit --truth me.jsonl   # control: 1.0
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score models against your own tags",
        description="Compare each model's stored tags with ground truth: per-file score "
        "(tagger-showdown), precision/recall/F1 per category at the current thresholds, the "
        "threshold with the best F1 and where precision = recall, and the most over- and "
        "under-predicted tags. Several --model options are shown side by side.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("query", nargs="*", help="only images matching this search query")
    p.add_argument("--model", "-m", action="append", required=True, help="model (repeatable)")
    p.add_argument(
        "--truth",
        required=True,
        help="sidecars, hydrus, reviews (files a human reviewed), or a .csv/.jsonl file",
    )
    p.add_argument("--truth-service", default="my tags", help="Hydrus tag service with truth")
    p.add_argument("--top", type=int, default=10, help="how many over/under-predicted tags")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.set_defaults(func=run, query_terms_from_options=True)


def _truth_lookup(ctx: Context) -> Lookup:
    from tagd.outputs import evaluate

    source = ctx.args.truth
    if source == "sidecars":
        return lambda fs: next(
            (t for t in (evaluate.read_sidecar(p) for p in fs.paths) if t is not None), None
        )
    if source == "hydrus":
        return _hydrus_truth(ctx)
    if source == "reviews":
        from tagd.index import reviews as review

        truth = review.truth(ctx.db(readonly=True))
        return lambda fs: truth.get(fs.file_id)
    try:
        table = evaluate.read_truth_file(Path(source))
    except evaluate.TruthError as exc:
        raise UserError(str(exc), 2) from None

    def lookup(fs: FileTagSet) -> list[str] | None:
        for key in (fs.sha256, *fs.paths):
            if key in table:
                return table[key]
        return None

    return lookup


def _hydrus_truth(ctx: Context) -> Lookup:
    from tagd.hydrus import sync as hydrus

    cfg = ctx.config.hydrus
    try:
        client = hydrus.Client(cfg.url, hydrus.access_key(cfg), cfg.timeout)
        key = client.tag_service_key(ctx.args.truth_service)
    except hydrus.HydrusError as exc:
        raise UserError(str(exc), 3) from None
    cache: dict[str, list[str] | None] = {}

    def lookup(fs: FileTagSet) -> list[str] | None:
        if fs.sha256 not in cache:
            try:
                state = client.file_tags([fs.sha256], key)[fs.sha256]
            except hydrus.HydrusError as exc:
                raise UserError(str(exc), 3) from None
            cache[fs.sha256] = None if state is None else sorted(state[0])
        return cache[fs.sha256]

    return lookup


def run(ctx: Context) -> int:
    import time

    from tagd.outputs import evaluate
    from tagd.outputs.effective import iter_files
    from tagd.progress import Progress, summary
    from tagd.search.query import QueryError, parse

    node = None
    if ctx.args.query:
        try:
            node = parse(" ".join(ctx.args.query))
        except QueryError as exc:
            raise UserError(f"bad query:\n{exc.caret()}", 2) from None
    conn = ctx.db(readonly=ctx.args.truth != "hydrus")
    lookup = _truth_lookup(ctx)
    reports = []
    started = time.monotonic()
    read = 0

    for model in ctx.args.model:
        inventory.require_model_id(conn, model)
        known = inventory.model_label_namespaces(conn, model)
        done = inventory.tagged_file_ids(conn, model)
        samples = []
        try:
            with Progress(f"eval {model}", unit="files") as bar:
                for i, fs in enumerate(
                    iter_files(conn, models=[model], node=node, all_scores=True, reviews=False)
                ):
                    bar.update(i + 1)
                    if fs.file_id not in done:
                        continue
                    truth = lookup(fs)
                    if truth is None:
                        continue
                    samples.append(
                        evaluate.Sample(
                            scores={(t.namespace, t.name): t.score for t in fs.tags},
                            selected={(t.namespace, t.name) for t in fs.tags if t.selected},
                            truth={evaluate.normalise(t, known) for t in truth},
                        )
                    )
        except ValueError as exc:
            raise UserError(str(exc), 2) from None
        read += bar.done
        reports.append(evaluate.evaluate(model, samples, top=ctx.args.top))
    scored = ", ".join(f"{r.model} {r.files}" for r in reports)
    print(
        f"tagd: eval: {read} files read, scored with ground truth: {scored} "
        f"{summary(read, time.monotonic() - started, 'files')}",
        file=sys.stderr,
    )
    if all(r.files == 0 for r in reports):
        raise UserError(f"no tagged images with ground truth from {ctx.args.truth}", 1)
    if ctx.args.json:
        json.dump([_jsonable(r) for r in reports], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_table(reports))
    return 0


def _jsonable(r: Report) -> dict[str, Any]:
    d = dataclasses.asdict(r)
    for ns, c in r.categories.items():
        m = c.at_thresholds
        d["categories"][ns]["at_thresholds"].update(
            precision=round(m.precision, 4), recall=round(m.recall, 4), f1=round(m.f1, 4)
        )
    return d


def _table(reports: list[Report]) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    lines = ["metric".ljust(28) + "".join(r.model[:18].rjust(20) for r in reports)]

    def row(label: str, values: list[str]) -> None:
        lines.append(label.ljust(28) + "".join(v.rjust(20) for v in values))

    row("files", [str(r.files) for r in reports])
    row("mean file score", [f(r.mean_file_score) for r in reports])
    for ns in sorted({ns for r in reports for ns in r.categories}):
        cats = [r.categories.get(ns) for r in reports]
        row(
            f"{ns}: P / R",
            [
                f"{f(c.at_thresholds.precision)} / {f(c.at_thresholds.recall)}" if c else "-"
                for c in cats
            ],
        )
        row(f"{ns}: F1", [f(c.at_thresholds.f1) if c else "-" for c in cats])
        row(
            f"{ns}: best F1 @ threshold",
            [f"{f(c.sweep.best_f1)} @ {f(c.sweep.best_f1_threshold)}" if c else "-" for c in cats],
        )
        row(f"{ns}: P = R @ threshold", [f(c.sweep.equal_pr_threshold) if c else "-" for c in cats])
    for r in reports:
        lines.append(
            f"[{r.model}] over-predicted: "
            + (", ".join(f"{t} ({n})" for t, n in r.over_predicted) or "none")
        )
        lines.append(
            f"[{r.model}] under-predicted: "
            + (", ".join(f"{t} ({n})" for t, n in r.under_predicted) or "none")
        )
    return "\n".join(lines)
