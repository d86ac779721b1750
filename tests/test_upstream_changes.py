"""A transformers release that changes what capfilt's fast paths lean on costs speed, never a run.

Each test simulates such a change by monkeypatching the library (the change that broke capfilt in 5.24 was
a renamed keyword), runs a real bootstrap, and checks that captions and scores still equal the plain library
calls and that one warning line names the fast path that was switched off.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from transformers import AutoProcessor
from transformers.image_utils import PILImageResampling
from transformers.models.blip.modeling_blip_text import BlipTextEmbeddings, BlipTextModel, BlipTextSelfAttention

from capfilt.config import Command
from capfilt.models.fast_attention import cache_argument
from capfilt.pipeline import run
from tests import reference
from tests.test_pipeline import BEAM, assert_equals_plain_calls, config, decoded, read_output


def embeddings_need_a_new_keyword(monkeypatch: pytest.MonkeyPatch, models: tuple[str, str]) -> None:
    """The text embeddings require a keyword capfilt does not pass (as the cache length, `cache_length` from
    5.24 and `past_key_values_length` before): the library passes it, capfilt's own decoding loop does not."""
    original = BlipTextEmbeddings.forward

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None, **kwargs):
        if not kwargs:
            raise TypeError("BlipTextEmbeddings.forward() missing 1 required keyword argument: 'cache_length'")
        return original(self, input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)

    monkeypatch.setattr(BlipTextEmbeddings, "forward", forward)


def attention_cache_renamed(monkeypatch: pytest.MonkeyPatch, models: tuple[str, str]) -> None:
    """The layers hand the attention its cache under a new name (as `past_key_values` became `cache` in 5.24):
    the library's attention follows, capfilt's SDPA attention does not know the name and runs without it."""
    original = BlipTextSelfAttention.forward
    name = cache_argument(BlipTextSelfAttention)

    def call(self, *args, **kwargs):  # the callers: the cache under its new name
        if name in kwargs:
            kwargs["kv_cache"] = kwargs.pop(name)
        return nn.Module.__call__(self, *args, **kwargs)

    def forward(self, *args, kv_cache=None, **kwargs):  # the library's attention, renamed with them
        return original(self, *args, **kwargs, **{name: kv_cache})

    monkeypatch.setattr(BlipTextSelfAttention, "__call__", call)
    monkeypatch.setattr(BlipTextSelfAttention, "forward", forward)


def encoder_rejects_a_cache(monkeypatch: pytest.MonkeyPatch, models: tuple[str, str]) -> None:
    """The text model takes a cache only while generating (`use_cache`): the model's own ITM forward passes
    none, capfilt's text passes pass one (each image's keys, projected once)."""
    original = BlipTextModel.forward
    name = cache_argument(BlipTextModel)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if kwargs.get(name) is not None and not kwargs.get("use_cache"):
            raise TypeError(f"BlipTextModel.forward() got an unexpected keyword argument '{name}'")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BlipTextModel, "forward", forward)


def processor_resizes_otherwise(monkeypatch: pytest.MonkeyPatch, models: tuple[str, str]) -> None:
    """The image processor changes how it resizes: capfilt's table-driven preprocessing no longer matches it."""
    processor_class = type(AutoProcessor.from_pretrained(models[0]).image_processor)
    original = processor_class.resize

    def resize(self, image, size, resample=None, **kwargs):
        return original(self, image, size, resample=PILImageResampling.BILINEAR, **kwargs)

    monkeypatch.setattr(processor_class, "resize", resize)


@contextlib.contextmanager
def capfilt_log(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The `capfilt` logger's records in `caplog`, also after an in-process CLI run set the logger to print
    its records itself (and not propagate them)."""
    logger = logging.getLogger("capfilt")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # caplog's handler also sits on the root logger: each record once
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.mark.parametrize("change,fast_paths", [
    (embeddings_need_a_new_keyword, {"captioner": "capfilt's own decoding loop"}),
    (attention_cache_renamed, {"captioner": "fused attention (SDPA)", "filter": "capfilt's own text passes"}),
    (encoder_rejects_a_cache, {"filter": "capfilt's own text passes"}),
    (processor_resizes_otherwise, {"captioner": "table-driven preprocessing", "filter": "table-driven preprocessing"}),
], ids=["decoding-loop", "sdpa-attention", "filter-passes", "preprocessing"])
def test_a_changed_library_turns_the_fast_path_off_and_the_run_still_equals_it(
    tiny_models, shapes_dataset, tmp_path, monkeypatch, caplog, change, fast_paths
):
    change(monkeypatch, tiny_models)
    out = tmp_path / "out"
    with capfilt_log(caplog):
        summary = run(config(Command.bootstrap, shapes_dataset, out, tiny_models))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == len(fast_paths), warnings
    for role, fast_path in fast_paths.items():
        assert any(message.startswith(f"{fast_path} is off for the {role} ") for message in warnings), warnings
    assert all("\n" not in message and "using the library's path" in message for message in warnings)

    samples = read_output(out)
    assert summary.written == len(samples) == 20 and not summary.failed_shards
    for sample in samples:  # the plain library calls, under the same changed library
        assert_equals_plain_calls(sample, tiny_models)


def test_the_library_as_it_is_keeps_every_fast_path(tiny_models, shapes_dataset, tmp_path, caplog):
    from capfilt.models import load_captioner, load_filter

    with capfilt_log(caplog):
        captioner = load_captioner(tiny_models[0], BEAM, "cpu", torch.float32)
        filter_ = load_filter(tiny_models[1], "cpu", torch.float32)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert captioner.decoder is not None and filter_.sdpa and filter_.own_passes


def test_the_cli_prints_one_line_for_a_fast_path_it_turns_off(tiny_models, shapes_dataset, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from capfilt.cli import app

    attention_cache_renamed(monkeypatch, tiny_models)
    out = tmp_path / "out"
    args = ["bootstrap", str(shapes_dataset), str(out), "--captioner", tiny_models[0], "--filter", tiny_models[1],
            "--num-beams", "3", "--max-length", "12", "--min-length", "5", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "is off for the" in line]
    assert len(lines) == 2 and all(line.startswith("capfilt: ") for line in lines), result.output
    assert "fused attention (SDPA) is off for the captioner" in lines[0]
    assert "Traceback" not in result.output
    for sample in read_output(out):
        assert [c.text for c in sample.synthetic_captions] == reference.beam_captions(tiny_models[0], decoded(sample),
                                                                                     BEAM)
