"""capfilt report, --keep-dropped and the histograms behind them, on real runs of the demo models (the page in a
real browser: tests/test_report_browser.py)."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem
from typer.testing import CliRunner

import capfilt
from capfilt.cli import app
from capfilt.demo.tiny_clip import build_tiny_clip
from capfilt.errors import OutputError
from capfilt.formats import FORMATS
from capfilt.formats.base import Format
from capfilt.output import SUMMARY_FILE, OutputDirectory
from capfilt.progress import histogram_rows
from capfilt.report import SAMPLED_SHARDS, write_report
from capfilt.stats import HISTOGRAM_BINS, RunSummary
from tests.conftest import shape_items
from tests.datasets import write_webdataset_shards

EVIL = ['<script>window.__pwned=1</script>', '<img src=x onerror="window.__pwned=1">']


class Tags(HTMLParser):
    """Every start tag of a page with its attributes, and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> Tags:
    tags = Tags()
    tags.feed(page)
    return tags


def run_bootstrap(tmp_path, items, broken_shard: bool = False, **options) -> RunSummary:
    write_webdataset_shards(tmp_path / "in", items, samples_per_shard=6)
    if broken_shard:  # a shard that is not a tar: it fails alone, and the summary names it
        (tmp_path / "in" / "00009.tar").write_bytes(b"not a tar archive" * 40)
    # The demo models: trained on shapes, they keep some captions and drop others, as a real filter does.
    settings = {"preset": "demo", "batch_size": 4, "device": "cpu", "dtype": "fp32", "num_captions": 2, "keep": ["itm>=0.5"]}
    return capfilt.run(str(tmp_path / "in"), str(tmp_path / "out"), "bootstrap", **(settings | options))


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """A bootstrap run over 3 shards, one sample with a corrupt image, one with untrusted captions, with
    --keep-dropped and --report."""
    tmp_path = tmp_path_factory.mktemp("report")
    items = shape_items(18)
    items[2] = (items[2][0], b"not an image", "a corrupt picture", {})
    items[4] = (items[4][0], items[4][1], EVIL[0], {"url": '"><svg onload="window.__pwned=1">'})
    items[5] = (items[5][0], items[5][1], EVIL[1], {})
    summary = run_bootstrap(tmp_path, items, broken_shard=True, keep_dropped=True, report=True)
    return tmp_path / "out", summary


def test_the_report_shows_the_runs_counts_histograms_and_samples(reported):
    out, summary = reported
    page = (out / "report.html").read_text()
    tags = parse(page)
    counts = {attrs["data-count"]: "" for tag, attrs in tags.tags if "data-count" in attrs}
    assert {"read", "written", "dropped", "rejected"} <= set(counts)
    for name in ("read", "written", "dropped", "rejected"):
        assert f'data-count="{name}">{getattr(summary, name)}<' in page
    assert summary.reject_reasons == {"undecodable_image": 1} and 'data-count="rejected:undecodable_image"' in page
    assert summary.dropped > 0 and summary.written > 0
    # Each shard's counts, the failed one named with its error.
    assert list(summary.failed_shards) == ["00009"]
    assert '<tr data-shard="00009" class="failed">' in page and 'id="failed-shards"' in page
    assert all(f'<tr data-shard="{name}">' in page for name in ("00000", "00001", "00002"))
    # One histogram and one what-if curve per score, with bars and the rule drawn.
    assert [attrs["data-score"] for tag, attrs in tags.tags if tag == "svg" and attrs.get("class") == "histogram"] == ["itm"]
    assert any(tag == "rect" and "bar" in (attrs.get("class") or "") for tag, attrs in tags.tags)
    assert any(tag == "line" and attrs.get("class") == "rule" for tag, attrs in tags.tags)
    assert sum(tag == "polyline" for tag, _ in tags.tags) == 2
    # Thumbnails are data: URIs; the dropped grid shows the dropped samples' images, from OUT/.dropped.
    images = [attrs["src"] for tag, attrs in tags.tags if tag == "img"]
    assert images and all(src.startswith("data:image/jpeg;base64,") for src in images)
    assert "from OUTPUT/.dropped/" in page
    grid_ids = [attrs["id"] for tag, attrs in tags.tags if tag == "section"]
    assert grid_ids == ["best", "dropped", "borderline", "web-lost", "rejects"]


