"""The run report (`capfilt report`, capfilt/report.py) as a reader sees it: rendered by a headless Chromium
(tests/browser.py) from a real bootstrap run of the demo models.

One run serves every test: 10 shape samples in 3 shards, one with bytes that are not an image (rejected), web
captions that are HTML (a <script>, an <img onerror>) and a key and a metadata URL that try to break out of an
attribute. The report must show the run's counts, every thumbnail and histogram, the hostile text as text, fetch
nothing, and break none of its own Content-Security-Policy. Skipped where no browser can be started
(tests/browser.py says what is missing).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import capfilt
from tests.browser import Browser, artifacts_directory, chromium, missing
from tests.conftest import shape_items
from tests.datasets import encode_image, make_image, write_webdataset_shards

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

SCRIPT_CAPTION = "<script>window.__pwned=1</script>"
IMG_CAPTION = '<img src=x onerror="window.__pwned=1">'
# webdataset splits a key at its first dot: this one has none, so the key reaches the report whole.
HOSTILE_KEY = 'x"><svg onload=self["__pwned"]=1>'
HOSTILE_URL = 'http://example.com/a"><svg onload="window.__pwned=1">.jpg'
CORRUPT_KEY = "000000007"
# The demo models (trained on shapes) keep some captions and drop others at BLIP's threshold, so that every part
# of the report has something to show.
KEEP = "itm>=0.5"

# What a page may fetch: nothing. What it may refer to by URL without fetching: data: URIs and #fragments.
NO_FETCH_ELEMENTS = "script, link, iframe, frame, object, embed, base, audio, video, source, track, meta[http-equiv=refresh]"


@pytest.fixture(scope="module")
def chrome() -> Iterator[Browser]:
    """One headless Chromium for this module's tests."""
    with chromium() as session:
        yield session


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict]:
    """A bootstrap run's output with its report.html, and the run's capfilt_summary.json."""
    from capfilt.report import write_report  # imported here: collection works without it

    root = tmp_path_factory.mktemp("report")
    items = shape_items(10)
    for index in (0, 6):
        items[index] = (items[index][0], items[index][1], SCRIPT_CAPTION, items[index][3])
    for index in (3, 9):
        items[index] = (items[index][0], items[index][1], IMG_CAPTION, items[index][3])
    items[4] = (HOSTILE_KEY, items[4][1], "a hostile key", {"source": "test", "url": HOSTILE_URL})
    items[7] = (CORRUPT_KEY, b"these bytes are not an image", "a corrupt picture", {"source": "test"})
    write_webdataset_shards(root / "in", items, samples_per_shard=4)
    output = root / "out"
    capfilt.run(str(root / "in"), str(output), "bootstrap", preset="demo", batch_size=4, device="cpu", dtype="fp32",
                num_captions=2, keep=[KEEP], keep_dropped=True)
    summary = json.loads((output / "capfilt_summary.json").read_text())
    assert summary["written"] > 0 and summary["dropped"] > 0 and summary["rejected"] == 1, (
        f"the demo filter keeps all or nothing: choose a threshold that keeps some images and drops others ({summary})")
    path = Path(write_report(str(output)))
    assert path == output / "report.html" and path.is_file()
    return path, summary


def _count(page: Browser, name: str) -> int:
    texts = page.texts(f'#counts [data-count="{name}"]')
    assert len(texts) == 1, f"the counts table has {len(texts)} cells data-count={name!r}"
    return int(texts[0].strip().replace(",", "").replace("\u202f", "").replace("\u00a0", ""))


def test_the_report_shows_the_run(chrome, report, tmp_path):
    path, summary = report
    page = chrome.open(path)
    for name in ("read", "written", "dropped", "rejected"):
        assert _count(page, name) == summary[name], name
    for reason, count in summary["reject_reasons"].items():
        assert _count(page, f"rejected:{reason}") == count, reason
    shards = page.script("return [...document.querySelectorAll('#shards [data-shard]')]"
                         ".map(r => [r.dataset.shard, r.classList.contains('failed')])")
    assert sorted(shards) == [["00000", False], ["00001", False], ["00002", False]]

    widths = page.script("return [...document.querySelectorAll('img.thumb')].map(i => i.complete ? i.naturalWidth : 0)")
    assert widths and all(width > 0 for width in widths), widths
    assert all(width > 0 for width in page.image_widths())  # no other image failed either
    grids = page.script("return Object.fromEntries([...document.querySelectorAll('section.grid')]"
                        ".map(s => [s.id, [...s.querySelectorAll('figure.sample')].map(f => f.dataset.key)]))")
    assert grids.get("best") and grids.get("dropped"), grids
    assert CORRUPT_KEY in grids.get("rejects", []), grids

    bars = page.script(
        "return [...document.querySelectorAll('svg.histogram')].map(svg => [svg.dataset.score,"
        " [...svg.querySelectorAll('rect.bar')].filter(r => r.getBoundingClientRect().height > 0).length,"
        " svg.querySelectorAll('line.rule').length])")
    assert bars and all(drawn > 0 for _, drawn, _ in bars), bars
    assert any(score == "itm" and rules > 0 for score, _, rules in bars), f"no itm histogram with a rule: {bars}"
    curves = page.script(
        "return [...document.querySelectorAll('svg.whatif')].map(svg => [svg.dataset.score,"
        " ...['captions', 'images'].map(c => (svg.querySelector('polyline.' + c)?.points.numberOfItems) ?? 0)])")
    assert all(captions > 1 and images > 1 for _, captions, images in curves), curves
    assert page.text("#dropped-source").strip()

    screenshot = page.screenshot(artifacts_directory(tmp_path) / "report.png")
    print(f"report screenshot: {screenshot}")
    assert screenshot.stat().st_size > 0


