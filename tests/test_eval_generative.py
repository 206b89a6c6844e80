"""Generative evaluation: VQAv2's normalisation and accuracy, POPE, BLEU-4 and CIDEr-D against pycocoevalcap,
and the `rosetta eval --task caption|vqa|pope` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rosetta.errors import InputError
from rosetta.eval.generative import (
    bleu,
    caption_tokens,
    captioning,
    cider_d,
    normalise_answer,
    pope,
    said_yes,
    vqa,
    vqa_accuracy,
)


class Parrot:
    """A backend that answers from a table keyed by the question (and says nothing it was not told)."""

    def __init__(self, answers: dict[str, str], fail_on: str | None = None):
        self.answers, self.fail_on, self.calls = answers, fail_on, 0

    def reply(self, conversations, max_new_tokens=32, **options):
        self.calls += 1
        out = []
        for messages in conversations:
            parts = messages[0]["content"]
            if self.fail_on is not None and any(p.get("image") == self.fail_on for p in parts):
                raise InputError(f"{self.fail_on}: not an image")
            out.append(self.answers[parts[-1]["text"]])
        return out


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("the dog.", "dog"), ("A red, circle!", "red circle"), ("dont", "don't"), ("3.5", "3.5"),
    ("  Yes  ", "yes"), ("1,000", "1000"), ("an apple", "apple"),
])
def test_vqa_normalisation(raw, expected):
    assert normalise_answer(raw) == expected


def test_vqa_accuracy_is_min_one_of_matches_over_three_averaged_over_leave_one_out():
    truths = ["2"] * 2 + ["3"] * 8
    # Leaving out one of the two "2"s leaves one match (1/3); leaving out any "3" leaves two (2/3).
    assert vqa_accuracy("two", truths) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("3", truths) == 1.0
    assert vqa_accuracy("Red.", ["red"]) == 1.0 and vqa_accuracy("blue", ["red"]) == 0.0


@given(st.text(max_size=40))
def test_normalisation_is_idempotent(text):
    once = normalise_answer(text)
    assert normalise_answer(once) == once


def test_vqa_scores_per_type_and_skips_what_fails():
    records = [{"image": "a.png", "question": "colour?", "answers": ["red"], "type": "colour"},
               {"image": "b.png", "question": "count?", "answers": ["2"], "type": "count"},
               {"image": "bad.png", "question": "count?", "answers": ["2"], "type": "count"}]
    skipped = []
    result = vqa(Parrot({"colour?": "Red", "count?": "two"}, fail_on="bad.png"), records, on_error=skipped.append)
    assert result["accuracy"] == pytest.approx(2 / 3) and result["colour_accuracy"] == 1.0
    assert result["count_accuracy"] == 0.5 and result["n"] == 3 and len(skipped) == 1
    with pytest.raises(InputError, match="no records"):
        vqa(Parrot({}), [{"image": "a.png", "text": "a caption"}])


def test_pope_precision_recall_f1_and_yes_ratio():
    probes = [("q1", "yes", "Yes, there is."), ("q2", "yes", "No."), ("q3", "no", "There is not."),
              ("q4", "no", "yes"), ("q5", "yes", "yes")]
    records = [{"image": "a.png", "question": q, "answer": a, "type": "random"} for q, a, _ in probes]
    result = pope(Parrot({q: said for q, _, said in probes}), records)
    # said yes to q1, q4, q5: tp 2 (q1, q5), fp 1 (q4), fn 1 (q2)
    assert result["precision"] == pytest.approx(2 / 3) and result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / 3) and result["accuracy"] == pytest.approx(3 / 5)
    assert result["yes_ratio"] == pytest.approx(3 / 5) and result["random_f1"] == result["f1"]
    assert not said_yes("It is not there") and said_yes("Yes") and not said_yes("No, it is not.")
    assert said_yes("Yes. No cat is there.")  # POPE reads the first sentence only


def test_bleu_and_cider_match_pycocoevalcap():
    bleu_scorer = pytest.importorskip("pycocoevalcap.bleu.bleu").Bleu
    cider_scorer = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    references = {
        "1": ["a red circle on a white background", "a red circle", "there is a red circle in the image"],
        "2": ["a blue square next to a green star", "two shapes a blue square and a green star"],
        "3": ["a large yellow triangle", "an image showing a large yellow triangle"],
        "4": ["a purple star in the top left of the image", "a purple star"],
    }
    said = {"1": "a red circle on a grey background", "2": "a blue square and a green star",
            "3": "a yellow triangle", "4": "a star"}
    gts = {k: [" ".join(caption_tokens(t)) for t in v] for k, v in references.items()}
    res = {k: [" ".join(caption_tokens(said[k]))] for k in references}
    theirs_bleu, _ = bleu_scorer(4).compute_score(gts, res, verbose=0)
    theirs_cider, _ = cider_scorer().compute_score(gts, res)
    candidates = [caption_tokens(said[k]) for k in references]
    refs = [[caption_tokens(t) for t in references[k]] for k in references]
    assert bleu(candidates, refs) == pytest.approx(theirs_bleu[3], abs=1e-9)
    assert cider_d(candidates, refs) == pytest.approx(theirs_cider, abs=1e-9)


def test_captioning_scores_a_perfect_captioner_above_a_wrong_one():
    records = [{"image": f"{i}.png", "text": t} for i, t in enumerate(["a red circle", "a blue square",
                                                                         "a green star on black"])]

    class Echo:
        def __init__(self, right: bool):
            self.right, self.i = right, 0

        def reply(self, conversations, max_new_tokens=32, **options):
            out = []
            for messages in conversations:
                image = messages[0]["content"][0]["image"]
                out.append(records[int(image[0])]["text"] if self.right else "nothing at all")
            return out

    good, bad = captioning(Echo(True), records), captioning(Echo(False), records)
    assert good["bleu4"] == pytest.approx(1.0) and good["cider_d"] > bad["cider_d"] == 0.0


def test_eval_command_scores_vqa_and_pope_with_a_local_model(tmp_path):
    from rosetta.data.builtin import make_shapes
    from rosetta.data.shapes_qa import make_shape_questions

    make_shapes(tmp_path / "shapes", n=40, seed=0, image_size=32)
    make_shape_questions(tmp_path / "shapes", splits=("test",))
    for task, metric in (("vqa", "accuracy"), ("pope", "yes_ratio"), ("caption", "cider_d")):
        out = subprocess.run([sys.executable, "-m", "rosetta", "eval", "--task", task, "--model", "tiny-vlm",
                              "--random-init", "--data", str(tmp_path / "shapes"), "--out", str(tmp_path / "r.json")],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert metric in out.stdout
        metrics = json.loads((tmp_path / "r.json").read_text())["metrics"]
        assert 0 <= metrics[metric] and metrics["n"] == (4 * 4 if task == "vqa" else 2 * 4 if task == "pope" else 4)
    out = subprocess.run([sys.executable, "-m", "rosetta", "eval", "--task", "vqa", "--model", "tiny",
                          "--random-init", "--data", str(tmp_path / "shapes")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "does not answer about images" in out.stderr
