"""`rosetta generate` and `rosetta chat` end to end, in a subprocess as a user runs them; loading a language
model by hub id from huggingface_hub's cache; and the one-line errors of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

import rosetta

TINY_LM = ["--model", "tiny-lm", "--random-init", "--device", "cpu"]


def run(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command's result, its output decoded as it was written (a random model writes carriage returns too)."""
    out = subprocess.run([sys.executable, "-m", "rosetta", *args], capture_output=True, timeout=120, env=env,
                         input=None if stdin is None else stdin.encode())
    out.stdout, out.stderr = out.stdout.decode(), out.stderr.decode()
    return out


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory) -> Path:
    """`tiny-lm` with the seeded weights every command's --random-init makes, saved in Rosetta's format."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("lm") / "tiny-lm"
    rosetta.create("tiny-lm").save_pretrained(directory)
    return directory


def test_generate_streams_the_completion(saved_lm):
    out = run("generate", *TINY_LM, "Hello", "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    expected = rosetta.load(saved_lm).generate("Hello", 12)
    assert out.stdout == expected + "\n"
    assert run("generate", "--model", str(saved_lm), "Hello", "--max-new-tokens", "12").stdout == out.stdout


def test_generate_compiled_writes_the_eager_text(saved_lm):
    out = run("generate", "--model", str(saved_lm), "--dtype", "fp32", "--compile", "Hello", "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    assert out.stdout == rosetta.load(saved_lm, dtype="fp32").generate("Hello", 12) + "\n"
    assert "CUDA" not in out.stderr


def test_generate_reads_the_prompt_from_stdin_and_samples_with_a_seed(saved_lm):
    args = ["generate", *TINY_LM, "-", "--max-new-tokens", "16", "--temperature", "1.0", "--top-p", "0.9",
            "--seed", "4"]
    first, second = run(*args, stdin="Once upon"), run(*args, stdin="Once upon")
    assert first.returncode == 0 and first.stdout == second.stdout
    expected = rosetta.load(saved_lm).generate("Once upon", 16, temperature=1.0, top_p=0.9, seed=4)
    assert first.stdout == expected + "\n"


def test_generate_with_a_json_schema_prints_valid_json(tmp_path):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    out = run("generate", *TINY_LM, "JSON:", "--json-schema", str(tmp_path / "schema.json"), "--max-new-tokens", "64")
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(out.stdout), schema)


def test_chat_one_turn_and_an_interactive_session_with_reset(saved_lm):
    lm = rosetta.load(saved_lm)
    one = run("chat", *TINY_LM, "--message", "hi", "--max-new-tokens", "8")
    assert one.returncode == 0 and one.stdout == lm.chat([{"role": "user", "content": "hi"}], 8) + "\n"
    session = run("chat", *TINY_LM, "--max-new-tokens", "6", stdin="hi\nmore\n/reset\nhi\n")
    assert session.returncode == 0, session.stderr
    replies = session.stdout.splitlines()
    first = lm.chat([{"role": "user", "content": "hi"}], 6)
    second = lm.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
                      {"role": "user", "content": "more"}], 6)
    assert "".join(replies) == first + second + first  # after /reset the history is gone
    assert "forgotten" in session.stderr


@pytest.mark.parametrize("args, reason", [
    (["generate", *TINY_LM, "x" * 600], "context window is 512"),
    (["generate", *TINY_LM, "x", "--json-schema", "/no/such/schema.json"], "cannot read it"),
    (["generate", *TINY_LM, "x", "--temperature", "-1"], "temperature"),
    (["generate", "--model", "tiny", "--random-init", "x"], "does not generate text"),
    (["chat", "--model", "not-a-model", "--message", "x"], "unknown model"),
])
def test_bad_input_is_one_line_and_exit_2(args, reason):
    out = run(*args)
    assert out.returncode == 2, out.stderr
    assert reason in out.stderr and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_a_schema_that_does_not_compile_is_one_line(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"type": "nonsense"}))
    out = run("generate", *TINY_LM, "x", "--json-schema", str(tmp_path / "bad.json"))
    assert out.returncode == 2 and "Invalid type: nonsense" in out.stderr and "Traceback" not in out.stderr


def test_an_unknown_architecture_names_what_config_json_says(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    out = run("generate", "--model", str(tmp_path), "x")
    assert out.returncode == 2
    assert "model_type 'gpt2' (GPT2LMHeadModel)" in out.stderr and "llama/qwen2/mistral" in out.stderr
    assert out.stderr.count("\n") == 1


def test_a_hub_id_loads_from_the_cache_offline(saved_lm, tmp_path):
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in saved_lm.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = run("generate", "--model", "smollm2-135m", "Hello", "--max-new-tokens", "12", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == rosetta.load(saved_lm).generate("Hello", 12) + "\n"
    missing = run("generate", "--model", "qwen2.5-0.5b", "x", env=env)
    assert missing.returncode == 2 and "Qwen/Qwen2.5-0.5B-Instruct" in missing.stderr
