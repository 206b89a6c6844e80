"""Vision-language backends that are not weights: "ocr" (Tesseract and layout rules) and the hosted models
("openai:gpt-4o", "anthropic:...", "gemini:..."). `rosetta.load` asks here before looking for a checkpoint."""

from __future__ import annotations


def backend(name: object):
    """The backend `name` names, or None when it names none (a checkpoint, then)."""
    from rosetta.hosted import is_hosted, load_hosted

    if name == "ocr":
        from rosetta.vlm.ocr import OcrModel

        return OcrModel()
    if is_hosted(name):
        return load_hosted(name)
    return None
