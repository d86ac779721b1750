"""`capfilt report OUTPUT`: one self-contained HTML page of what a run's filter did, to choose a threshold by
looking.

The page holds the run's settings and models, its counts (run and per shard, rejects by reason, failed shards
named), a histogram of each score with web and synthetic captions apart and the keep rule marked, a "what if"
curve of the captions and images each threshold keeps, and grids of samples (thumbnail, every caption with its
scores and decision): the best kept, the dropped, the borderline, the images whose web caption lost to a
synthetic one, and the rejects by reason.

It scales with the output: counts and histograms come from the run summary (the shards' histograms merged
exactly, and each shard's counts), and the grids from the first samples of a few shards drawn at random, found
by the names the summary holds. On any number of shards the report reads a fixed amount and lists nothing
(the summary of an older capfilt names no shards: then the output is listed once).

Dropped images: a run with `--keep-dropped` writes the dropped samples, images included, in OUT/.dropped/, and
the grids show them from there. Without it only their captions and scores are kept (NAME_dropped.jsonl), and
the page says so. The input is not read again: it may be gone, remote, or changed since the run.

Everything from the web (captions, keys, URLs, metadata) is escaped, the page has no script at all, and its
Content-Security-Policy allows only its own style sheet and `data:` images: nothing is fetched, nothing runs.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import itertools
import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fsspec import AbstractFileSystem

from capfilt.errors import CapfiltError, OutputError, one_line
from capfilt.formats import FORMATS
from capfilt.formats.base import Format, Shard
from capfilt.keep import KeepRule, KeepRules, KeepTop
from capfilt.output import DROPPED_DIR, LOCK_FILE, RUN_FILE, SUMMARY_FILE, held_by_a_run
from capfilt.paths import open_output, resolve_input
from capfilt.sample import Caption, Reject, Sample
from capfilt.schema import sample_from_dropped_record
from capfilt.stats import HISTOGRAM_BINS, RunSummary, dense, occupied_range, rebinned

REPORT_FILE = "report.html"
SAMPLED_SHARDS = 4  # shards whose first samples fill the grids
SAMPLES_PER_SHARD = 256
GRID_SIZE = 24
THUMBNAIL_SIDE = 128
SHARD_ROWS = 200  # shards listed by name; a larger run lists those that lost the most samples
PLOT_BINS = 50


def write_report(output: str, destination: str | None = None, storage_options: dict[str, Any] | None = None,
                 seed: int = 0) -> str:
    """Write the report of the capfilt output `output` to `destination` (default OUTPUT/report.html, on the
    output's filesystem when no destination is given) and return where it went."""
    fs, folder = open_output(output, storage_options)
    folder = folder.rstrip("/")
    settings, summary = read_run(fs, folder, output)
    page = render(output, settings, summary, sample_output(fs, folder, output, settings, summary, storage_options, seed))
    if destination is None:
        target, fs_target = f"{folder}/{REPORT_FILE}", fs
    else:
        fs_target, target = open_output(destination, storage_options)
    with fs_target.open(target, "w", encoding="utf-8") as handle:
        handle.write(page)
    return destination or f"{output.rstrip('/')}/{REPORT_FILE}"


def read_run(fs: AbstractFileSystem, folder: str, output: str) -> tuple[dict[str, Any], RunSummary]:
    """The run's recorded settings and summary, or a one-line error for a folder that holds no finished run."""
    if not fs.isdir(folder):
        raise OutputError(f"no output at {output}")
    if not fs.exists(f"{folder}/{RUN_FILE}"):
        raise OutputError(f"{output} is not a capfilt output ({RUN_FILE} is missing); report reads what a run wrote")
    if not fs.exists(f"{folder}/{SUMMARY_FILE}"):
        if held_by_a_run(fs, folder):
            raise OutputError(f"{output} is still being written (a run holds {LOCK_FILE}); report it when the run ends")
        raise OutputError(f"{output} has no run summary yet: its run stopped before the end (rerun its command to "
                          "finish it, or `capfilt summary` for a split job)")
    try:
        settings = json.loads(fs.cat_file(f"{folder}/{RUN_FILE}"))
        summary = RunSummary.from_record(json.loads(fs.cat_file(f"{folder}/{SUMMARY_FILE}")))
    except (ValueError, TypeError) as error:
        raise OutputError(f"{output}'s {RUN_FILE} or {SUMMARY_FILE} is unreadable: {error}") from error
    return settings, summary


@dataclass
class Sampled:
    """The first samples of the shards drawn for the grids."""

    shards: list[str] = field(default_factory=list)
    written: list[Sample] = field(default_factory=list)
    dropped: list[Sample] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    dropped_images: bool = False
    # Drawn shards that broke off while being read (the samples before the break are kept), and why.
    unreadable: dict[str, str] = field(default_factory=dict)


def sample_output(fs: AbstractFileSystem, folder: str, output: str, settings: dict[str, Any], summary: RunSummary,
                  storage_options: dict[str, Any] | None, seed: int) -> Sampled:
    """Up to SAMPLES_PER_SHARD samples of each kind from SAMPLED_SHARDS shards drawn at random (seeded)."""
    fmt, drawn = drawn_shards(fs, folder, output, settings, summary, storage_options, seed)
    found = Sampled(shards=[shard.name for shard in drawn], dropped_images=bool(settings.get("keep_dropped")))
    for shard in drawn:
        # A shard damaged since its run wrote it costs the page its samples, not the page.
        try:
            first_samples(fmt.read_shard(fs, shard, None), found.written)
            if found.dropped_images:
                first_samples(dropped_shard(fs, fmt, folder, shard.name), found.dropped)
            else:
                found.dropped += [sample_from_dropped_record(record) for record in
                                  first_records(fs, f"{folder}/{shard.name}_dropped.jsonl")]
            found.rejects += [Reject(r["key"], r["reason"], r.get("detail", "")) for r in
                              first_records(fs, f"{folder}/{shard.name}_rejects.jsonl")]
        except (CapfiltError, OSError, ValueError, KeyError) as error:
            found.unreadable[shard.name] = one_line(error)
    return found


def drawn_shards(fs: AbstractFileSystem, folder: str, output: str, settings: dict[str, Any], summary: RunSummary,
                 storage_options: dict[str, Any] | None, seed: int) -> tuple[Format | None, list[Shard]]:
    """The output's format and SAMPLED_SHARDS of its finished shards. The run summary names them, so no listing
    is needed; an older summary does not, and the output is listed."""
    rng = random.Random(seed)
    names = [name for name in summary.shard_counts if name not in summary.failed_shards]
    if not names:
        try:
            fs, fmt, shards = resolve_input(output, settings.get("output_format"), storage_options)
        except CapfiltError:  # a run that wrote no shard still has a page of counts
            return None, []
        finished = [shard for shard in shards if shard.name not in summary.failed_shards]
        return fmt, sorted(rng.sample(finished, min(SAMPLED_SHARDS, len(finished))), key=lambda shard: shard.name)
    drawn, fmt = [], None
    for name in rng.sample(names, len(names)):  # until enough exist: a shard that wrote nothing may leave no file
        fmt = fmt or shard_format(fs, folder, name)
        path = fmt.output_paths(folder, name)[0] if fmt else None
        if path and fs.exists(path):
            drawn.append(fmt.shard_from_path(path))
        if len(drawn) == SAMPLED_SHARDS:
            break
    return fmt, sorted(drawn, key=lambda shard: shard.name)


def shard_format(fs: AbstractFileSystem, folder: str, name: str) -> Format | None:
    """The format whose output shard `name` is in `folder` (tars first: a webdataset shard has a .parquet of
    metadata beside it)."""
    for fmt in FORMATS.values():
        if fs.exists(fmt.output_paths(folder, name)[0]):
            return fmt
    return None


def first_samples(items: Iterable[Sample | Reject], into: list[Sample]) -> None:
    """The first SAMPLES_PER_SHARD samples of `items` appended to `into` as they are read, so that those read
    before a break are kept."""
    for sample in itertools.islice((item for item in items if isinstance(item, Sample)), SAMPLES_PER_SHARD):
        into.append(sample)  # noqa: PERF402 (one by one: those read before a break are kept)


def dropped_shard(fs: AbstractFileSystem, fmt: Format, folder: str, name: str) -> Iterable[Sample | Reject]:
    path = fmt.output_paths(f"{folder}/{DROPPED_DIR}", name)[0]
    return fmt.read_shard(fs, fmt.shard_from_path(path), None) if fs.exists(path) else ()


def first_records(fs: AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    if not fs.exists(path):
        return []
    with fs.open(path, "r", encoding="utf-8") as handle:
        return [json.loads(line) for line in itertools.islice(handle, SAMPLES_PER_SHARD) if line.strip()]


# The page.


def e(value: Any) -> str:
    """Any text from the output, escaped for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}tr.failed td{background:#fde8e8}
.plots{display:flex;flex-wrap:wrap;gap:24px}.plot{border:1px solid #eee;padding:8px}
.bar.web{fill:#3b7dd8}.bar.synthetic{fill:#f08c2e}.rule{stroke:#c00;stroke-width:2}
.captions{stroke:#3b7dd8;fill:none;stroke-width:2}.images{stroke:#2a9d4b;fill:none;stroke-width:2}
.axis{stroke:#888}.label{font-size:11px;fill:#555}.key{font-size:12px}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure.sample{width:300px;margin:0;border:1px solid #ddd;padding:6px;overflow-wrap:anywhere}
figure.sample img{display:block;max-width:128px;max-height:128px}
figure.sample ul{padding-left:16px;margin:4px 0}li.kept{color:#176b2c}li.dropped{color:#a61b1b}
.source,.scores{color:#666;font-size:12px}.missing{background:#fff6d6;padding:6px}
"""


def render(output: str, settings: dict[str, Any], summary: RunSummary, sampled: Sampled) -> str:
    rules = KeepRules.parse(settings.get("keep") or (), settings.get("keep_best"))
    scores = list(summary.histograms) or list(summary.score_quantiles)
    main = rules.rules[0].score if rules.rules else (scores[0] if scores else None)
    missing = []
    if summary.score_quantiles and not summary.histograms:
        missing.append("score histograms and what-if curves (the run summary of an older capfilt keeps only "
                       "quantiles; rerun to get them)")
    if summary.shards and not summary.shard_counts:
        missing.append("per-shard counts (not in an older run summary)")
    parts = [
        f"<h1>capfilt report: {e(output)}</h1>",
        *(f'<p class="missing">Missing: {e(what)}.</p>' for what in missing),
        models_line(settings),
        section("Counts", counts_table(summary) + shards_table(summary)),
    ]
    if summary.histograms:
        marked, marks = rules.rules, "the keep rule"
        if not marked and summary.select_top:  # nothing judged: mark where each top fraction pending begins
            marked = tuple(map(KeepRule.parse, summary.marked_rules()))
            marks = ("where the top fraction the run is scored for begins, to the histogram's bin (capfilt select "
                     "finds it exactly)")
        plots = "".join(score_plots(name, summary, marked) for name in summary.histograms)
        parts.append(section("Scores", '<p>Histograms of every scored caption, web and synthetic apart, with '
                             f'{e(marks)} in red; what-if curves: the fraction of captions and of images (by their '
                             f'best caption) whose score is at least each threshold.</p><div class="plots">{plots}</div>'))
    elif summary.score_quantiles:
        parts.append(section("Scores", quantiles_table(summary)))
    parts.append(section("Samples", grids(sampled, main, rules.rules)))
    parts.append(section("Run settings", settings_table(settings)))
    body = "\n".join(parts)
    digest = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
    policy = f"default-src 'none'; img-src data:; style-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{policy}">\n'
            f'<title>capfilt report: {e(output)}</title>\n<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n')


def section(title: str, content: str) -> str:
    return f"<h2>{e(title)}</h2>\n{content}"


def models_line(settings: dict[str, Any]) -> str:
    """The run's command, models and rules, in one paragraph at the top (every setting is at the bottom)."""
    filters = ", ".join(f"{f['name']}={f['model']}" if f.get("name") else f["model"] for f in settings.get("filters") or [])
    parts = [("command", settings.get("command")), ("input", settings.get("input")),
             ("captioner", settings.get("captioner")), ("filters", filters),
             ("keep", " and ".join(settings.get("keep") or []) + (f" (best {settings['keep_best']})"
                                                                 if settings.get("keep_best") else "")),
             ("scored for", "; ".join(f"{KeepTop.parse(top).described()} (capfilt select keeps it)"
                                      for top in settings.get("keep_top") or [] if settings.get("command") != "select")),
             ("mode", settings.get("mode")), ("capfilt", settings.get("capfilt_version"))]
    return '<p id="models">' + "; ".join(f"<b>{e(what)}</b> {e(value)}" for what, value in parts if value) + "</p>"


def settings_table(settings: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{e(key)}</th><td>{e(json.dumps(value, ensure_ascii=False))}</td></tr>"
                   for key, value in settings.items() if value not in (None, [], {}, ""))
    return f'<table id="settings">{rows}</table>'


def counts_table(summary: RunSummary) -> str:
    rows = [("read", "read", summary.read), ("written", "written", summary.written),
            ("dropped by the filter", "dropped", summary.dropped), ("rejected", "rejected", summary.rejected)]
    rows += [(f"rejected: {reason}", f"rejected:{reason}", count) for reason, count in summary.reject_reasons.items()]
    rows += [("synthetic captions added", "synthetic_captions_added", summary.synthetic_captions_added),
             ("captions scored", "captions_scored", summary.captions_scored),
             ("captions kept", "captions_kept", summary.captions_kept),
             ("web captions kept", "web_captions_kept", summary.web_captions_kept),
             ("shards", "shards", summary.shards)]
    rows += [(f"{name}: captions truncated to the filter's text limit", f"truncated:{name}", count)
             for name, count in summary.captions_truncated.items()]
    cells = "".join(f'<tr><th>{e(what)}</th><td class="n" data-count="{e(key)}">{count}</td></tr>'
                    for what, key, count in rows)
    return f'<table id="counts">{cells}</table>'


def shards_table(summary: RunSummary) -> str:
    names = list(summary.shard_counts)
    note = ""
    if len(names) > SHARD_ROWS:  # the failed ones, then those that lost the largest share of their samples
        def lost(name: str) -> float:
            read, _, dropped, rejected = summary.shard_counts[name]
            return (dropped + rejected) / read if read else 0.0

        names = sorted(names, key=lambda name: (name not in summary.failed_shards, -lost(name)))[:SHARD_ROWS]
        note = (f"<p>{SHARD_ROWS} of {len(summary.shard_counts)} shards: the failed ones, then those that dropped or "
                "rejected the largest share of their samples.</p>")
    rows = []
    for name in names:
        read, written, dropped, rejected = summary.shard_counts[name]
        error = summary.failed_shards.get(name)
        failed = ' class="failed"' if error else ""
        rows.append(f'<tr data-shard="{e(name)}"{failed}><td>{e(name)}</td>'
                    f'<td class="n">{read}</td><td class="n">{written}</td><td class="n">{dropped}</td>'
                    f'<td class="n">{rejected}</td><td>{e(error or "")}</td></tr>')
    failed = "".join(f"<li>{e(name)}: {e(error)}</li>" for name, error in summary.failed_shards.items())
    failed_list = f'<p>Failed shards:</p><ul id="failed-shards">{failed}</ul>' if failed else ""
    head = "<tr><th>shard</th><th>read</th><th>written</th><th>dropped</th><th>rejected</th><th>error</th></tr>"
    return f'{failed_list}{note}<table id="shards">{head}{"".join(rows)}</table>'


def quantiles_table(summary: RunSummary) -> str:
    rows = "".join(f"<tr><th>{e(name)}</th>" + "".join(f"<td>{e(q)} {value:.3f}</td>" for q, value in quantiles.items())
                   + "</tr>" for name, quantiles in summary.score_quantiles.items())
    return f'<table id="quantiles">{rows}</table>'


# Plots: inline SVG, drawn here (the page runs no script).

WIDTH, HEIGHT, MARGIN = 420, 200, 36


def score_plots(name: str, summary: RunSummary, rules: tuple[KeepRule, ...]) -> str:
    low, high = summary.score_ranges.get(name, (0.0, 1.0))
    every = dense(summary.histograms[name])
    web = dense(summary.web_histograms.get(name, {}))
    best = dense(summary.best_histograms.get(name, {}))
    thresholds = [rule for rule in rules if rule.score == name]
    first, last = occupied_range(every, low, high, [rule.value for rule in thresholds])
    width = (high - low) / HISTOGRAM_BINS

    def x(value: float) -> float:
        start, end = low + first * width, low + last * width
        return MARGIN + (WIDTH - 2 * MARGIN) * (value - start) / (end - start)

    rule_lines = "".join(
        f'<line class="rule" x1="{x(rule.value):.1f}" x2="{x(rule.value):.1f}" y1="{MARGIN / 2}" '
        f'y2="{HEIGHT - MARGIN}"><title>{e(rule)}</title></line>'
        f'<text class="label" x="{x(rule.value) + 3:.1f}" y="{MARGIN / 2 + 10}">{e(rule)}</text>'
        for rule in thresholds if low <= rule.value <= high)
    axis = (f'<line class="axis" x1="{MARGIN}" x2="{WIDTH - MARGIN}" y1="{HEIGHT - MARGIN}" y2="{HEIGHT - MARGIN}"/>'
            f'<text class="label" x="{MARGIN}" y="{HEIGHT - MARGIN + 14}">{low + first * width:.3g}</text>'
            f'<text class="label" x="{WIDTH - MARGIN - 24}" y="{HEIGHT - MARGIN + 14}">{low + last * width:.3g}</text>')
    # Histogram: PLOT_BINS bars over the occupied range, web stacked under synthetic.
    edges = np.linspace(first, last, PLOT_BINS + 1).round().astype(int)
    web_bars, all_bars = rebinned(web, edges), rebinned(every, edges)
    synthetic_bars = np.maximum(all_bars - web_bars, 0)
    tallest = max(int(all_bars.max()), 1)
    plot_height = HEIGHT - 1.5 * MARGIN
    bars = []
    for (a, b), web_count, synthetic_count in zip(itertools.pairwise(edges), web_bars, synthetic_bars):
        left, right = x(low + a * width), x(low + b * width)
        base = HEIGHT - MARGIN
        for kind, count in (("web", web_count), ("synthetic", synthetic_count)):
            if count:
                height = plot_height * count / tallest
                base -= height
                bars.append(f'<rect class="bar {kind}" x="{left:.1f}" y="{base:.1f}" width="{max(right - left - 1, 1):.1f}" '
                            f'height="{height:.1f}"><title>{kind}: {int(count)}</title></rect>')
    legend = (f'<text class="key" x="{MARGIN}" y="12">{e(name)}: {int(web.sum())} web (blue), '
              f'{int(every.sum() - web.sum())} synthetic (orange)</text>'
              f'<text class="label" x="2" y="{MARGIN / 2 + 10}">{tallest}</text>')
    histogram = (f'<svg class="histogram" data-score="{e(name)}" width="{WIDTH}" height="{HEIGHT}" '
                 f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img">{legend}{"".join(bars)}{axis}{rule_lines}</svg>')
    # What if: the share of captions, and of images by their best caption, at or above each threshold.
    thresholds_at = np.arange(first, last + 1)
    captions_above = suffix_shares(every)[thresholds_at]
    images_above = suffix_shares(best)[thresholds_at]

    def polyline(kind: str, shares: np.ndarray) -> str:
        points = " ".join(f"{x(low + t * width):.1f},{HEIGHT - MARGIN - plot_height * share:.1f}"
                          for t, share in zip(thresholds_at, shares))
        return f'<polyline class="{kind}" points="{points}"/>'

    kept_now = "".join(
        f'<text class="label" x="{MARGIN}" y="{HEIGHT - 4}">at {e(rule)}: {share_at(every, low, width, rule.value):.1%} '
        f'of captions, {share_at(best, low, width, rule.value):.1%} of images</text>' for rule in thresholds[:1])
    whatif = (f'<svg class="whatif" data-score="{e(name)}" width="{WIDTH}" height="{HEIGHT}" '
              f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img"><text class="key" x="{MARGIN}" y="12">{e(name)} &#8805; '
              f'threshold: captions kept (blue), images kept (green)</text>{polyline("captions", captions_above)}'
              f'{polyline("images", images_above)}{axis}{rule_lines}{kept_now}</svg>')
    return f'<div class="plot">{histogram}</div><div class="plot">{whatif}</div>'


def suffix_shares(counts: np.ndarray) -> np.ndarray:
    """For each fine bin edge t (0..HISTOGRAM_BINS), the share of the counts in bins t and above."""
    total = max(int(counts.sum()), 1)
    return np.append(np.cumsum(counts[::-1])[::-1], 0) / total


def share_at(counts: np.ndarray, low: float, width: float, threshold: float) -> float:
    edge = int(np.clip(np.ceil((threshold - low) / width - 1e-9), 0, HISTOGRAM_BINS))
    return float(suffix_shares(counts)[edge])


# Sample grids.


def main_score(caption: Caption, name: str | None) -> float | None:
    value = caption.scores.get(name) if name else None
    return None if value is None or math.isnan(value) else value


def best_score(sample: Sample, name: str | None, kept_only: bool = False) -> float:
    values = [main_score(c, name) for c in sample.captions() if c.kept or not kept_only]
    return max((v for v in values if v is not None), default=float("-inf"))


def grids(sampled: Sampled, name: str | None, rules: tuple[KeepRule, ...]) -> str:
    if not sampled.shards:
        return "<p>No shard to draw samples from.</p>"
    written = sampled.written
    drawn = (f"<p>From the first {SAMPLES_PER_SHARD} samples of each of {len(sampled.shards)} shard(s) drawn at "
             f"random: {e(', '.join(sampled.shards))}.</p>")
    unreadable = "".join(f"<li>{e(name)}: {e(error)}</li>" for name, error in sampled.unreadable.items())
    if unreadable:
        drawn += f'<p>Shards that broke off while the report read them:</p><ul id="unreadable-shards">{unreadable}</ul>'
    if written and not sampled.dropped and all(c.kept is None for s in written for c in s.captions()):
        # A run that judged nothing (captioning only, or scoring for `select --keep-top`): samples by score.
        if name is None:
            return "\n".join([drawn, grid("samples", "Samples", written[:GRID_SIZE], name), rejects_grid(sampled.rejects)])
        ranked = sorted(written, key=lambda s: best_score(s, name), reverse=True)
        return "\n".join([drawn, '<p id="not-judged">This run judged no caption: it scored them.</p>',
                          grid("highest", f"Highest by {name}", ranked[:GRID_SIZE], name),
                          grid("lowest", f"Lowest by {name}", ranked[::-1][:GRID_SIZE], name),
                          rejects_grid(sampled.rejects)])
    rng = random.Random(0)
    unkept = [s for s in written if not any(c.kept for c in s.captions())]  # annotate mode writes these too
    kept = [s for s in written if s not in unkept]
    dropped = sampled.dropped + unkept
    threshold = next((rule.value for rule in rules if rule.score == name), None)

    def distance(sample: Sample) -> float:
        values = [main_score(c, name) for c in sample.captions()]
        return min((abs(v - threshold) for v in values if v is not None), default=float("inf"))

    best = sorted(kept, key=lambda s: best_score(s, name, kept_only=True), reverse=True)
    borderline = sorted(kept + dropped, key=distance) if threshold is not None else []
    web_lost = [s for s in kept if s.web_caption is not None and s.web_kept is False
                and any(c.kept for c in s.synthetic_captions)]
    source = ("Dropped samples are shown with their images from OUTPUT/.dropped/, written by --keep-dropped."
              if sampled.dropped_images else
              "Dropped samples are shown from NAME_dropped.jsonl, captions and scores only: their images are not "
              "kept. Run with --keep-dropped to keep them (in OUTPUT/.dropped/) and see them here.")
    parts = [drawn, f'<p id="dropped-source">{e(source)}</p>',
             grid("best", f"Best kept, by {name}", best[:GRID_SIZE], name),
             grid("dropped", "Dropped", rng.sample(dropped, min(GRID_SIZE, len(dropped))), name),
             grid("borderline", f"Borderline: closest to {name} = {threshold}" if threshold is not None else
                  "Borderline (no rule on a threshold)", borderline[:GRID_SIZE], name),
             grid("web-lost", "Web caption dropped, a synthetic one kept", web_lost[:GRID_SIZE], name),
             rejects_grid(sampled.rejects)]
    return "\n".join(parts)


def grid(grid_id: str, title: str, samples: list[Sample], name: str | None) -> str:
    figures = "".join(figure(sample) for sample in samples) or "<p>None among the samples drawn.</p>"
    return f'<h3>{e(title)} ({len(samples)})</h3><section class="grid" id="{grid_id}">{figures}</section>'


def figure(sample: Sample) -> str:
    image = thumbnail(sample.image_bytes)
    picture = (f'<img class="thumb" alt="{e(sample.key)}" src="data:image/jpeg;base64,{image}">' if image else
               '<p class="source">(no image kept)</p>' if sample.image_bytes is None else
               '<p class="source">(image unreadable)</p>')
    items = []
    for caption in sample.captions():
        decision = "kept" if caption.kept else "dropped"
        values = " · ".join(f"{e(score)} {value:.3f}" for score, value in caption.scores.items()
                            if value is not None and not math.isnan(value))
        items.append(f'<li class="caption {decision}"><span class="text">{e(caption.text)}</span> '
                     f'<span class="source">({caption.source}, {decision})</span> '
                     f'<span class="scores">{values}</span></li>')
    url = sample.metadata.get("url") if isinstance(sample.metadata, dict) else None
    link = f'<div class="source">{e(url)}</div>' if url else ""
    return (f'<figure class="sample" data-key="{e(sample.key)}">{picture}<figcaption>{e(sample.key)}{link}'
            f'<ul>{"".join(items) or "<li>(no caption)</li>"}</ul></figcaption></figure>')


def thumbnail(image_bytes: bytes | None) -> str | None:
    """A JPEG thumbnail, base64-encoded, or None for no image or one PIL cannot read."""
    if not image_bytes:
        return None
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            if image.width * image.height > 200_000_000:  # a decompression bomb: the run rejected it anyway
                return None
            picture = ImageOps.exif_transpose(image).convert("RGB")
            picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            buffer = io.BytesIO()
            picture.save(buffer, "JPEG", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return base64.b64encode(buffer.getvalue()).decode()


def rejects_grid(rejects: list[Reject]) -> str:
    by_reason: dict[str, list[Reject]] = {}
    for reject in rejects:
        by_reason.setdefault(reject.reason, []).append(reject)
    figures = "".join(
        f'<figure class="sample reject" data-key="{e(r.key)}" data-reason="{e(reason)}"><figcaption>{e(r.key)}: '
        f'<b>{e(reason)}</b> <span class="source">{e(r.detail)}</span></figcaption></figure>'
        for reason, group in sorted(by_reason.items()) for r in group[:GRID_SIZE])
    return (f'<h3>Rejected, by reason ({len(rejects)})</h3><section class="grid" id="rejects">'
            f'{figures or "<p>None among the samples drawn.</p>"}</section>')
