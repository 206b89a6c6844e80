"""Documents without weights: the built-in invoices (deterministic, valid against their schema), the OCR
backend (Tesseract and layout rules) filling the schema, answering and reading them, the extract command and
`rosetta eval --task extract`, and the date parser (property-tested)."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import sys

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rosetta
from rosetta.data.invoices import DATE_FORMATS, SCHEMA, make_invoices
from rosetta.data.records import read_records
from rosetta.vlm.ocr import parse_date

needs_tesseract = pytest.mark.skipif(shutil.which("tesseract") is None, reason="needs tesseract-ocr")


@pytest.fixture(scope="module")
def invoices(tmp_path_factory):
    out = tmp_path_factory.mktemp("invoices")
    make_invoices(out, 6, seed=1)
    return out


def test_invoices_are_deterministic_and_valid(invoices, tmp_path):
    records = list(read_records(invoices / "test.jsonl"))
    assert len(records) == 6 and {r["layout"] for r in records} == {"invoice-right", "invoice-below", "receipt"}
    schema = json.loads((invoices / "schema.json").read_text())
    assert schema == SCHEMA
    for r in records:
        jsonschema.validate(r["fields"], schema)
        assert json.loads((invoices / "images" / f"{r['key']}.json").read_text()) == r["fields"]
    make_invoices(tmp_path, 3, seed=1)
    again = (tmp_path / "images" / "doc-000002.png").read_bytes()
    assert again == (invoices / "images" / "doc-000002.png").read_bytes()


@needs_tesseract
def test_ocr_fills_the_schema_from_the_layout(invoices):
    ocr = rosetta.load("ocr")
    records = list(read_records(invoices / "test.jsonl"))[:3]  # one of each layout (eval below reads all six)
    right = sum(ocr.extract(r["image"], SCHEMA).get(k) == v for r in records for k, v in r["fields"].items())
    assert right / (len(records) * 4) >= 0.9


@needs_tesseract
def test_ocr_answers_from_labels_and_reads_the_text(invoices):
    ocr = rosetta.load("ocr")
    record = next(iter(read_records(invoices / "test.jsonl")))
    assert f"{record['fields']['total']:,.2f}" in ocr.ask(record["image"], "What is the total?")
    assert record["fields"]["vendor"] in ocr.caption(record["image"])


@pytest.mark.slow  # two subprocesses over 200 rendered invoices; the OCR rules are tested in-process
@needs_tesseract
def test_the_extract_command_and_eval_take_ocr(invoices, tmp_path):
    record = next(iter(read_records(invoices / "test.jsonl")))
    done = subprocess.run([sys.executable, "-m", "rosetta", "extract", "--model", "ocr", "--schema",
                           str(invoices / "schema.json"), record["image"]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["fields"]["invoice_number"] == record["fields"]["invoice_number"]
    done = subprocess.run([sys.executable, "-m", "rosetta", "eval", "--task", "extract", "--model", "ocr", "--data",
                           str(invoices), "--out", str(tmp_path / "r.json")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "r.json").read_text())  # one task: one object
    assert result["task"] == "extract" and result["metrics"]["field_accuracy"] >= 0.9
    assert result["metrics"]["latency_p95_s"] >= result["metrics"]["latency_p50_s"] > 0


@needs_tesseract
def test_a_schema_ocr_cannot_fill_is_one_line(invoices, tmp_path):
    (tmp_path / "s.json").write_text('{"type": "array"}')
    done = subprocess.run([sys.executable, "-m", "rosetta", "extract", "--model", "ocr", "--schema",
                           str(tmp_path / "s.json"), str(invoices / "images" / "doc-000000.png")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "object" in done.stderr


@given(st.dates(min_value=datetime.date(1950, 1, 1), max_value=datetime.date(2090, 12, 31)),
       st.sampled_from(DATE_FORMATS))
@settings(max_examples=200, deadline=None)
def test_dates_in_every_printed_format_parse_back(day, fmt):
    assert parse_date(day.strftime(fmt)) == day.isoformat()
