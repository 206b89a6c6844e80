"""Parity with Hugging Face transformers for causal language models: tiny random LlamaForCausalLM,
Qwen2ForCausalLM and MistralForCausalLM checkpoints written by transformers and loaded with `rosetta.load`
(logits, greedy and beam-search generation, padded batches), their tokenizers and chat templates, and the
export back to transformers.

Every reference model and tokenizer is built here; nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch

import rosetta
from rosetta.generation.tasks import complete

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|eot_id|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "A photo of a cat sitting on a mat, naïve café résumé.",
    "Language models generate text one token at a time.", "東京の夜景 🎉 emoji and CJK text.",
    "def add(a, b):\n    return a + b\n", "JSON: {\"name\": \"Ada\", \"age\": 36, \"tags\": [\"x\", \"y\"]}",
] * 20

# Templates in the styles checkpoints ship (written for these tests): ChatML with a default system prompt,
# a tool-calling one (tojson, tool_calls, the last message checked), and a Llama-3-like one (bos_token,
# strftime_now, namespace, raise_exception on a role it does not know).
CHATML_DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOOLS_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}
    {%- else %}{{- 'You can call tools.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls | default([]) %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.function.name + '", "arguments": ' }}
            {{- tool_call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
LLAMA_LIKE_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(system='') %}
{%- if messages[0]['role'] == 'system' %}{%- set ns.system = messages[0]['content'] | trim %}{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Today Date: ' + strftime_now('%d %b %Y') + '\\n\\n' + ns.system + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {%- if message['role'] != 'system' %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
    {%- if loop.last and add_generation_prompt %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
    {%- endif %}
{%- endfor %}
"""
TEMPLATES = {"chatml": CHATML_DEFAULT_SYSTEM, "tools": TOOLS_TEMPLATE, "llama": LLAMA_LIKE_TEMPLATE}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? naïve 東京 🎉"}],
    [{"role": "user", "content": "multi\nline\n\n  text"}, {"role": "assistant", "content": "ok"}],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
]


