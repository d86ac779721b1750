"""`capfilt finetune`: BLIP captioner and filter fine-tuning with the Trainer, resumable, on capfilt's readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForImageTextRetrieval, TrainerCallback

from capfilt.errors import ConfigError
from capfilt.finetune import RECORD_NAME, finetune
from capfilt.models import DecodingSettings, load_captioner, load_filter
from tests.conftest import shape_items
from tests.datasets import write_webdataset_shards

ROOT = Path(__file__).resolve().parents[1]


def captioned(count: int, start: int = 0) -> list:
    """Samples that all have a caption (shape_items leaves every fourth without one)."""
    return [item for item in shape_items(count * 2, start=start) if item[2] is not None][:count]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Eight captioned samples, one without a caption and one whose image does not decode."""
    folder = tmp_path_factory.mktemp("finetune") / "in"
    items = captioned(8)
    items.append(("nocaption", items[0][1], None, None))
    items.append(("broken", b"not an image at all", "a broken picture", None))
    write_webdataset_shards(folder, items, samples_per_shard=5)
    return folder


def run(role: str, model: str, data: Path, out: Path, **options) -> dict:
    settings = {"epochs": 1, "batch_size": 4, "device": "cpu", "quiet": True, "seed": 3}
    return finetune(role, str(data), str(out), model=model, **(settings | options))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("role", ["captioner", "filter"])
def test_finetune_saves_a_loadable_changed_model_and_its_record(role, tiny_models, dataset, tmp_path):
    source = tiny_models[0] if role == "captioner" else tiny_models[1]
    cls = BlipForConditionalGeneration if role == "captioner" else BlipForImageTextRetrieval
    record = run(role, source, dataset, tmp_path / "out", epochs=2)

    saved = json.loads((tmp_path / "out" / RECORD_NAME).read_text())
    assert saved == record
    assert saved["status"] == "done"
    assert saved["settings"]["epochs"] == 2 and saved["settings"]["weight_decay"] == 0.05
    assert len(saved["train_loss"]) == 2 and all(loss > 0 for loss in saved["train_loss"])
    assert saved["pairs"] == 8
    assert saved["skipped"] == {"no_caption": 1, "undecodable_image": 1}

    before, after = cls.from_pretrained(source), cls.from_pretrained(tmp_path / "out")
    assert set(before.state_dict()) == set(after.state_dict())  # the filter's temperature is not saved
    assert any(not torch.equal(before.state_dict()[name], tensor) for name, tensor in after.state_dict().items())
    AutoProcessor.from_pretrained(tmp_path / "out")
    if role == "captioner":
        load_captioner(str(tmp_path / "out"), DecodingSettings(), "cpu", torch.float32)
    else:
        load_filter(str(tmp_path / "out"), "cpu", torch.float32)


def test_captioner_loss_decreases_on_a_repeated_set(tiny_models, tmp_path):
    write_webdataset_shards(tmp_path / "in", captioned(4) * 2)
    record = run("captioner", tiny_models[0], tmp_path / "in", tmp_path / "out", epochs=6, lr=3e-3)
    losses = record["train_loss"]
    assert len(losses) == 6
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.3, losses


