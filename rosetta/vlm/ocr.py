"""Documents without weights: Tesseract reads the words and their boxes, and the layout fills a schema's fields
— the OCR-and-rules pipeline vision-language models are compared against, and the route that works offline.

    image ─▶ tesseract (words, boxes) ─▶ rows (words whose boxes share a baseline band, left to right)
          ─▶ per field of the schema: its label (the field's name, its description's phrases, usual synonyms)
             found in a row ─▶ the value to its right on that row, else the row below
          ─▶ typed: amounts for numbers, ISO dates for format "date", text for strings

`rosetta.load("ocr")` (`--model ocr`) gives an object with the calls of a vision-language model: `extract` fills
a schema, `ask` answers "what is the <label>?" from the layout, `caption` returns the text read.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rosetta.errors import InputError, RosettaError

AMOUNT = re.compile(r"[-+]?[$€£]?\s?\d[\d,]*(?:\.\d+)?")
DATE_FORMATS = ("%Y-%m-%d", "%d/%m/%Y", "%m/%d/%Y", "%B %d, %Y", "%b %d, %Y", "%d %b %Y", "%d %B %Y", "%d.%m.%Y",
                "%Y/%m/%d")
SYNONYMS = {"number": ("number", "no", "no.", "#", "num"), "total": ("total", "total due", "amount due", "balance due"),
            "date": ("date", "issued", "invoice date")}
ISSUER_FIELDS = ("vendor", "seller", "merchant", "company", "issuer", "from", "store")


@dataclass
class Word:
    text: str
    left: int
    top: int
    width: int
    height: int

    @property
    def middle(self) -> float:
        return self.top + self.height / 2


class OcrModel:
    """Tesseract and layout rules behind the calls of a vision-language model."""

    name = "ocr"

    def __init__(self, language: str = "eng"):
        if shutil.which("tesseract") is None:
            raise RosettaError("ocr: the tesseract program is not installed (apt-get install tesseract-ocr)")
        self.language = language

    def __repr__(self) -> str:
        return "OcrModel()"

    def read(self, image) -> list[list[Word]]:
        """The words of an image in rows, top to bottom, each left to right."""
        import pytesseract

        from rosetta.modalities.image import load_image

        picture = load_image(image).convert("L")
        try:
            data = pytesseract.image_to_data(picture, lang=self.language, output_type=pytesseract.Output.DICT)
        except pytesseract.TesseractError as e:
            raise InputError(f"ocr: tesseract failed ({e})") from None
        words = [Word(t.strip(), data["left"][i], data["top"][i], data["width"][i], data["height"][i])
                 for i, t in enumerate(data["text"]) if t.strip() and float(data["conf"][i]) >= 0]
        return rows(words)

    def text(self, image) -> str:
        return "\n".join(" ".join(w.text for w in row) for row in self.read(image))

    # The calls of a vision-language model.

    def caption(self, images, prompt: str | None = None, **ignored: Any):
        """The text read from each image (OCR does not describe pictures)."""
        many = isinstance(images, (list, tuple))
        texts = [self.text(image) for image in (images if many else [images])]
        return texts if many else texts[0]

    def ask(self, images, question: str, **ignored: Any) -> str:
        """The value beside the label the question names ("What is the total?"), else all the text."""
        image = images[0] if isinstance(images, (list, tuple)) else images
        table = self.read(image)
        words = [w for w in _tokens(question) if w not in ("what", "is", "the", "of", "a", "an", "which", "who")]
        overlaps = [(sum(w in _tokens(" ".join(x.text for x in row)) for w in words), i) for i, row in enumerate(table)]
        best = max(overlaps, default=(0, -1))
        if best[0] == 0:
            return "\n".join(" ".join(w.text for w in row) for row in table)
        row = table[best[1]]
        value = [w.text for w in row if not set(_tokens(w.text)) <= set(words)]
        return " ".join(value) if value else " ".join(w.text for w in row)

    def extract(self, image, schema: Mapping[str, Any] | str, **ignored: Any) -> dict[str, Any]:
        """The schema's fields found in the layout (those not found are left out)."""
        schema = json.loads(schema) if isinstance(schema, str) else schema
        self.check_schema(schema)
        table = self.read(image)
        out: dict[str, Any] = {}
        for name, spec in (schema.get("properties") or {}).items():
            value = fill(name, spec, table)
            if value is not None:
                out[name] = value
        return out

    def check_schema(self, schema: Mapping[str, Any]) -> None:
        from rosetta.hosted.base import check_schema

        check_schema(schema)
        if schema.get("type") != "object" or not isinstance(schema.get("properties"), Mapping):
            raise InputError("json schema: ocr fills an object's properties (type object with properties)")

    def reply(self, conversations: Sequence[Sequence[Mapping[str, Any]]], max_new_tokens: int = 256,
              json_schema=None, **ignored: Any) -> list[str]:
        from rosetta.models.vlm import CAPTION_PROMPT, _with_image_placeholders

        out = []
        for conversation in conversations:
            parts, images = _with_image_placeholders(conversation)
            if not images:
                raise InputError("ocr: the conversation has no image to read")
            question = " ".join(p["text"] for m in parts if isinstance(m.get("content"), list)
                                for p in m["content"] if p["type"] == "text")
            if json_schema is not None:
                out.append(json.dumps(self.extract(images[0], json_schema)))
            elif question.strip() == CAPTION_PROMPT:
                out.append(self.text(images[0]))
            else:
                out.append(self.ask(images[0], question))
        return out

    def reply_with_usage(self, conversations: Sequence[Sequence[Mapping[str, Any]]], max_new_tokens: int = 256,
                         json_schema=None, **ignored: Any):
        """As a hosted model's (the server asks both alike): the replies, and a usage of nothing (no tokens)."""
        from rosetta.hosted.base import Usage

        return self.reply(conversations, max_new_tokens, json_schema=json_schema), Usage()


