"""Scoring what a vision-language model says: captions (BLEU-4, CIDEr-D), answers (VQAv2 accuracy), object
hallucination (POPE), each with its latency and decoding speed. Any backend with `reply(conversations)` is
scored the same way: a local model, a hosted one, OCR.

- BLEU-4: corpus-level, as the COCO caption evaluation computes it (clipped n-gram precisions of every
  candidate against all of its references, the brevity penalty from the closest reference length).
- CIDEr-D: Vedantam et al. 2015 as pycocoevalcap's CiderD computes it: tf-idf n-gram vectors (n = 1..4),
  document frequencies from the references, clipped to the references' counts, a Gaussian length penalty
  (sigma 6), times 10.
- VQAv2 accuracy: min(1, matches / 3) averaged over the 10 leave-one-out subsets of the human answers, after
  the official normalisation (punctuation, number words to digits, articles and contractions).
- POPE: accuracy, precision, recall, F1 of "yes" and the share of "yes" answers.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from rosetta.errors import InputError

CAPTION_PROMPT = "Describe this image in one sentence."


# Decoding.

def replies(model, records: Sequence[Mapping[str, Any]], questions: Sequence[str], batch_size: int = 32,
            max_new_tokens: int = 32, on_error: Callable[[Exception], None] | None = None
            ) -> tuple[list[str | None], dict[str, float]]:
    """The model's reply to each (image, question), decoded `batch_size` at a time, greedy; and the timing: the
    latency of a batch (p50, p95) and tokens/s. A record whose image fails is None (with `on_error`)."""
    from rosetta.models.vlm import user

    out: list[str | None] = [None] * len(records)
    seconds, tokens, began = [], 0, time.perf_counter()
    tokenizer = getattr(model, "tokenizer", None)
    for first in range(0, len(records), batch_size):
        chunk = range(first, min(first + batch_size, len(records)))
        start = time.perf_counter()
        try:
            texts = model.reply([[user([records[i]["image"]], questions[i])] for i in chunk], max_new_tokens,
                                temperature=0.0)
        except InputError:
            if on_error is None:
                raise
            texts = [_one(model, records[i]["image"], questions[i], max_new_tokens, on_error) for i in chunk]
        seconds.append(time.perf_counter() - start)
        for i, text in zip(chunk, texts):
            out[i] = text
            if text is not None and tokenizer is not None:
                tokens += len(tokenizer.encode(text, add_special_tokens=False)) + 1  # and the end of the turn
    total = time.perf_counter() - began
    quantiles = statistics.quantiles(seconds, n=20) if len(seconds) > 1 else seconds * 19
    timing = {"batch_latency_p50_s": statistics.median(seconds), "batch_latency_p95_s": quantiles[18]}
    if tokenizer is not None:
        timing["tokens_per_s"] = tokens / total if total else 0.0
    return out, timing


def _one(model, image, question: str, max_new_tokens: int, on_error: Callable[[Exception], None]) -> str | None:
    from rosetta.models.vlm import user

    try:
        return model.reply([[user([image], question)]], max_new_tokens, temperature=0.0)[0]
    except InputError as e:
        on_error(e)
        return None


# VQA.

# The official VQAv2 evaluation's tables (vqaEval.py): contractions written without their apostrophe, number
# words, articles, and the punctuation it strips, in its order (the order matters: each mark is tested against
# the answer as given, then removed from the answer as it has become).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")


def normalise_answer(answer: str) -> str:
    """The VQAv2 evaluation's normalisation, step for step: whitespace, punctuation (dropped where it touches a
    space or the answer has a comma inside a number, else made a space), periods not in numbers, lower case,
    number words to digits, articles out, contractions restored."""
    given = answer.replace("\n", " ").replace("\t", " ").strip()
    text = given
    for p in _PUNCTUATION:
        if p + " " in given or " " + p in given or _COMMA_NUMBER.search(given) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBERS.get(w, w) for w in text.lower().split() if _NUMBERS.get(w, w) not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_accuracy(answer: str, truths: Sequence[str]) -> float:
    """VQAv2's accuracy of one answer against the human answers (one or up to ten)."""
    answer = normalise_answer(answer)
    truths = [normalise_answer(t) for t in truths]
    if len(truths) == 1:
        return float(answer == truths[0])
    scores = [min(1.0, sum(t == answer for k, t in enumerate(truths) if k != left) / 3) for left in
              range(len(truths))]
    return sum(scores) / len(scores)


