"""`capfilt finetune` under `torchrun --nproc_per_node 2` (DDP over gloo, on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from tests.datasets import write_webdataset_shards
from tests.test_finetune import captioned

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("role", ["captioner", "filter"])
def test_two_processes_train_one_model_on_halves_of_each_batch(role, tiny_models, tmp_path):
    write_webdataset_shards(tmp_path / "in", captioned(12), samples_per_shard=5)
    source = tiny_models[0] if role == "captioner" else tiny_models[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "capfilt", "finetune",
               role, str(tmp_path / "in"), str(tmp_path / "out"), "--from", source, "--epochs", "2",
               "--batch-size", "2", "--eval-fraction", "0.25", "--seed", "3", "--device", "cpu", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]

    record = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert record["status"] == "done" and (record["train_pairs"], record["eval_pairs"]) == (9, 3)
    # 9 pairs, 2 per process per step: each epoch is ceil(9 / 4) = 3 steps, each process taking its half.
    assert record["steps"] == 6
    assert [row["epoch"] for row in record["eval"]] == [1, 2]
    cls = BlipForConditionalGeneration if role == "captioner" else BlipForImageTextRetrieval
    before, after = cls.from_pretrained(source), cls.from_pretrained(tmp_path / "out")
    assert set(before.state_dict()) == set(after.state_dict())
    assert any(not torch.equal(before.state_dict()[name], tensor) for name, tensor in after.state_dict().items())


def _half_batch_itc(rank: int, model_path: str, init_file: str, results: str) -> None:
    """One of two processes: the ITC loss and its gradient on this process's half of the batch."""
    from capfilt.models.blip_training import FilterLoss

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model, pixels, texts = _filter_batch(model_path)
    rows = slice(rank * 3, rank * 3 + 3)
    loss = FilterLoss()(model, pixels[rows], texts.input_ids[rows], texts.attention_mask[rows],
                        generator=torch.Generator().manual_seed(0)).itc
    loss.backward()
    # What DDP does with each process's gradient: the mean over the processes.
    gradient = model.vision_proj.weight.grad.clone()
    torch.distributed.all_reduce(gradient)
    torch.save({"loss": loss.detach(), "gradient": gradient / 2}, f"{results}.{rank}")
    torch.distributed.destroy_process_group()


def _filter_batch(model_path: str):
    import io

    from PIL import Image
    from transformers import AutoProcessor

    model = BlipForImageTextRetrieval.from_pretrained(model_path).eval()
    processor = AutoProcessor.from_pretrained(model_path)
    items = captioned(6, start=40)
    pixels = processor(images=[Image.open(io.BytesIO(item[1])).convert("RGB") for item in items],
                       return_tensors="pt").pixel_values
    # Lengths differ between the halves, so gathering must pad.
    texts = processor.tokenizer([item[2] for item in items[:3]] + ["a", "b c", "IMG_2031.JPG"], padding="longest",
                                return_tensors="pt")
    return model, pixels, texts


def test_two_processes_contrast_with_the_whole_batch_as_one_process_does(tiny_models, tmp_path):
    """BLIP gathers the batches of all processes for ITC: two halves give one process's loss and gradient."""
    from capfilt.models.blip_training import FilterLoss

    results = str(tmp_path / "result")
    torch.multiprocessing.spawn(_half_batch_itc, args=(tiny_models[1], str(tmp_path / "init"), results), nprocs=2)
    model, pixels, texts = _filter_batch(tiny_models[1])
    whole = FilterLoss()(model, pixels, texts.input_ids, texts.attention_mask,
                         generator=torch.Generator().manual_seed(0)).itc
    whole.backward()
    halves = [torch.load(f"{results}.{rank}") for rank in range(2)]
    torch.testing.assert_close((halves[0]["loss"] + halves[1]["loss"]) / 2, whole.detach(), rtol=1e-5, atol=1e-6)
    for half in halves:
        torch.testing.assert_close(half["gradient"], model.vision_proj.weight.grad, rtol=1e-4, atol=1e-6)