def rows(words: list[Word]) -> list[list[Word]]:
    """Words grouped into rows: a word joins the row whose vertical middle is within half its height."""
    out: list[list[Word]] = []
    for word in sorted(words, key=lambda w: w.middle):
        if out and abs(word.middle - sum(w.middle for w in out[-1]) / len(out[-1])) <= word.height / 2:
            out[-1].append(word)
        else:
            out.append([word])
    return [sorted(row, key=lambda w: w.left) for row in out]


def _tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9#.]+", text.lower().replace(":", " ")) if t and t != "."]


def labels(name: str, spec: Mapping[str, Any]) -> list[list[str]]:
    """The ways a field's label may be printed, longest first, as token lists."""
    phrases = {name.replace("_", " ")}
    phrases |= {p.strip() for p in str(spec.get("description", "")).split(",") if 0 < len(p.split()) <= 4}
    for phrase in list(phrases):
        for key, alternatives in SYNONYMS.items():
            if key in phrase.split():
                phrases |= {phrase.replace(key, alternative) for alternative in alternatives}
    return sorted((_tokens(p) for p in phrases if _tokens(p)), key=len, reverse=True)


def fill(name: str, spec: Mapping[str, Any], table: list[list[Word]]) -> Any:
    """One field's value from the rows, typed as the schema says; None when it is not found."""
    if name.lower() in ISSUER_FIELDS and table:  # who issued it: the first line, printed largest, unlabelled
        return _typed(" ".join(w.text for w in table[0]), spec)
    for label in labels(name, spec):
        for i, row in enumerate(table):
            tokens = [_tokens(w.text) for w in row]
            flat = [(j, t) for j, ts in enumerate(tokens) for t in ts]
            for start in range(len(flat) - len(label) + 1):
                if [t for _, t in flat[start:start + len(label)]] != label:
                    continue
                end = row[flat[start + len(label) - 1][0]]
                right = " ".join(w.text for w in _right_of(end, table[max(0, i - 1) : i + 2])).strip(" :")
                value = _typed(right, spec) if right else None
                if value is None and i + 1 < len(table):  # the value under its label
                    left = row[flat[start][0]].left
                    below = [w.text for w in table[i + 1] if w.left >= left - 2 * row[0].height]
                    value = _typed(" ".join(below), spec)
                if value is not None:
                    return value
    return None


def _right_of(label: Word, nearby: list[list[Word]]) -> list[Word]:
    """The words to the right of a label on its line, left to right. A scan tilted by a degree or two puts a
    value at the far side of the page a row above or below: the band widens with the distance (tan 2°)."""
    found = [w for row in nearby for w in row if w.left > label.left + label.width
             and abs(w.middle - label.middle) <= label.height / 2 + 0.035 * (w.left - label.left - label.width)]
    return sorted(found, key=lambda w: w.left)


def _typed(text: str, spec: Mapping[str, Any]) -> Any:
    kind = spec.get("type")
    if kind in ("number", "integer"):
        amounts = AMOUNT.findall(text)
        if not amounts:
            return None
        number = float(re.sub(r"[^\d.\-+]", "", amounts[-1]))
        return int(number) if kind == "integer" else number
    if spec.get("format") == "date":
        return parse_date(text)
    return text.strip(" :;|-—–") or None


def parse_date(text: str) -> str | None:
    """An ISO date (YYYY-MM-DD) from the date formats documents print, or None."""
    text = " ".join(text.replace(",", ", ").split()).replace(" ,", ",")
    for length in range(min(4, len(text.split())), 0, -1):
        candidate = " ".join(text.split()[:length])
        for fmt in DATE_FORMATS:
            try:
                return datetime.datetime.strptime(candidate, fmt).date().isoformat()
            except ValueError:
                continue
    return None