def asked(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records with an image, a question and its answer(s)."""
    return [r for r in records if r.get("image") is not None and r.get("question") and
            (r.get("answers") or r.get("answer") is not None)]


def said_yes_or_no(record: Mapping[str, Any]) -> bool:
    """Whether a question's answer is a plain yes or no (a POPE probe)."""
    return not record.get("answers") and str(record.get("answer", "")).lower() in ("yes", "no")


def vqa(model, records: Iterable[Mapping[str, Any]], batch_size: int = 32, max_new_tokens: int = 16,
        on_error: Callable[[Exception], None] | None = None) -> dict[str, float]:
    """VQAv2 accuracy over records with an image, a question and its `answers` (or one `answer`), overall and
    per `type` when the records have one."""
    rows = [r for r in asked(records) if not said_yes_or_no(r)]
    if not rows:
        raise InputError("vqa: no records with an image, a question and its answers")
    said, timing = replies(model, rows, [r["question"] for r in rows], batch_size, max_new_tokens, on_error)
    scores: dict[str, list[float]] = {}
    for record, answer in zip(rows, said):
        truths = record.get("answers") or [record["answer"]]
        score = 0.0 if answer is None else vqa_accuracy(answer, truths)
        scores.setdefault("accuracy", []).append(score)
        if record.get("type"):
            scores.setdefault(f"{record['type']}_accuracy", []).append(score)
    return {**{k: sum(v) / len(v) for k, v in scores.items()}, **timing, "n": len(rows)}


# POPE.

def said_yes(answer: str) -> bool:
    """POPE's reading of an answer, as its evaluation does it: the first sentence, commas out, "no" if a word is
    No, no or not, else "yes"."""
    words = answer.split(".")[0].replace(",", "").split(" ")
    return not any(w in ("No", "no", "not") for w in words)


def pope(model, records: Iterable[Mapping[str, Any]], batch_size: int = 32, max_new_tokens: int = 8,
         on_error: Callable[[Exception], None] | None = None) -> dict[str, float]:
    """POPE over yes/no object probes: records with an image, a question and `answer` yes or no."""
    rows = [r for r in asked(records) if said_yes_or_no(r)]
    if not rows:
        raise InputError("pope: no records with an image, a question and a yes/no answer")
    said, timing = replies(model, rows, [r["question"] for r in rows], batch_size, max_new_tokens, on_error)
    results = _pope_scores([(str(r["answer"]).lower() == "yes", a is not None and said_yes(a))
                            for r, a in zip(rows, said)])
    for kind in sorted({r["type"] for r in rows if r.get("type")}):
        part = _pope_scores([(str(r["answer"]).lower() == "yes", a is not None and said_yes(a))
                             for r, a in zip(rows, said) if r.get("type") == kind])
        results |= {f"{kind}_{k}": v for k, v in part.items() if k in ("accuracy", "f1")}
    return {**results, **timing, "n": len(rows)}


def _pope_scores(pairs: list[tuple[bool, bool]]) -> dict[str, float]:
    tp = sum(t and p for t, p in pairs)
    fp = sum(p and not t for t, p in pairs)
    fn = sum(t and not p for t, p in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": sum(t == p for t, p in pairs) / len(pairs), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(p for _, p in pairs) / len(pairs)}


# Captions.

def caption_tokens(text: str) -> list[str]:
    """Lower-cased words, punctuation dropped: what the COCO evaluation's tokeniser leaves of a caption."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], n: int = 4) -> float:
    """Corpus BLEU-n of tokenised candidates, each against its tokenised references (COCO's closest-length
    brevity penalty)."""
    hits, totals = [0] * n, [0] * n
    length = closest = 0
    for candidate, refs in zip(candidates, references):
        length += len(candidate)
        closest += min((abs(len(r) - len(candidate)), len(r)) for r in refs)[1]
        for k in range(1, n + 1):
            counts = _ngrams(candidate, k)
            most = Counter()
            for ref in refs:
                most |= _ngrams(ref, k)
            hits[k - 1] += sum(min(c, most[g]) for g, c in counts.items())
            totals[k - 1] += max(len(candidate) - k + 1, 0)
    tiny, small = 1e-15, 1e-9  # pycocoevalcap's smoothing of an empty precision
    log_precision = sum(math.log((h + tiny) / (t + small)) for h, t in zip(hits, totals)) / n
    ratio = (length + tiny) / (closest + small)
    brevity = 1.0 if ratio >= 1 else math.exp(1 - 1 / ratio)
    return brevity * math.exp(log_precision)


def cider_d(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
            n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D of tokenised candidates against their references, as pycocoevalcap's CiderD scores a corpus."""
    frequency: Counter = Counter()
    for refs in references:
        frequency.update({g for ref in refs for k in range(1, n + 1) for g in _ngrams(ref, k)})
    log_docs = math.log(float(len(references)))

    def vectors(words: Sequence[str]) -> tuple[list[dict], list[float], int]:
        vec, norms = [{} for _ in range(n)], [0.0] * n
        for k in range(1, n + 1):
            for gram, tf in _ngrams(words, k).items():
                weight = tf * (log_docs - math.log(max(1.0, frequency[gram])))
                vec[k - 1][gram] = weight
                norms[k - 1] += weight * weight
        return vec, [math.sqrt(x) for x in norms], max(len(words) - 1, 0)  # its length: how many bigrams

    def similarity(c, r) -> list[float]:
        (vc, nc, lc), (vr, nr, lr) = c, r
        delta = lc - lr
        out = []
        for k in range(n):
            dot = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vc[k].items())
            if nc[k] and nr[k]:
                dot /= nc[k] * nr[k]
            out.append(dot * math.exp(-(delta * delta) / (2 * sigma * sigma)))
        return out

    scores = []
    for candidate, refs in zip(candidates, references):
        c = vectors(candidate)
        total = [0.0] * n
        for ref in refs:
            total = [a + b for a, b in zip(total, similarity(c, vectors(ref)))]
        scores.append(sum(total) / n / len(refs) * 10.0)
    return sum(scores) / len(scores)


def captioning(model, records: Iterable[Mapping[str, Any]], batch_size: int = 32, max_new_tokens: int = 32,
               prompt: str = CAPTION_PROMPT, on_error: Callable[[Exception], None] | None = None
               ) -> dict[str, float]:
    """BLEU-4 and CIDEr-D of the model's captions over records with an image and its caption(s) (`text`, or a
    list under `captions`)."""
    rows = [r for r in records if r.get("image") is not None and (r.get("captions") or r.get("text"))]
    if not rows:
        raise InputError("caption: no records with an image and its captions")
    said, timing = replies(model, rows, [prompt] * len(rows), batch_size, max_new_tokens, on_error)
    candidates = [caption_tokens(c or "") for c in said]
    references = [[caption_tokens(t) for t in (r.get("captions") or [r["text"]])] for r in rows]
    return {"bleu4": bleu(candidates, references), "cider_d": cider_d(candidates, references), **timing,
            "n": len(rows)}


GENERATIVE_TASKS = {"caption": captioning, "vqa": vqa, "pope": pope}
