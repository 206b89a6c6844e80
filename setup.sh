#!/usr/bin/env bash
# Sets up .venv with Rosetta and everything its tests and benchmarks compare against.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned to the build the reference libraries (open_clip needs torchvision) agree on.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test]"
# espeak-ng speaks the built-in speech dataset and the speech tests; Tesseract is the OCR backend (--model ocr);
# installed where apt can (as root).
if ! command -v espeak-ng >/dev/null || ! command -v tesseract >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng tesseract-ocr \
            fonts-dejavu-core fonts-liberation >/dev/null) \
            || echo "note: could not install espeak-ng and tesseract-ocr; the speech dataset and OCR need them"
    else
        echo "note: install espeak-ng and tesseract-ocr for the speech dataset and --model ocr"
    fi
fi
echo "Rosetta is installed in .venv (activate it with: source .venv/bin/activate)"
