"""The README's first command: the shipped demo models clean the bundled example, visibly right."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import capfilt
from capfilt.demo import examples
from capfilt.inspect import read_output_samples

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "shapes"


def test_the_bundled_example_is_what_the_generator_writes(tmp_path):
    examples.write_examples(tmp_path)
    names = sorted(p.name for p in EXAMPLE.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    assert all(filecmp.cmp(EXAMPLE / name, tmp_path / name, shallow=False) for name in names)


def test_demo_bootstrap_keeps_right_captions_and_drops_wrong_ones(tmp_path):
    out = tmp_path / "out"
    # The demo preset's captioner, filter, decoding lengths, prompt and keep rule (itm>=0.5), with beam search.
    summary = capfilt.run(str(EXAMPLE), str(out), command="bootstrap", preset="demo", num_beams=3, batch_size=16,
                          device="cpu", dtype="float32")
    assert json.loads((out / "capfilt_run.json").read_text())["keep"] == ["itm>=0.5"]  # the preset's rule
    rows = {row.key: row for shard in (0, 1) for row in examples.example_rows(shard)}
    downloaded = [row for row in rows.values() if row.jpeg is not None]
    assert summary.read == len(downloaded)
    written, dropped = read_output_samples(str(out), 1000, {})
    decided = {s.key: s for s in written + dropped}
    assert len(decided) == len(downloaded)

    right = [decided[r.key].web_kept for r in downloaded if r.caption_kind == "right"]
    wrong = [decided[r.key].web_kept for r in downloaded if r.caption_kind in ("another picture's", "junk")]
    assert sum(right) >= 0.8 * len(right), "the filter should keep right web captions"
    assert sum(wrong) <= 0.2 * len(wrong), "the filter should remove wrong and junk web captions"

    def words_right(sample) -> float:
        truth = set(rows[sample.key].true_caption.split())
        said = set(sample.synthetic_captions[0].text.split())
        return len(truth & said) / len(truth | said)

    assert sum(map(words_right, decided.values())) / len(decided) >= 0.6, "synthetic captions should describe"
    assert summary.written >= 0.7 * len(downloaded)


def test_readme_demo_command_prints_captions_and_decisions(tmp_path):
    out = tmp_path / "shapes"
    command = [sys.executable, "-m", "capfilt", "bootstrap", str(EXAMPLE), str(out), "--preset", "demo",
               "--num-beams", "3", "--report"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "capfilt summary" in result.stderr
    shown = subprocess.run([sys.executable, "-m", "capfilt", "show", str(out)], capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and "synthetic:" in shown.stdout and "web:" in shown.stdout
    assert json.loads((out / "capfilt_summary.json").read_text())["synthetic_captions_added"] > 0
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert f"report written to {out}/report.html\n" in result.stderr
