"""Held-out evaluation (`capfilt.evaluation`): the figures against the plain library calls they summarise."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.evaluation import HeldOut, caption_metrics, evaluate, normalise
from capfilt.finetune import finetune
from tests.conftest import shape_items
from tests.datasets import write_webdataset_shards


@pytest.fixture(scope="module")
def held_out_data(tmp_path_factory):
    """Six pictures with a caption each, and a seventh caption of the first picture."""
    items = [item for item in shape_items(12, seed=4) if item[2] is not None][:6]
    items.append(("again", items[0][1], "another caption of the first picture", None))
    folder = tmp_path_factory.mktemp("held-out") / "in"
    write_webdataset_shards(folder, items)
    return folder, items


def test_caption_metrics_reward_the_references_and_only_them():
    references = [["a red circle on a blue background"], ["a big green square", "a green square"]]
    perfect = caption_metrics(["A red circle on a blue background.", "a green square"], references)
    assert perfect["exact_match"] == 1.0 and perfect["bleu4"] == pytest.approx(1.0, abs=1e-6)
    wrong = caption_metrics(["a yellow triangle on a red background", "a green square"], references)
    assert wrong["exact_match"] == 0.5 and wrong["bleu4"] < perfect["bleu4"] and wrong["cider"] < perfect["cider"]
    assert normalise(" A, Red  circle! ") == "a red circle"


def test_held_out_groups_captions_by_picture(held_out_data):
    _, items = held_out_data
    held = HeldOut.from_pairs([item[1] for item in items], [item[2] for item in items])
    assert len(held.images) == 6 and held.caption_image == [0, 1, 2, 3, 4, 5, 0]
    assert held.references()[0] == [items[0][2], "another caption of the first picture"]


def test_filter_figures_equal_ranking_with_the_plain_model_call(tiny_models, held_out_data):
    folder, items = held_out_data
    figures = evaluate("filter", tiny_models[1], str(folder))

    # The same figures from `BlipForImageTextRetrieval(...)` on every picture-caption pair: with 6 pictures and 7
    # captions every candidate is re-ranked, by ITM match logit plus cosine, as BLIP's evaluation does.
    model = BlipForImageTextRetrieval.from_pretrained(tiny_models[1]).eval()
    processor = AutoProcessor.from_pretrained(tiny_models[1])
    pictures = [Image.open(io.BytesIO(item[1])).convert("RGB") for item in items[:6]]
    captions = [item[2] for item in items]
    owner = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    itm = torch.zeros(6, 7, 2)
    cosine = torch.zeros(6, 7)
    with torch.no_grad():
        for i, picture in enumerate(pictures):
            inputs = processor(images=[picture] * 7, text=captions, padding=True, return_tensors="pt")
            itm[i] = model(**inputs, use_itm_head=True).itm_score
            cosine[i] = model(**inputs, use_itm_head=False).itm_score[0]
    score = itm[..., 1] + cosine
    matches = owner[None, :] == torch.arange(6)[:, None]

    def recall(rows: torch.Tensor, correct: torch.Tensor, k: int) -> float:
        top = rows.argsort(dim=1, descending=True)[:, :k]
        return float(correct.gather(1, top).any(dim=1).float().mean())

    assert figures["i2t_r1"] == pytest.approx(recall(score, matches, 1))
    assert figures["i2t_r5"] == pytest.approx(recall(score, matches, 5))
    assert figures["t2i_r1"] == pytest.approx(recall(score.t(), matches.t(), 1))
    assert figures["t2i_r5"] == pytest.approx(recall(score.t(), matches.t(), 5))

    match = itm.softmax(-1)[..., 1] > 0.5
    other = cosine.masked_fill(matches, float("-inf"))
    decisions = [match[owner[t], t] for t in range(7)]
    decisions += [~match[i, other[i].argmax()] for i in range(6)]
    decisions += [~match[other[:, t].argmax(), t] for t in range(7)]
    assert figures["itm_accuracy"] == pytest.approx(float(torch.stack(decisions).float().mean()))


def test_captioner_figures_score_the_captions_of_plain_generate(tiny_models, held_out_data):
    folder, items = held_out_data
    figures = evaluate("captioner", tiny_models[0], str(folder))

    model = BlipForConditionalGeneration.from_pretrained(tiny_models[0]).eval()
    processor = AutoProcessor.from_pretrained(tiny_models[0])
    pictures = [Image.open(io.BytesIO(item[1])).convert("RGB") for item in items[:6]]
    inputs = processor(images=pictures, text=["a picture of "] * 6, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, num_beams=3, max_length=40, min_length=5)
    captions = [text.removeprefix("a picture of").strip()
                for text in processor.batch_decode(output, skip_special_tokens=True)]
    references = [[items[0][2], items[6][2]]] + [[item[2]] for item in items[1:6]]
    assert figures == pytest.approx(caption_metrics(captions, references))


def test_finetune_evaluates_each_epoch_on_eval_data_and_records_it(tiny_models, held_out_data, tmp_path, capsys):
    folder, _ = held_out_data
    write_webdataset_shards(tmp_path / "train", [i for i in shape_items(12, seed=9) if i[2] is not None])
    record = finetune("captioner", str(tmp_path / "train"), str(tmp_path / "out"), model=tiny_models[0],
                      eval_data=str(folder), epochs=2, batch_size=4, device="cpu", seed=1)
    assert record["eval_pairs"] == 7
    assert [row["epoch"] for row in record["eval"]] == [1, 2]
    assert all({"loss", "bleu4", "cider", "exact_match"} <= set(row) for row in record["eval"])
    assert json.loads((tmp_path / "out" / "finetune.json").read_text())["eval"] == record["eval"]
    # The last evaluation is the saved model's.
    saved = evaluate("captioner", str(tmp_path / "out"), str(folder))
    assert saved == pytest.approx({name: record["eval"][-1][name] for name in saved})
    assert "held-out evaluation" in capsys.readouterr().err


def test_eval_data_and_eval_fraction_are_not_both_given(tiny_models, held_out_data, tmp_path):
    from capfilt.errors import ConfigError

    folder, _ = held_out_data
    with pytest.raises(ConfigError, match="not both"):
        finetune("filter", str(folder), str(tmp_path / "out"), model=tiny_models[1], eval_data=str(folder),
                 eval_fraction=0.5, device="cpu")
    assert not (tmp_path / "out").exists()