def test_untrusted_text_is_shown_as_text(chrome, report):
    page = chrome.open(report[0])
    assert page.script("return typeof window.__pwned") == "undefined"
    assert page.count("script") == 0, "the report has a <script> element"
    assert page.event_handler_attributes() == []
    captions = page.texts("li.caption")
    for caption in (SCRIPT_CAPTION, IMG_CAPTION):
        assert any(caption in text for text in captions), f"{caption!r} is not among the captions shown: {captions}"
        assert caption in page.text(), f"{caption!r} is not in the page's rendered text"
    keys = page.script("return [...document.querySelectorAll('figure.sample')].map(f => f.dataset.key)")
    assert HOSTILE_KEY in keys, keys
    # An attribute value that broke out of its quotes would have made an element of its own.
    assert page.count("body svg:not(.histogram):not(.whatif) svg, figure svg") == 0


def test_the_report_fetches_nothing_and_keeps_its_policy(chrome, report):
    page = chrome.open(report[0])
    policies = page.script("return [...document.querySelectorAll('meta[http-equiv]')]"
                           ".filter(m => m.httpEquiv.toLowerCase() === 'content-security-policy').map(m => m.content)")
    assert len(policies) == 1, policies
    directives = {d.split()[0]: d.split()[1:] for d in policies[0].split(";") if d.strip()}
    assert directives.get("default-src") == ["'none'"] and directives.get("img-src") == ["data:"], policies[0]
    assert "script-src" not in directives and "unsafe" not in policies[0], policies[0]
    assert page.script("return document.querySelector('meta[http-equiv]') === "
                       "document.head.querySelector('meta[http-equiv]')"), "the policy is not in <head>"

    assert all(name.startswith("data:") for name in page.resources()), page.resources()
    assert page.count(NO_FETCH_ELEMENTS) == 0
    sources = page.script("return [...document.querySelectorAll('[src], [srcset], [poster], [background]')]"
                          ".flatMap(e => ['src', 'srcset', 'poster', 'background'].map(a => e.getAttribute(a)))"
                          ".filter(v => v !== null)")
    assert all(value.startswith("data:") for value in sources), [v[:60] for v in sources]
    # The inline stylesheet is the one the policy's hash allows: it applied, and nothing was blocked.
    log = page.log()
    assert [entry["message"] for entry in log if "Content Security Policy" in entry["message"]] == []
    assert [entry["message"] for entry in log if entry["level"] == "SEVERE"] == []
    styled = page.script("return document.styleSheets.length > 0 && document.styleSheets[0].cssRules.length > 0")
    assert styled, "the report has no stylesheet rules"


def test_webdriver_scripts_run_under_the_policy_and_violations_are_logged(chrome, tmp_path):
    """What the tests above rely on, on a page with the report's kind of policy: WebDriver's scripts run (eval
    too) where the page's own may not, a style the hash allows applies, and what the policy blocks (an inline
    script, a style attribute, an image from the network) is blocked and shows in the browser log."""
    style = "p#styled { color: rgb(1, 2, 3); }"
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    policy = f"default-src 'none'; img-src data:; style-src 'sha256-{digest}'"
    pixel = base64.b64encode(encode_image(make_image(1, 1))).decode()
    page_path = tmp_path / "policy.html"
    page_path.write_text(
        f'<!doctype html><html><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{policy}"><style>{style}</style></head><body>'
        f'<p id="styled">styled</p><p id="attribute" style="color: rgb(4, 5, 6)">style attribute</p>'
        f'<img id="inline" src="data:image/jpeg;base64,{pixel}"><img id="remote" src="http://127.0.0.1:9/x.png">'
        f"<script>window.__ran = 1</script></body></html>")
    page = chrome.open(page_path)
    assert page.script("return 6 * 7") == 42
    assert page.script("return eval('6 * 7')") == 42  # the policy allows no eval, yet WebDriver's runs
    assert page.script("return typeof window.__ran") == "undefined"  # the page's own script did not run
    colors = page.script("return ['styled', 'attribute'].map(i => getComputedStyle(document.getElementById(i)).color)")
    assert colors[0] == "rgb(1, 2, 3)" and colors[1] != "rgb(4, 5, 6)", colors
    assert page.image_widths() == [1, 0]
    violations = page.csp_violations()
    for blocked in ("inline script", "inline style", "http://127.0.0.1:9/x.png"):
        assert any(blocked in message for message in violations), f"no violation for {blocked}: {violations}"
    assert page.csp_violations() == []  # the log is read once