class Kill(TrainerCallback):
    """Dies right after the checkpoint of step `step` is written, as a killed process would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize(("role", "grad_accum"), [("captioner", 1), ("filter", 1), ("captioner", 2)])
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(role, grad_accum, tiny_models, dataset,
                                                                     tmp_path):
    source = tiny_models[0] if role == "captioner" else tiny_models[1]
    cls = BlipForConditionalGeneration if role == "captioner" else BlipForImageTextRetrieval
    # 8 pairs, batch 2, 2 epochs: 8 updates (4 with 2 accumulated); killed in the middle of the first epoch.
    steps, kill_at = 8 // grad_accum, 3 // grad_accum
    options = {"epochs": 2, "batch_size": 2, "grad_accum": grad_accum, "save_steps": kill_at, "lr": 1e-4}
    run(role, source, dataset, tmp_path / "whole", **options)
    with pytest.raises(KeyboardInterrupt):
        run(role, source, dataset, tmp_path / "killed", callbacks=[Kill(kill_at)], **options)
    assert not (tmp_path / "killed" / "config.json").exists()
    assert [path.name for path in (tmp_path / "killed" / "checkpoints").iterdir()] == [f"checkpoint-{kill_at}"]
    record = run(role, source, dataset, tmp_path / "killed", **options)
    assert record["steps"] == steps

    whole, resumed = weights(cls.from_pretrained(tmp_path / "whole")), weights(cls.from_pretrained(tmp_path / "killed"))
    assert whole.keys() == resumed.keys()
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed[name]), name
    first = json.loads((tmp_path / "whole" / RECORD_NAME).read_text())
    assert record["train_loss"] == pytest.approx(first["train_loss"])
    if role == "filter":
        assert record["temperature"] == first["temperature"]


def test_refusals_before_any_work(tiny_models, dataset, tmp_path):
    from capfilt.demo.tiny_clip import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    with pytest.raises(ConfigError, match="'clip' model"):
        run("captioner", str(clip), dataset, tmp_path / "a")
    with pytest.raises(ConfigError, match="BlipForImageTextRetrieval"):
        run("captioner", tiny_models[1], dataset, tmp_path / "a")
    assert not (tmp_path / "a").exists()

    empty = tmp_path / "empty"
    write_webdataset_shards(empty, [("k1", b"junk", "a caption", None), ("k2", captioned(1)[0][1], None, None)])
    with pytest.raises(ConfigError, match="no usable image-caption pairs") as refused:
        run("captioner", tiny_models[0], empty, tmp_path / "b")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "b").exists()

    # OUT of another training: refused whatever differs, before the data is read.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / RECORD_NAME).write_text(json.dumps({"settings": {"role": "captioner", "lr": 0.5}}))
    with pytest.raises(ConfigError, match="holds another training"):
        run("captioner", tiny_models[0], dataset, tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "stuff.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        run("captioner", tiny_models[0], dataset, tmp_path / "d")


def test_cli_finetunes_and_refuses_in_one_line(tiny_models, dataset, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "capfilt", "finetune", "captioner", str(dataset), str(tmp_path / "out"),
               "--from", tiny_models[0], "--epochs", "1", "--batch-size", "4", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "1 no_caption" in done.stdout + done.stderr
    record = json.loads((tmp_path / "out" / RECORD_NAME).read_text())
    assert record["status"] == "done" and record["skipped"] == {"no_caption": 1, "undecodable_image": 1}

    command[command.index("--epochs") + 1] = "2"  # other settings into the same OUT
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "holds another training" in refused.stderr


def test_cli_help_lists_the_flags():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for role in ("captioner", "filter"):
        shown = subprocess.run([sys.executable, "-m", "capfilt", "finetune", role, "--help"], capture_output=True,
                               text=True, env=env, timeout=60)
        assert shown.returncode == 0, shown.stderr
        for flag in ("--from", "--preset", "--epochs", "--lr", "--batch-size", "--grad-accum", "--eval-fraction",
                     "--seed", "--device", "--dtype"):
            assert flag in shown.stdout, flag


def test_preset_gives_its_filter_and_the_device_and_dtype_are_checked(dataset, tmp_path):
    from capfilt.finetune import resolve_model
    from capfilt.presets import load_preset

    preset = load_preset("demo")
    assert resolve_model("filter", None, "demo") == (preset.filters[0], preset.prompt)
    assert resolve_model("captioner", None, "demo") == (preset.captioner, preset.prompt)
    assert resolve_model("captioner", "elsewhere", "demo") == ("elsewhere", preset.prompt)
    with pytest.raises(ConfigError, match="float16 needs a GPU"):
        finetune("filter", str(dataset), str(tmp_path / "other"), preset="demo", device="cpu", dtype="float16")
    with pytest.raises(ConfigError, match="give cpu or cuda"):
        finetune("filter", str(dataset), str(tmp_path / "other"), preset="demo", device="tpu")
    with pytest.raises(ConfigError, match="names no captioner|--from"):
        finetune("captioner", str(dataset), str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()


def test_resuming_on_a_release_that_resumes_inexactly_says_so(tiny_models, dataset, tmp_path, monkeypatch, caplog):
    import logging

    import transformers

    options = {"epochs": 1, "batch_size": 2, "save_steps": 1, "lr": 1e-4}
    with pytest.raises(KeyboardInterrupt):
        run("captioner", tiny_models[0], dataset, tmp_path / "out", callbacks=[Kill(1)], **options)
    monkeypatch.setattr(transformers, "__version__", "5.5.4")
    with caplog.at_level(logging.INFO, logger="capfilt"):
        run("captioner", tiny_models[0], dataset, tmp_path / "out", **options)
    assert any("resumes a training close to, not exactly at" in r.getMessage() for r in caplog.records)


def test_eval_fraction_holds_pairs_out_and_records_their_loss_each_epoch(tiny_models, dataset, tmp_path):
    record = run("filter", tiny_models[1], dataset, tmp_path / "out", epochs=2, eval_fraction=0.25)
    assert (record["train_pairs"], record["eval_pairs"]) == (6, 2)  # 8 usable pairs; the split follows the seed
    assert [row["epoch"] for row in record["eval"]] == [1, 2]
    assert all(row["loss"] > 0 and 0 <= row["itm_accuracy"] <= 1 for row in record["eval"])
    assert len(record["train_loss"]) == 2


def test_a_bootstrap_output_teaches_each_of_its_kept_captions(tiny_models, tmp_path):
    """CapFilt's last step trains on the bootstrapped data: every kept caption, web and synthetic, is a pair."""
    import tarfile

    import capfilt
    from capfilt.finetune import read_pairs

    write_webdataset_shards(tmp_path / "in", captioned(6), samples_per_shard=3)
    capfilt.run(str(tmp_path / "in"), str(tmp_path / "boot"), "bootstrap", captioner=tiny_models[0],
                filter=[tiny_models[1]], keep=["itc>=-0.05"], batch_size=4, device="cpu", dtype="fp32",
                num_captions=3, num_beams=1, max_length=12, min_length=5)
    expected = []
    for shard in sorted((tmp_path / "boot").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in sorted(tar.getnames()):
                if member.endswith(".json"):
                    record = json.loads(tar.extractfile(member).read())
                    expected += [(member.removesuffix(".json"), text) for text in record["kept_captions"]]
    pairs = read_pairs(str(tmp_path / "boot"))
    assert sorted(zip(pairs.keys, pairs.captions)) == sorted(expected)
    assert any(text not in {item[2] for item in captioned(6)} for _, text in expected)  # synthetic ones among them


def test_spooled_training_images_are_the_pairs_read_into_memory(dataset, tmp_path):
    """Training memory-maps its images from a spool file; they must be exactly the pairs read in memory."""
    from capfilt.finetune import SpooledImages, read_pairs

    in_memory = read_pairs(str(dataset))
    spooled = read_pairs(str(dataset), spool=tmp_path / "images.arrow")
    assert isinstance(spooled.images, SpooledImages)
    assert (spooled.keys, spooled.captions, spooled.skipped) == (in_memory.keys, in_memory.captions,
                                                                 in_memory.skipped)
    assert list(spooled.images) == in_memory.images and len(spooled.images) == 8
    assert list(spooled.subset([5, 2]).images) == [in_memory.images[5], in_memory.images[2]]
