"""Text: a checkpoint's own tokenizer, run by the `tokenizers` library, into fixed-length id tensors.

Three sources are understood: a `tokenizer.json` (any checkpoint saved by transformers or Rosetta),
CLIP's BPE files (`vocab.json` + `merges.txt`), and a SentencePiece model (`spiece.model`, as SigLIP
ships). Models trained from scratch use a byte-level tokenizer that needs no files at all.
"""

from __future__ import annotations

import html
import json
import re
import string
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from rosetta.errors import InputError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def clean_clip(text: str) -> str:
    """CLIP's text cleaning: repair mojibake, unescape HTML, collapse whitespace."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r"\s+", " ", text).strip()


def clean_siglip(text: str) -> str:
    """SigLIP's canonical form: lower case, punctuation removed, single spaces."""
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).strip()


def clean_none(text: str) -> str:
    return text


# Module-level functions, so a tokenizer pickles into DataLoader workers.
CLEANERS = {"clip": clean_clip, "siglip": clean_siglip, "none": clean_none}


class TextTokenizer:
    """Turns strings into `[N, context_length]` id tensors padded with `pad_id`.

    Truncation is explicit: with `truncate=True` long texts are cut to fit (the end-of-text token is
    kept); with `truncate=False` a text that does not fit raises InputError.
    """

    def __init__(self, backend: Tokenizer, context_length: int, pad_id: int, cleaning: str = "clip"):
        if cleaning not in CLEANERS:
            raise ValueError(f"unknown text cleaning {cleaning!r} (expected one of {sorted(CLEANERS)})")
        self.backend = backend
        self.context_length = context_length
        self.pad_id = pad_id
        self.clean = CLEANERS[cleaning]
        self.backend.no_padding()
        # tokenizers truncates the text, then adds start- and end-of-text: the pooled token survives.
        self.backend.enable_truncation(context_length)

    def encode(self, text: str, truncate: bool = True) -> list[int]:
        encoding = self.backend.encode(self.clean(text))
        if encoding.overflowing and not truncate:
            raise InputError(
                f"text {text[:40]!r}: longer than the context length of {self.context_length} tokens "
                "(pass truncate=True to cut it)"
            )
        return encoding.ids

    def __call__(self, texts: str | Sequence[str], truncate: bool = True) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text, truncate=truncate)
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def save(self, directory: Path) -> None:
        from rosetta.files import atomic_write

        atomic_write(Path(directory) / "tokenizer.json", lambda f: f.write(self.backend.to_str().encode()))


def _bytes_bpe() -> Tokenizer:
    """A byte-level tokenizer with one token per byte (ids 0-255) and no merges."""
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_tokenizer() -> Tokenizer:
    """Bytes 0-255, then start- and end-of-text: a tokenizer for models trained from scratch."""
    tok = _bytes_bpe()
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 256), (EOS, 257)]
    )
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, as ByteLevel uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A lower-cased byte-level BPE learned from `texts`: short sequences for a model trained from scratch."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))]
    )
    return tok


def train_lm_tokenizer(texts: Sequence[str], vocab_size: int, extra_special: Sequence[str] = ()) -> LMTokenizer:
    """A byte-level BPE learned from `texts` (case kept) with ChatML's special tokens and `extra_special`: the
    tokenizer of a language model trained from scratch."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_special]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*texts, "user", "assistant", "system"], trainer)
    names = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    return LMTokenizer(tok, names, CHATML)


# OpenAI's CLIP BPE merges (MIT licence, Copyright (c) 2021 OpenAI: CLIP_BPE_LICENSE beside it), as CLIP and
# open_clip ship them: the tokenizer of every OpenAI and open_clip CLIP, so that a checkpoint without tokenizer
# files loads offline.
OPENAI_CLIP_MERGES = Path(__file__).with_name("clip_bpe_simple_vocab_16e6.txt.gz")
CLIP_VOCAB_SIZE = 49408


def openai_clip_bpe() -> Tokenizer:
    """OpenAI CLIP's tokenizer from the merges Rosetta ships: 256 bytes, the same with `</w>`, one token per
    merge (the first 48,894 of the file), then start- and end-of-text — CLIP's 49,408 ids in CLIP's order."""
    import gzip

    lines = gzip.decompress(OPENAI_CLIP_MERGES.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_VOCAB_SIZE - 2 * 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS, EOS]
    return _clip_tokenizer({token: i for i, token in enumerate(tokens)}, merges)


def clip_bpe(vocab_file: Path, merges_file: Path) -> Tokenizer:
    """CLIP's byte-level BPE (lower-cased, words end in `</w>`) from its vocab and merges files."""
    vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    lines = Path(merges_file).read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    return _clip_tokenizer(vocab, merges)


def _clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, ...]]) -> Tokenizer:
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                   unk_token=EOS, fuse_unk=False)
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True
        ),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return tok


