"""Read back what a run wrote, for `capfilt show`: written samples from the shards, dropped ones from the
`NAME_dropped.jsonl` lists beside them."""

from __future__ import annotations

import itertools
import json
from typing import Any

from capfilt.paths import resolve_input
from capfilt.sample import Sample
from capfilt.schema import sample_from_dropped_record


def read_output_samples(output: str, limit: int, storage_options: dict[str, Any]) -> tuple[list[Sample], list[Sample]]:
    fs, fmt, shards = resolve_input(output, None, storage_options)
    written: list[Sample] = []
    for shard in shards:
        items = fmt.read_shard(fs, shard, None)
        written += itertools.islice((s for s in items if isinstance(s, Sample)), limit - len(written))
        if len(written) >= limit:
            break
    dropped: list[Sample] = []
    for path in sorted(fs.glob(f"{output.rstrip('/')}/*_dropped.jsonl")):
        with fs.open(path, "r", encoding="utf-8") as handle:
            for line in itertools.islice(handle, limit - len(dropped)):
                dropped.append(sample_from_dropped_record(json.loads(line)))
        if len(dropped) >= limit:
            break
    return written, dropped
