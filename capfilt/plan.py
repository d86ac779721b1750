"""Plans a run before any shard: which scores each filter computes under which name, the keep rules (given,
or the filters' families' defaults) checked against those scores, and for `select` the scores an earlier run
wrote and the thresholds of `--keep-top` over the whole input.

Filter families are looked up from their checkpoints' configs (no weights load), so that a rule on a score
no filter computes is refused in one line before a model loads.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from capfilt.config import Command, RunConfig
from capfilt.errors import ConfigError, InputError
from capfilt.keep import KeepRule, KeepRules, KeepTop, top_threshold
from capfilt.output import RUN_FILE
from capfilt.schema import SYNTHETIC, WEB_CAPTION, score_field, web_score_field
from capfilt.scores import Score, run_scores
from capfilt.worker import Locations


@dataclass(frozen=True)
class Plan:
    """A run's config with every filter's `computes` and the keep rules filled in, and the scores its output
    holds (those it computes and those its input already had), by name."""

    config: RunConfig
    scores: dict[str, Score]

    def record(self) -> dict[str, object]:
        return {name: score.record() for name, score in self.scores.items()}


def plan(config: RunConfig, locations: Locations) -> Plan:
    recorded = input_run_record(locations)
    inherited = {name: Score.from_record(name, record) for name, record in (recorded or {}).get("scores", {}).items()}
    if config.command is Command.select:
        return _plan_select(config, locations, recorded, inherited)
    if not config.filters:
        return Plan(config, inherited)
    from capfilt.models import filter_family  # only a run with filters waits for transformers

    families = [filter_family(f.model) for f in config.filters]
    named = [run_scores(family.scores, spec.name) for spec, family in zip(config.filters, families)]
    computable: dict[str, Score] = {}
    owners: dict[str, str] = {}
    for spec, scores in zip(config.filters, named):
        for score in scores.values():
            if score.name in computable:
                raise ConfigError(f"two filters compute a score named '{score.name}' ({owners[score.name]} and "
                                  f"{spec.model}); name one with --filter NAME=MODEL")
            computable[score.name], owners[score.name] = score, spec.model
    keep = config.keep
    tops = [KeepTop.parse(top) for top in config.keep_top]
    if keep is None and not tops:  # each family's own default rules, under the names this run gives its scores
        keep = tuple(str(replace(rule, score=scores[rule.score].name)) for family, scores in zip(families, named)
                     for rule in map(KeepRule.parse, family.default_keep))
    # A run scored for top fractions judges nothing (keep stays None: no keep stage); `select` applies them.
    rules = KeepRules.parse(keep or (), config.keep_best if keep is not None else None)
    rules.check(computable, "the run's filters compute")
    named_elsewhere = [("--scores", name) for name in config.extra_scores] + [("keep_top", top.score) for top in tops]
    for where, name in named_elsewhere:
        if name not in computable:
            raise ConfigError(f"{where} names '{name}', which the run's filters do not compute; they compute: "
                              f"{', '.join(computable)}")
    wanted = {rule.score for rule in rules.rules} | set(config.extra_scores) | {top.score for top in tops}
    filters = tuple(
        replace(spec, computes=tuple(name for name, score in scores.items()
                                     if name in family.default_scores or score.name in wanted))
        for spec, family, scores in zip(config.filters, families, named)
    )
    computed = {score.name: score for spec, scores in zip(filters, named) for name, score in scores.items()
                if name in spec.computes}
    return Plan(replace(config, filters=filters, keep=keep), {**inherited, **computed})


def input_run_record(locations: Locations) -> dict | None:
    if not locations.shards:
        return None
    path = f"{input_folder(locations)}/{RUN_FILE}"
    try:
        return json.loads(locations.fs_in.cat_file(path))
    except (OSError, ValueError):
        return None


def input_folder(locations: Locations) -> str:
    return posixpath.dirname(locations.shards[0].path.rstrip("/"))


def _plan_select(config: RunConfig, locations: Locations, recorded: dict | None,
                 inherited: dict[str, Score]) -> Plan:
    if recorded is None:
        raise InputError(f"{config.input} holds no capfilt output ({RUN_FILE} is missing): select re-applies keep "
                         "rules to the scores a run wrote, e.g. with --mode annotate")
    keep, best, keep_top = config.keep, config.keep_best, config.keep_top
    if keep is None and not keep_top:  # no rule given: the rules the run recorded, or the top fractions it was
        # scored for (an earlier select has turned its own into rules already)
        keep, best = tuple(recorded.get("keep") or ()), recorded.get("keep_best") if best is None else best
        keep_top = tuple(recorded.get("keep_top") or ()) if recorded.get("command") != "select" else ()
    rules = KeepRules.parse(keep or (), None)
    rules.check(inherited, "the input has")
    tops = [KeepTop.parse(top) for top in keep_top]
    for top in tops:
        if top.score not in inherited:
            raise ConfigError(f"--keep-top uses the score '{top.score}', which the input has not; scores the input "
                              f"has: {', '.join(inherited) or 'none'}")
    thresholds = whole_input_thresholds(locations, tops)
    keep = tuple(keep or ()) + tuple(f"{top.score}>={thresholds[top.score]!r}" for top in tops)
    KeepRules.parse(keep, best)
    return Plan(replace(config, keep=keep, keep_best=best, keep_top=keep_top), inherited)


def whole_input_thresholds(locations: Locations, tops: list[KeepTop]) -> dict[str, float]:
    """For each `--keep-top NAME:FRACTION`, the score value at which the top FRACTION of the input's captions
    start: one pass over the scores in the metadata Parquet beside each shard (or the shard itself, when it is
    Parquet), reading only the score columns."""
    values: dict[str, list[float]] = {top.score: [] for top in tops}
    for table in _score_tables(locations, list(values)):
        for name in values:
            values[name] += _caption_scores(table, name)
    thresholds = {}
    for top in tops:
        threshold = top_threshold(values[top.score], top.fraction)
        if threshold is None:
            raise InputError(f"--keep-top {top}: the input holds no '{top.score}' score")
        thresholds[top.score] = threshold
    return thresholds


def _score_tables(locations: Locations, names: list[str]) -> Iterator:
    fs: AbstractFileSystem = locations.fs_in
    for shard in locations.shards:
        path = shard.path if shard.path.endswith(".parquet") else f"{input_folder(locations)}/{shard.name}.parquet"
        if not fs.exists(path):
            raise InputError(f"{path} is missing: select reads the scores from the metadata Parquet capfilt writes "
                             "beside each shard (rerun the scoring run with this capfilt)")
        with fs.open(path, "rb") as handle:
            available = set(pq.read_schema(handle).names)
            handle.seek(0)
            columns = [c for name in names for c in (WEB_CAPTION, web_score_field(name), SYNTHETIC) if c in available]
            yield pq.read_table(handle, columns=sorted(set(columns)))


def _caption_scores(table, name: str) -> list[float]:
    """Every caption's `name` score in the table: web captions' column and each synthetic caption's field,
    each text of an image once (a synthetic caption equal to the web caption is scored once)."""
    values: list[float] = []
    columns = {name: table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
               for name in (WEB_CAPTION, web_score_field(name), SYNTHETIC)}
    field = score_field(name)
    for web_text, web_value, records in zip(*columns.values()):
        by_text = {} if web_value is None else {web_text: web_value}
        for record in records or []:
            if record.get(field) is not None:
                by_text.setdefault(record["text"], record[field])
        values += by_text.values()
    return values
