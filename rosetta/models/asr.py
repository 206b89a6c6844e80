"""Whisper: an encoder-decoder that writes what it hears. The config, the model, and `transcribe`.

    16 kHz samples ─▶ log-mel [n_mels, 3000] (30 s) ─▶ conv1d (GELU) ─▶ conv1d stride 2 (GELU)
        ─▶ + sinusoidal positions ─▶ [LN ─▶ self-attention ─▶ + ─▶ LN ─▶ MLP ─▶ +] × layers ─▶ LN
        ─▶ 1500 audio states

    tokens ─▶ embed + learned positions ─▶ [LN ─▶ causal self-attention (KV cache) ─▶ +
        ─▶ LN ─▶ cross-attention to the audio states ─▶ + ─▶ LN ─▶ MLP ─▶ +] × layers ─▶ LN ─▶ · embedᵀ ─▶ logits

The decoder is driven by the generation engine like any decoder; the cross-attention keys and values of
a window's audio are computed once, when its request is admitted (`bind`), and kept in the KV cache.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rosetta.errors import RosettaError
from rosetta.modalities.text import LMTokenizer, byte_whisper_tokenizer
from rosetta.models.registry import Family
from rosetta.nn.cache import CacheWindow, KVCache
from rosetta.nn.decoder import Attention
from rosetta.nn.linear import fast_linear
from rosetta.nn.transformer import MLP, CrossAttention, Transformer


@dataclass(frozen=True)
class ASRConfig:
    n_mels: int = 80
    audio_context: int = 1500  # audio states of a 30-second window
    width: int = 384
    encoder_layers: int = 4
    encoder_heads: int = 6
    decoder_layers: int = 4
    decoder_heads: int = 6
    mlp_dim: int = 1536
    vocab_size: int = 51865
    text_context: int = 448  # tokens the decoder can hold
    norm_eps: float = 1e-5
    multilingual: bool = True  # language tokens, and a translate task; English-only (.en) models have neither
    # Decoding settings the checkpoint ships (generation_config.json, or CTranslate2's config.json).
    alignment_heads: tuple[tuple[int, int], ...] = ()  # (layer, head) of the cross-attention that follows time
    suppress_tokens: tuple[int, ...] = ()  # never generated (non-speech symbols)
    begin_suppress_tokens: tuple[int, ...] = ()  # never generated first (blank, end-of-text)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ASRConfig:
        d = dict(d)
        heads = tuple(tuple(h) for h in d.pop("alignment_heads", ()))
        return cls(alignment_heads=heads, suppress_tokens=tuple(d.pop("suppress_tokens", ())),
                   begin_suppress_tokens=tuple(d.pop("begin_suppress_tokens", ())), **d)


def _whisper(width: int, layers: int, heads: int, vocab: int = 51865, n_mels: int = 80,
             decoder_layers: int | None = None) -> ASRConfig:
    return ASRConfig(n_mels=n_mels, width=width, encoder_layers=layers, encoder_heads=heads,
                     decoder_layers=decoder_layers or layers, decoder_heads=heads, mlp_dim=4 * width, vocab_size=vocab,
                     multilingual=vocab != 51864)


PRESETS: dict[str, ASRConfig] = {
    "whisper-tiny": _whisper(384, 4, 6),
    "whisper-tiny.en": _whisper(384, 4, 6, vocab=51864),
    "whisper-base": _whisper(512, 6, 8),
    "whisper-small": _whisper(768, 12, 12),
    "whisper-medium": _whisper(1024, 24, 16),
    "whisper-large-v3": _whisper(1280, 32, 20, vocab=51866, n_mels=128),
    "whisper-large-v3-turbo": _whisper(1280, 32, 20, vocab=51866, n_mels=128, decoder_layers=4),
    # Small enough to build and test in a second: its byte-level tokenizer (3 languages) and 1501 timestamps.
    "tiny-whisper": ASRConfig(width=64, encoder_layers=2, encoder_heads=4, decoder_layers=2, decoder_heads=4,
                              mlp_dim=128, vocab_size=256 + 11 + 1501, text_context=128,
                              alignment_heads=((1, 0), (1, 1)), begin_suppress_tokens=(32, 256)),
}

PRETRAINED: dict[str, str] = {
    "whisper-tiny": "openai/whisper-tiny",
    "whisper-tiny.en": "openai/whisper-tiny.en",
    "whisper-base": "openai/whisper-base",
    "whisper-small": "openai/whisper-small",
    "whisper-medium": "openai/whisper-medium",
    "whisper-large-v3": "openai/whisper-large-v3",
    "whisper-large-v3-turbo": "openai/whisper-large-v3-turbo",
}


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positions of the audio states: sines then cosines at geometric timescales."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


class AudioEncoder(nn.Module):
    def __init__(self, c: ASRConfig):
        super().__init__()
        self.conv1 = nn.Conv1d(c.n_mels, c.width, 3, padding=1)
        self.conv2 = nn.Conv1d(c.width, c.width, 3, stride=2, padding=1)
        self.pos_embed = nn.Parameter(sinusoids(c.audio_context, c.width), requires_grad=False)
        self.transformer = Transformer(c.width, c.encoder_layers, c.encoder_heads, c.mlp_dim, "gelu", c.norm_eps)
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """Log-mel features [B, n_mels, 3000] to audio states [B, 1500, width]."""
        x = F.gelu(self.conv1(mels.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        return self.norm(self.transformer(x + self.pos_embed[: x.shape[1]]))


class TextDecoderBlock(nn.Module):
    def __init__(self, c: ASRConfig):
        super().__init__()
        head_dim = c.width // c.decoder_heads
        self.attn_norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.attn = Attention(c.width, c.decoder_heads, c.decoder_heads, head_dim, qkv_bias=True, out_bias=True)
        self.cross_norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.cross = CrossAttention(c.width, c.decoder_heads)
        self.mlp_norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.mlp = MLP(c.width, c.mlp_dim, "gelu")

    def forward(self, x: torch.Tensor, window: CacheWindow, layer: int,
                scores: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`scores`, if given, collects this layer's cross-attention logits [B, heads, L, 1500] (for alignment)."""
        x = x + self.attn(self.attn_norm(x), None, window, layer)
        queries, (k, v) = self.cross_norm(x), window.context(layer)
        if scores is not None:
            scores.append(self.cross.scores(queries, k))
        x = x + self.cross.attend(queries, k, v)
        return x + self.mlp(self.mlp_norm(x))