def sentencepiece_unigram(model_file: Path, eos: str = "</s>") -> Tokenizer:
    """A SentencePiece unigram model (`spiece.model`) as a `tokenizers` Unigram tokenizer + end-of-text."""
    pieces, unk_id, charsmap = _read_sentencepiece(Path(model_file).read_bytes())
    tok = Tokenizer(models.Unigram([(p, s) for p, s, _ in pieces], unk_id=unk_id, byte_fallback=False))
    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    # A literal "▁" is a space to SentencePiece. Its normalizer can turn characters into spaces (zero-width ones,
    # for example); like SentencePiece, drop those at either end and collapse runs, or they become "▁" tokens.
    tok.normalizer = normalizers.Sequence([
        normalizers.Replace("▁", " "), *steps, normalizers.Replace(Regex(r"\A +| +\z"), ""),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    specials = [p for p, _, kind in pieces if kind in (2, 3)]  # UNKNOWN, CONTROL
    tok.add_special_tokens(specials)
    eos_id = next(i for i, (p, _, _) in enumerate(pieces) if p == eos)
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, eos_id)])
    return tok


def _read_sentencepiece(data: bytes) -> tuple[list[tuple[str, float, int]], int, bytes]:
    """Parse the parts of SentencePiece's ModelProto we need: pieces (text, score, type) and the charsmap."""
    pieces: list[tuple[str, float, int]] = []
    charsmap = b""
    for field, value in _protobuf_fields(data):
        if field == 1:  # repeated SentencePiece
            piece, score, kind = "", 0.0, 1
            for f, v in _protobuf_fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    score = v
                elif f == 3:
                    kind = v
            pieces.append((piece, score, kind))
        elif field == 3:  # NormalizerSpec
            for f, v in _protobuf_fields(value):
                if f == 2:
                    charsmap = v
    unk_id = next((i for i, (_, _, kind) in enumerate(pieces) if kind == 2), 0)
    return pieces, unk_id, charsmap


def _protobuf_fields(data: bytes):
    """Yield (field number, value) from protobuf wire format: varints as int, fixed32 as float, bytes."""
    import struct

    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<d", data, pos)[0], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = struct.unpack_from("<f", data, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def load_tokenizer_files(directory: Path) -> Tokenizer | None:
    """The tokenizer a checkpoint directory ships, in order of preference; None if it has none."""
    directory = Path(directory)
    if (directory / "tokenizer.json").exists():
        return Tokenizer.from_file(str(directory / "tokenizer.json"))
    if (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
        return clip_bpe(directory / "vocab.json", directory / "merges.txt")
    if (directory / "spiece.model").exists():
        return sentencepiece_unigram(directory / "spiece.model")
    return None


# Language models: a checkpoint's tokenizer, its special tokens and its chat template.

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class LMTokenizer:
    """A language model's tokenizer: text to ids and back, its special tokens, and its chat template.

    Encoding follows `tokenizer.json` exactly as transformers' fast tokenizers do (including whether a
    start-of-text token is added); `chat_template` is the Jinja template from `tokenizer_config.json` or
    `chat_template.jinja`, rendered by `rosetta.modalities.chat`.
    """

    def __init__(self, backend: Tokenizer, special_tokens: dict[str, str] | None = None,
                 chat_template: str | dict[str, str] | None = None):
        self.backend = backend
        self.backend.no_padding()
        self.backend.no_truncation()
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template

    @classmethod
    def from_directory(cls, directory: Path) -> LMTokenizer | None:
        """The tokenizer a checkpoint ships (`tokenizer.json` + `tokenizer_config.json`); None without one."""
        directory = Path(directory)
        if not (directory / "tokenizer.json").exists():
            return None
        backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        special = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}
        if (directory / "chat_template.jinja").exists():  # where transformers 4.50+ saves it
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        elif template is None and (directory / "chat_template.json").exists():  # a processor's (LLaVA's)
            template = json.loads((directory / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        return cls(backend, special, template)

    def save(self, directory: Path) -> None:
        from rosetta.files import atomic_write, write_json

        directory = Path(directory)
        atomic_write(directory / "tokenizer.json", lambda f: f.write(self.backend.to_str().encode()))
        config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens}
        if isinstance(self.chat_template, dict):
            config["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_template.items()]
        elif self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_json(directory / "tokenizer_config.json", config)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("eos_token"))

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("bos_token"))

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_lm_tokenizer() -> LMTokenizer:
    """Bytes 0-255 and ChatML's special tokens: the tokenizer of language models built untrained."""
    tok = _bytes_bpe()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    return LMTokenizer(tok, special, CHATML)


WHISPER_SPECIALS = ("<|endoftext|>", "<|startoftranscript|>")
WHISPER_TASKS = ("<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                 "<|notimestamps|>")


def byte_whisper_tokenizer(languages: Sequence[str] = ("en", "de", "fr")) -> LMTokenizer:
    """Bytes 0-255 and Whisper's special tokens in Whisper's order (end-of-text, start, languages, tasks...,
    no-timestamps; the timestamps follow it): the tokenizer of Whisper models built untrained."""
    tok = _bytes_bpe()
    tok.add_special_tokens([*WHISPER_SPECIALS, *(f"<|{code}|>" for code in languages), *WHISPER_TASKS])
    return LMTokenizer(tok, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