def test_untrusted_text_is_escaped_and_the_page_runs_and_fetches_nothing(reported):
    out, _ = reported
    page = (out / "report.html").read_text()
    tags = parse(page)
    assert not any(tag == "script" for tag, _ in tags.tags)
    assert not any(name.startswith("on") for _, attrs in tags.tags for name in attrs)
    text = "".join(tags.text)
    assert EVIL[0] in text and EVIL[1] in text  # shown as text
    assert '"><svg onload="window.__pwned=1">' in text
    policy = next(attrs["content"] for tag, attrs in tags.tags if attrs.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in policy and "img-src data:" in policy and "script-src" not in policy
    # Nothing to fetch: every resource is a data: URI, and nothing links anywhere.
    assert all(attrs["src"].startswith("data:") for _, attrs in tags.tags if "src" in attrs)
    assert not any("href" in attrs for _, attrs in tags.tags)


def test_the_summary_merges_the_shards_histograms_exactly(reported):
    out, summary = reported
    stats = [json.loads(path.read_text()) for path in sorted(out.glob("*_stats.json"))]
    for kind in ("histograms", "web_histograms", "best_histograms"):
        merged = Counter()
        for shard in stats:
            merged.update(shard[kind].get("itm", {}))  # the failed shard has none
        assert {int(k): v for k, v in getattr(summary, kind)["itm"].items()} == {int(k): v for k, v in merged.items()}
    assert sum(summary.histograms["itm"].values()) == summary.captions_scored
    # One best caption per image that has a caption; the web histogram holds the web captions alone.
    records = []
    for path in sorted(out.glob("*.tar")) + sorted((out / ".dropped").glob("*.tar")):
        with tarfile.open(path) as tar:
            records += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    with_captions = [r for r in records if r.get("caption") is not None or r["synthetic_captions"]]
    assert sum(summary.best_histograms["itm"].values()) == len(with_captions)
    assert sum(summary.web_histograms["itm"].values()) == sum(r.get("web_itm_score") is not None for r in records)
    assert summary.shard_counts == {s["shard"]: [s["read"], s["written"], s["dropped"], s["rejected"]] for s in stats}


def test_keep_dropped_writes_every_dropped_sample_with_its_image(reported):
    out, summary = reported
    dropped_keys = [json.loads(line)["key"] for path in sorted(out.glob("*_dropped.jsonl"))
                    for line in path.read_text().splitlines()]
    members = []
    for path in sorted((out / ".dropped").glob("*.tar")):
        with tarfile.open(path) as tar:
            members += tar.getnames()
    assert len(dropped_keys) == summary.dropped > 0
    assert sorted(name.rsplit(".", 1)[0] for name in members if name.endswith(".jpg")) == sorted(dropped_keys)
    # Beside each output shard (the broken one's too: what was read before the break is kept), its dropped ones.
    written = sorted(path.name for path in out.iterdir() if path.suffix in (".tar", ".parquet"))
    assert sorted(os.listdir(out / ".dropped")) == written and "00000.tar" in written
    # Loaders reading the output never see them: capfilt lists the output's own shards only.
    found = capfilt.paths.resolve_input(str(out))[2]
    assert [shard.name + ".tar" for shard in found] == [name for name in written if name.endswith(".tar")]


def test_overwrite_removes_the_dropped_shards_too(tmp_path):
    run_bootstrap(tmp_path, shape_items(6), keep_dropped=True)
    assert (tmp_path / "out" / ".dropped" / "00000.tar").exists()
    run_bootstrap(tmp_path, shape_items(6), overwrite=True)
    assert not (tmp_path / "out" / ".dropped" / "00000.tar").exists()


def test_the_report_reads_a_bounded_number_of_shards(tmp_path, monkeypatch):
    """The grids come from SAMPLED_SHARDS shards however many there are; counts come from the summary."""
    summary = run_bootstrap(tmp_path, shape_items(40), batch_size=8)
    assert summary.shards == 7
    read: list[str] = []
    original = Format.read_shard

    def counted(self, fs, shard, *args, **kwargs):
        read.append(shard.name)
        return original(self, fs, shard, *args, **kwargs)

    monkeypatch.setattr(Format, "read_shard", counted)
    page = (tmp_path / "report.html")
    write_report(str(tmp_path / "out"), str(page))
    assert len(set(read)) == SAMPLED_SHARDS
    assert f'data-count="read">{summary.read}<' in page.read_text()


def test_not_an_output_an_unfinished_one_and_an_old_one(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(OutputError, match="not a capfilt output"):
        write_report(str(tmp_path / "plain"))
    run_bootstrap(tmp_path, shape_items(6))
    out = tmp_path / "out"
    summary_file = out / "capfilt_summary.json"
    record = json.loads(summary_file.read_text())
    summary_file.unlink()
    directory = OutputDirectory(LocalFileSystem(), str(out), FORMATS["webdataset"])
    directory.lock()  # as a live run holds it
    with pytest.raises(OutputError, match="still being written"):
        write_report(str(out))
    directory.unlock()
    (out / "capfilt.lock").write_text("pid 1 on host\n")  # what a killed run leaves: a file no one holds
    with pytest.raises(OutputError, match="no run summary yet"):
        write_report(str(out))
    # A summary of an older capfilt: quantiles, no histograms, no shard counts.
    old = {key: value for key, value in record.items()
           if key not in ("histograms", "web_histograms", "best_histograms", "score_ranges", "shard_counts", "keep")}
    summary_file.write_text(json.dumps(old))
    page = (out / "report.html")
    write_report(str(out))
    text = page.read_text()
    assert "Missing: score histograms" in text and "Missing: per-shard counts" in text
    assert 'id="quantiles"' in text and f'data-count="read">{record["read"]}<' in text


def test_the_cli_writes_the_report_where_asked_and_fails_in_one_line(tmp_path):
    run_bootstrap(tmp_path, shape_items(6))
    result = CliRunner().invoke(app, ["report", str(tmp_path / "out"), "-o", str(tmp_path / "page.html")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "page.html").read_text().startswith("<!DOCTYPE html>")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "in")])
    assert result.exit_code == 2 and "not a capfilt output" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_end_of_run_summary_draws_the_main_score(tmp_path):
    from rich.console import Console

    from capfilt.progress import summary_table

    summary = run_bootstrap(tmp_path, shape_items(12))
    console = Console(width=120, record=True)
    console.print(summary_table(summary))
    text = console.export_text()
    assert "itm histogram" in text and "▲ itm>=0.5" in text
    marker_line = next(line for line in text.splitlines() if "▲ itm>=0.5" in line)
    assert marker_line.count("▲") == 2  # the label's and the mark under the threshold's column