def _perturb(model: torch.nn.Module) -> None:
    """Move every weight off its initial value (unit norms, zero biases) so a misplaced tensor cannot hide."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A byte-level BPE learnt from a small corpus, wrapped and saved by transformers as checkpoints ship it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHATML_DEFAULT_SYSTEM,
    )


def _config(kind: str, vocab: int, **extra):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=SPECIALS.index("<|im_start|>"), eos_token_id=SPECIALS.index("<|im_end|>"),
                  pad_token_id=0)
    classes = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "mistral": transformers.MistralConfig}
    return classes[kind](**common, **extra)


CASES = {
    "llama3-tied": ("llama", dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama-linear-rope-biases": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0},
                                               attention_bias=True, mlp_bias=True)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "mistral-sliding-window": ("mistral", dict(sliding_window=16)),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, hf_tokenizer, tmp_path_factory):
    """(transformers model, Rosetta's load of the directory transformers saved, the directory)."""
    kind, extra = CASES[request.param]
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(_config(kind, len(hf_tokenizer), **extra)).eval()
    _perturb(ref)
    directory = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(directory)
    hf_tokenizer.save_pretrained(directory)
    return ref, rosetta.load(directory), directory


def _prompts(vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(5, vocab, (n,), generator=generator).tolist() for n in (20, 7, 13)]


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of prompts padded on the left to the longest, as transformers batches them."""
    length = max(map(len, prompts))
    ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_logits_match(pair):
    ref, ours, _ = pair
    ids = torch.tensor(_prompts(ref.config.vocab_size)[0] * 2)[None]  # 40 tokens: past Mistral's window
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max().item() <= ATOL


def test_left_padded_logits_match(pair):
    ref, ours, _ = pair
    prompts = _prompts(ref.config.vocab_size)
    ids, mask = _left_padded(prompts)
    with torch.no_grad():
        theirs, mine = ref(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask)
    assert (theirs - mine)[mask.bool()].abs().max().item() <= ATOL


def test_greedy_generation_is_identical_token_for_token(pair):
    ref, ours, _ = pair
    prompt = _prompts(ref.config.vocab_size)[0]
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    mine = complete(ours, [prompt], 32, ignore_eos=True)[0]
    assert mine.tokens == theirs[0, len(prompt):].tolist()
    assert mine.finish_reason == "length"


def test_batched_prompts_of_different_lengths_equal_each_alone(pair):
    _, ours, _ = pair
    prompts = _prompts(ours.config.vocab_size)
    alone = [complete(ours, [p], 24, ignore_eos=True)[0].tokens for p in prompts]
    together = [c.tokens for c in complete(ours, prompts, 24, ignore_eos=True)]
    assert together == alone


def test_batched_generation_matches_transformers_left_padded(pair, hf_tokenizer):
    ref, ours, _ = pair
    prompts = _prompts(ref.config.vocab_size)
    ids, mask = _left_padded(prompts)
    length = ids.shape[1]
    with torch.no_grad():
        theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    mine = complete(ours, prompts, 16, ignore_eos=True)
    assert [c.tokens for c in mine] == theirs[:, length:].tolist()


def test_beam_search_matches_transformers(pair):
    ref, ours, _ = pair
    prompt = _prompts(ref.config.vocab_size)[1]
    for length_penalty in (1.0, 0.5):
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=12, num_beams=3, do_sample=False,
                                  length_penalty=length_penalty)
        mine = complete(ours, [prompt], 12, num_beams=3, length_penalty=length_penalty)[0]
        expected = theirs[0, len(prompt):].tolist()
        eos = ref.config.eos_token_id
        assert mine.tokens == [t for t in expected if t != eos]


def test_export_loads_in_transformers_with_the_same_logits(pair, tmp_path):
    ref, ours, _ = pair
    ours.save_pretrained(tmp_path, format="transformers")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor(_prompts(ref.config.vocab_size)[0] * 2)[None]
    with torch.no_grad():
        assert (back(ids).logits - ref(ids).logits).abs().max().item() <= ATOL
    assert rosetta.load(tmp_path).config == ours.config
    exported_config = json.loads((tmp_path / "config.json").read_text())  # transformers 4 reads these
    assert exported_config["rope_theta"] == ref.config.rope_parameters["rope_theta"]
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert exported("naïve café 🎉").input_ids == ours.tokenizer.encode("naïve café 🎉")


def test_rosetta_format_round_trip(pair, tmp_path):
    _, ours, _ = pair
    ours.save_pretrained(tmp_path)
    again = rosetta.load(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["family"] == "lm"
    ids = torch.arange(5, 30)[None]
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))
    assert again.tokenizer.chat_template == ours.tokenizer.chat_template


def test_sharded_safetensors_load(pair, tmp_path):
    ref, ours, directory = pair
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        source = directory / name
        if source.exists():
            (tmp_path / name).write_bytes(source.read_bytes())
    ids = torch.arange(5, 30)[None]
    with torch.no_grad():
        assert (rosetta.load(tmp_path)(ids) - ours(ids)).abs().max().item() <= ATOL


def test_tokenizer_matches_transformers(pair, hf_tokenizer):
    _, ours, _ = pair
    for text in [*CORPUS[:6], "", "  leading spaces", "<|im_start|>user\nhi<|im_end|>"]:
        assert ours.tokenizer.encode(text) == hf_tokenizer(text).input_ids
        ids = hf_tokenizer(text).input_ids
        assert ours.tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_prompts_match_apply_chat_template(name, hf_tokenizer):
    from rosetta.modalities.chat import render
    from rosetta.modalities.text import LMTokenizer

    template = TEMPLATES[name]
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    ours = LMTokenizer(hf_tokenizer.backend_tokenizer, special, template)
    conversations = [*CONVERSATIONS, TOOL_CONVERSATION] if name == "tools" else CONVERSATIONS
    for messages in conversations:
        for add_generation_prompt in (True, False):
            for tools in ([None, TOOLS] if name == "tools" else [None]):
                theirs = hf_tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools,
                    chat_template=template, bos_token="<|begin_of_text|>")
                mine = render(template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                              special_tokens=ours.special_tokens)
                assert mine == theirs
                ids = hf_tokenizer.apply_chat_template(
                    messages, tokenize=True, add_generation_prompt=add_generation_prompt, tools=tools,
                    chat_template=template, bos_token="<|begin_of_text|>", return_dict=False)
                assert ours.encode(mine, add_special_tokens=False) == list(ids)


def test_a_template_that_refuses_a_conversation_is_one_clear_error():
    from rosetta.modalities.chat import TemplateError, render

    with pytest.raises(TemplateError, match="unknown role tool"):
        render(LLAMA_LIKE_TEMPLATE, [{"role": "tool", "content": "x"}], special_tokens={"bos_token": "<s>"})
    with pytest.raises(TemplateError, match="not valid Jinja"):
        render("{% for %}", [{"role": "user", "content": "x"}])


def test_templates_run_sandboxed():
    import jinja2

    from rosetta.modalities.chat import render

    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises((jinja2.exceptions.SecurityError, rosetta.InputError)):
        render(escape, [{"role": "user", "content": "x"}])