class WhisperModel(nn.Module):
    def __init__(self, config: ASRConfig, tokenizer: LMTokenizer | None = None):
        super().__init__()
        c = self.config = config
        self.encoder = AudioEncoder(c)
        self.embed = nn.Embedding(c.vocab_size, c.width)
        self.pos_embed = nn.Parameter(torch.zeros(c.text_context, c.width))
        self.blocks = nn.ModuleList(TextDecoderBlock(c) for _ in range(c.decoder_layers))
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.int8_head = None  # the tied projection, when the model is quantised (rosetta.nn.quantize)
        self.tokenizer = tokenizer or byte_whisper_tokenizer()
        self._tokens: WhisperTokens | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos_embed, std=0.01)
        with torch.no_grad():
            self.encoder.pos_embed.copy_(sinusoids(self.config.audio_context, self.config.width))

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def context_length(self) -> int:
        return self.config.text_context

    @property
    def tokens(self) -> WhisperTokens:
        """The special tokens of this model's vocabulary."""
        if self._tokens is None:
            self._tokens = WhisperTokens.of(self.tokenizer, self.config)
        return self._tokens

    # The encoder

    def encode(self, mels: torch.Tensor) -> torch.Tensor:
        """Log-mel features [B, n_mels, 3000] to audio states [B, 1500, width]."""
        return self.encoder(mels.to(self.device))

    # The decoder, as the generation engine drives it

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)

    def new_cache(self, slots: int, capacity: int) -> KVCache:
        c = self.config
        head_dim = c.width // c.decoder_heads
        return KVCache(c.decoder_layers, c.decoder_heads, head_dim, slots, min(capacity, c.text_context), self.dtype,
                       self.device, context=(c.decoder_heads, c.audio_context))

    def bind(self, cache: KVCache, rows: slice, contexts: Sequence[torch.Tensor]) -> None:
        """Write each row's cross-attention keys and values, from its audio states [1500, width], into the cache."""
        states = torch.stack([c.to(self.device, self.dtype) for c in contexts])
        for layer, block in enumerate(self.blocks):
            k, v = block.cross.keys_values(states)
            cache.context_keys[layer][rows] = k
            cache.context_values[layer][rows] = v

    def forward(self, ids: torch.Tensor | None = None, *, embeds: torch.Tensor | None = None,
                positions: torch.Tensor, window: CacheWindow, last: int | None = None,
                scores: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [B, L, V] of tokens [B, L] at their positions (of the `last` positions only, when given)."""
        x = (self.embed(ids) if embeds is None else embeds.to(self.dtype)) + self.pos_embed[positions]
        for layer, block in enumerate(self.blocks):
            x = block(x, window, layer, scores)
        if last is not None:
            x = x[:, -last:]
        x = self.norm(x)
        return self.int8_head(x) if self.int8_head is not None else fast_linear(x, self.embed.weight)

    def tied_output_weight(self) -> torch.Tensor:
        return self.embed.weight

    def decoder_logits(self, ids: torch.Tensor, states: torch.Tensor,
                       scores: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [B, L, V] of whole token sequences [B, L] over audio states [B, 1500, width], without a cache;
        `scores` collects every layer's cross-attention logits."""
        cache = self.new_cache(ids.shape[0], ids.shape[1])
        self.bind(cache, slice(0, ids.shape[0]), list(states))
        window = cache.window(slice(0, ids.shape[0]), 0, ids.shape[1], torch.zeros(ids.shape[0], dtype=torch.long))
        positions = torch.arange(ids.shape[1], device=self.device).expand(ids.shape[0], -1)
        return self(ids.to(self.device), positions=positions, window=window, scores=scores)

    # Tasks

    def transcribe(self, audio, **options):
        """Segments (start, end, text, words...) of what is said in `audio` (a file, bytes, or 16 kHz samples)
        and the language; see `rosetta.speech.transcribe` for the options."""
        from rosetta.speech.transcribe import transcribe

        return transcribe(self, audio, **options)

    def save_pretrained(self, directory: str | Path, format: str = "rosetta") -> Path:
        from rosetta.models.registry import save

        return save(self, Path(directory), format)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"params={self.num_params() / 1e6:.1f}M, multilingual={self.config.multilingual}"


@dataclass(frozen=True)
class WhisperTokens:
    """The special tokens of a Whisper vocabulary, found by name (their ids differ between .en and multilingual)."""

    eot: int
    sot: int
    sot_prev: int
    transcribe: int
    translate: int
    no_timestamps: int
    no_speech: int
    timestamp_begin: int  # <|0.00|>; timestamps go up in steps of 0.02 s
    languages: dict[str, int] = field(default_factory=dict)  # "en" -> <|en|>

    @classmethod
    def of(cls, tokenizer: LMTokenizer, config: ASRConfig) -> WhisperTokens:
        def find(*names: str) -> int:
            for name in names:
                token = tokenizer.token_id(name)
                if token is not None:
                    return token
            raise RosettaError(f"the tokenizer lacks Whisper's {names[0]} token")

        no_timestamps = find("<|notimestamps|>")
        languages = {}
        for code in LANGUAGES:
            token = tokenizer.token_id(f"<|{code}|>")
            if token is not None and token < config.vocab_size:
                languages[code] = token
        return cls(eot=find("<|endoftext|>"), sot=find("<|startoftranscript|>"), sot_prev=find("<|startofprev|>"),
                   transcribe=find("<|transcribe|>"), translate=find("<|translate|>"), no_timestamps=no_timestamps,
                   no_speech=find("<|nospeech|>", "<|nocaptions|>"), timestamp_begin=no_timestamps + 1,
                   languages=languages if config.multilingual else {})


# Whisper's languages, in the order of its language tokens.
LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn": "kannada",
    "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona",
    "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian",
    "tg": "tajik", "sd": "sindhi", "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao",
    "uz": "uzbek", "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk",
    "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog",
    "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa",
    "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}


def read_tokenizer(directory: Path, config: ASRConfig) -> LMTokenizer:
    tokenizer = LMTokenizer.from_directory(directory)
    if tokenizer is None:
        raise RosettaError(f"{directory}: no tokenizer.json (Whisper checkpoints ship one)")
    return tokenizer


FAMILY = Family(
    name="asr", config_class=ASRConfig, model_class=WhisperModel, presets=PRESETS, pretrained=PRETRAINED,
    converters=("whisper", "ctranslate2"), read_tokenizer=read_tokenizer,
)