def test_a_shard_damaged_since_the_run_costs_the_page_its_samples_only(reported, tmp_path):
    """A drawn shard that breaks off while the report reads it: the page is written, keeps the samples read
    before the break and names the shard."""
    out = tmp_path / "out"
    shutil.copytree(reported[0], out)
    tar = out / "00001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # cut mid-member
    page = Path(write_report(str(out))).read_text()
    assert 'id="unreadable-shards"' in page and "<li>00001: " in page
    assert f'data-count="read">{reported[1].read}<' in page


def test_a_run_that_judged_nothing_shows_its_samples_by_score_and_what_it_is_scored_for(tmp_path):
    """A `datacomp`-like preset scores every pair and leaves the top fraction to select: the page has no
    "dropped" grid (nothing was dropped) but the highest and lowest scored samples, and says what is pending."""
    clip = build_tiny_clip(tmp_path / "clip", seed=0)
    preset = tmp_path / "top.toml"
    preset.write_text(f'description = "top 30% by CLIP"\nfilters = ["{clip}"]\nkeep_top = ["clip:0.3"]\n')
    write_webdataset_shards(tmp_path / "in", shape_items(8), samples_per_shard=4)
    capfilt.run(str(tmp_path / "in"), str(tmp_path / "out"), "filter", preset=str(preset), device="cpu",
                dtype="fp32", report=True)
    page = (tmp_path / "out" / "report.html").read_text()
    tags = parse(page)
    assert [attrs["id"] for tag, attrs in tags.tags if tag == "section"] == ["highest", "lowest", "rejects"]
    assert "<b>scored for</b> the top 30% by clip (capfilt select keeps it)" in page
    assert [attrs["data-score"] for tag, attrs in tags.tags if tag == "svg" and attrs.get("class") == "histogram"] == ["clip"]
    # The red line: where the top 30% begins, from the merged histogram, within a bin of what select finds.
    [marked] = {text for text in tags.text if text.startswith("clip>=")}  # the line's title and label
    summary = RunSummary.from_record(json.loads((tmp_path / "out" / SUMMARY_FILE).read_text()))
    low, high = summary.score_ranges["clip"]
    selected = capfilt.run(str(tmp_path / "out"), str(tmp_path / "top"), "select")
    [exact] = [rule for rule in selected.keep if rule.startswith("clip>=")]
    assert float(marked.removeprefix("clip>=")) == pytest.approx(float(exact.removeprefix("clip>=")),
                                                                 abs=(high - low) / HISTOGRAM_BINS + 1e-4)
    # The end-of-run table marks the same place under its text histogram.
    assert histogram_rows(summary)[1][0].endswith(f"▲ {marked}")


def test_a_caption_runs_report_shows_its_samples_not_dropped_ones(tmp_path):
    """A caption run judges nothing and drops nothing: its page shows the samples with their new captions."""
    write_webdataset_shards(tmp_path / "in", shape_items(6), samples_per_shard=3)
    capfilt.run(str(tmp_path / "in"), str(tmp_path / "out"), "caption", preset="demo", batch_size=4, device="cpu",
                dtype="fp32", num_captions=2, report=True)
    tags = parse((tmp_path / "out" / "report.html").read_text())
    assert [attrs["id"] for tag, attrs in tags.tags if tag == "section"] == ["samples", "rejects"]
    assert sum(tag == "figure" for tag, _ in tags.tags) == 6  # every written sample drawn, with its thumbnail
