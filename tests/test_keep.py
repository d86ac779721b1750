"""Keep rules: each rule alone, combined, keep-best, and the one-line errors at start-up."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capfilt.errors import ConfigError
from capfilt.keep import KeepRule, KeepRules, KeepTop, top_threshold
from capfilt.scores import Score
from capfilt.stats import HISTOGRAM_BINS, add_to_histogram, dense, histogram_top_threshold

SCORES = {"itm": Score("itm", 0.0, 1.0, "probability"), "clip": Score("clip", -1.0, 1.0, "cosine")}
CAPTIONS = [  # one image's distinct captions, web first
    ("web alt text", {"itm": 0.2, "clip": 0.31}),
    ("a red circle", {"itm": 0.9, "clip": 0.25}),
    ("a blue square", {"itm": 0.7, "clip": 0.40}),
    ("a red square", {"itm": 0.55, "clip": 0.35}),
]


def kept(rules: list[str], best: int | None = None) -> set[str]:
    verdict, _ = KeepRules.parse(rules, best).judge(CAPTIONS)
    return {text for text, keep in verdict.items() if keep}


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("itm>=0.55", {"a red circle", "a blue square", "a red square"}),
        ("itm>0.55", {"a red circle", "a blue square"}),
        ("itm<0.55", {"web alt text"}),
        ("itm<=0.55", {"web alt text", "a red square"}),
        ("clip>=0.28", {"web alt text", "a blue square", "a red square"}),
        (" clip >= 0.28 ", {"web alt text", "a blue square", "a red square"}),
    ],
)
def test_each_rule_alone(rule, expected):
    assert kept([rule]) == expected


def test_rules_combine_with_and():
    assert kept(["itm>=0.5", "clip>=0.28"]) == {"a blue square", "a red square"}


def test_keep_best_ranks_by_the_first_rule():
    assert kept(["itm>=0.5"], best=1) == {"a red circle"}
    assert kept(["clip>=0.28", "itm>=0.5"], best=1) == {"a blue square"}
    assert kept(["clip>-1"], best=2) == {"a blue square", "a red square"}
    # only captions that pass every rule compete
    assert kept(["itm>=0.5", "clip>=0.38"], best=3) == {"a blue square"}
    _, ranking = KeepRules.parse(["itm<0.6"]).judge(CAPTIONS)  # lower is better for `<`
    assert ranking == ["web alt text", "a red square", "a blue square", "a red circle"]


def test_a_missing_or_nan_score_fails_the_rule():
    verdict, _ = KeepRules.parse(["itm>=0.5"]).judge([("a", {}), ("b", {"itm": math.nan}), ("c", {"itm": 0.6})])
    assert verdict == {"a": False, "b": False, "c": True}


@pytest.mark.parametrize("text", ["itm=>0.5", "itm>=", "itm 0.5", ">=0.5", "itm>=abc", "itm>=nan", "1tm>=0.5"])
def test_a_malformed_rule_is_refused(text):
    with pytest.raises(ConfigError, match="malformed keep rule"):
        KeepRule.parse(text)


def test_a_rule_on_a_score_not_computed_lists_the_scores():
    with pytest.raises(ConfigError, match="'itc'.*scores the run computes: itm, clip"):
        KeepRules.parse(["itc>=0.3"]).check(SCORES, "the run computes")
    with pytest.raises(ConfigError, match="outside the range of 'itm'"):
        KeepRules.parse(["itm>=1.5"]).check(SCORES)


def test_keep_best_needs_a_rule_and_a_positive_count():
    with pytest.raises(ConfigError, match="first --keep rule"):
        KeepRules.parse([], best=1)
    with pytest.raises(ConfigError, match="at least 1"):
        KeepRules.parse(["itm>=0.5"], best=0)


def test_top_threshold_keeps_the_top_fraction_exactly():
    values = [i / 100 for i in range(100)]
    threshold = top_threshold(values, 0.3)
    assert sum(v >= threshold for v in values) == 30
    assert top_threshold([0.5], 0.01) == 0.5  # at least one
    assert top_threshold([], 0.3) is None
    assert KeepTop.parse("clip:0.3") == KeepTop("clip", 0.3)
    for text in ("clip", "clip:0", "clip:1.5", "clip:x"):
        with pytest.raises(ConfigError, match="--keep-top"):
            KeepTop.parse(text)


@given(st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=300), st.floats(0.01, 1.0))
def test_the_histograms_top_threshold_is_the_exact_one_to_a_bin(values, fraction):
    """What the report marks for a pending --keep-top, from the run's merged histogram, is the bin of the exact
    threshold select computes over every score."""
    histogram: dict[str, int] = {}
    add_to_histogram(histogram, values, -1.0, 1.0)
    marked = histogram_top_threshold(dense(histogram), -1.0, 1.0, fraction)
    exact = top_threshold(values, fraction)
    width = 2.0 / HISTOGRAM_BINS
    assert marked <= exact + 1e-12 and exact - marked < width + 1e-12


def _capfilt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capfilt", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_the_cli_refuses_bad_rules_in_one_line_before_any_model_loads(tiny_models, shapes_dataset, tmp_path):
    filter_ = tiny_models[1]
    cases = [
        (["--keep", "itm=>0.5"], "malformed keep rule 'itm=>0.5'"),
        (["--keep", "clip>=0.3"], "which is not among the scores the run's filters compute: itm, itc"),
        (["--keep-best", "0"], "--keep-best must be at least 1"),
        (["--threshold", "0.5", "--filter", f"blipB={filter_}"],
         "scores the run's filters compute: blipB_itm, blipB_itc"),
        (["--filter", filter_, "--filter", filter_], "two filters compute a score named 'itm'"),
    ]
    for extra, message in cases:
        args = ["filter", str(shapes_dataset), str(tmp_path / "out"), "--filter", filter_, *extra]
        if "--filter" in extra:
            args = ["filter", str(shapes_dataset), str(tmp_path / "out"), *extra]
        result = _capfilt(*args)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines == [f"capfilt: error: {lines[0].removeprefix('capfilt: error: ')}"], result.stderr
        assert message in lines[0], lines[0]
        assert "loading the filter" not in result.stderr
        assert not (tmp_path / "out").exists()


def test_every_shipped_preset_is_a_valid_recipe():
    from capfilt.models import filter_family
    from capfilt.models.blip import BlipFilter
    from capfilt.models.blip2 import Blip2Filter
    from capfilt.models.clip import ClipFilter
    from capfilt.models.siglip import SiglipFilter
    from capfilt.presets import available_presets, load_preset

    def family(model: str) -> type:
        """The family of a hub checkpoint a preset names (their configs cannot be read offline; a family
        prefix is read without any file)."""
        if ":" in model:
            return filter_family(model)
        for marker, found in (("siglip", SiglipFilter), ("clip", ClipFilter), ("blip2", Blip2Filter)):
            if marker in model:
                return found
        return BlipFilter

    assert {"blip-large", "blip-base", "laion-clip", "laion-coco", "demo", "blip2", "siglip", "datacomp"} <= set(
        available_presets())
    for name in available_presets():
        preset = load_preset(name)
        rules = KeepRules.parse(preset.keep, preset.keep_best)
        scores = {score.name: score for model in preset.filters for score in family(model).scores}
        rules.check(scores, f"{name}'s filter computes")
        assert all(KeepTop.parse(top).score in scores for top in preset.keep_top)
    datacomp = load_preset("datacomp")  # DataComp's top 30%, which select keeps over the whole pool
    assert (datacomp.keep, datacomp.keep_top) == ((), ("clip:0.3",))
    coco = load_preset("laion-coco")
    assert (coco.num_captions, coco.keep_best, coco.filters) == (40, 1, ("openai/clip-vit-large-patch14",))
    assert load_preset("laion-clip").keep == ("clip>=0.28",) and load_preset("laion-clip").captioner is None
