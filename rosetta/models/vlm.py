"""Vision-language models of the LLaVA and Idefics3 / SmolVLM families: an image tower, a projector, and a
language model that reads the image as a run of embeddings in its prompt. The tasks on them — `caption`,
`ask`, `chat`, `extract`.

    image ─▶ (SmolVLM: resized to whole tiles; the tiles row by row, then the whole image as one more tile)
          ─▶ ViT (CLIP or SigLIP) ─▶ hidden states of an inner layer (LLaVA: the second last, patch tokens)
             or of the last, normalised (SmolVLM)
          ─▶ projector (LLaVA-1.5: linear ─▶ GELU ─▶ linear; SmolVLM: pixel shuffle ─▶ linear)
          ─▶ image_tokens embeddings per tile
    conversation ─▶ chat template, <image> where each image goes ─▶ each <image> expanded (LLaVA: one token per
          patch; SmolVLM: tile markers and tokens per tile) ─▶ token ids ─▶ embeddings, the image tokens'
          replaced by the images' ─▶ the language model

The language model is the `CausalLM` of rosetta.models.lm, driven by the same generation engine: a prompt
is handed over as embeddings, and decoding goes on from there as for text.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from rosetta.errors import InputError, RosettaError
from rosetta.modalities.image import ImageInput, load_image, preprocess
from rosetta.modalities.text import LMTokenizer, byte_lm_tokenizer
from rosetta.models.config import ImageConfig, VisionConfig
from rosetta.models.encoders import VisionTransformer
from rosetta.models.lm import CausalLM, LMConfig, read_tokenizer
from rosetta.models.registry import Family
from rosetta.nn.linear import Linear
from rosetta.nn.transformer import activation

IMAGE_TOKEN = "<image>"
CAPTION_PROMPT = "Describe this image in one sentence."
EXTRACT_PROMPT = "Read the document in the image and fill in this JSON schema:\n{schema}\nAnswer with JSON only."

# The prompt format LLaVA-1.5 was tuned with, for checkpoints that ship no chat template.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '</s>' if message['role'] == 'assistant' else ' ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# ChatML with image parts: the template of VLMs built untrained.
CHATML_IMAGES = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Tiling:
    """How SmolVLM cuts an image: longest side to `longest_edge`, then up to whole `tile`s; the tiles row by row
    and the whole image squeezed to one tile. `longest_edge` is the per-image budget: at most
    ceil(longest_edge / tile)² + 1 tiles, so an 8-megapixel photo costs what a 2-megapixel one does."""

    longest_edge: int = 2048
    tile: int = 512
    fake_token: str = "<fake_token_around_image>"
    global_token: str = "<global-img>"


@dataclass(frozen=True)
class VLMConfig:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(
        image_size=336, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096))
    text: LMConfig = field(default_factory=LMConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    image_token_id: int = 32000
    feature_layer: int = -2  # transformers' hidden_states index the projector reads (LLaVA: the second last)
    keep_class_token: bool = False  # LLaVA's vision_feature_select_strategy: "default" drops it, "full" keeps it
    projector: str = "mlp"  # "mlp": LLaVA-1.5's two layers; "shuffle": Idefics3's pixel shuffle and one linear
    projector_act: str = "gelu"
    projector_bias: bool = True
    scale_factor: int = 1  # pixel shuffle: scale_factor x scale_factor neighbouring patches make one token
    feature_norm: bool = False  # the tower's final norm on its last states (SmolVLM), not an inner layer's
    tiling: Tiling | None = None  # None: one square image (LLaVA)
    # Prompts encoded with the tokenizer's special tokens (a Llama tokenizer's BOS) unless the template already
    # begins with BOS, as transformers' processors encode them: on for checkpoints read from transformers; off
    # for the tokenizers of models built here, which also end every text with EOS.
    add_special_tokens: bool = False

    def __post_init__(self) -> None:
        if self.projector not in ("mlp", "shuffle"):
            raise ValueError(f"unknown projector {self.projector!r} (expected mlp or shuffle)")

    @property
    def image_tokens(self) -> int:
        """Prompt tokens one image (a tiled model: one tile) takes."""
        if self.projector == "shuffle":
            return self.vision.num_patches // self.scale_factor**2
        return self.vision.num_patches + int(self.vision.class_token and self.keep_class_token)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VLMConfig:
        d = dict(d)
        image = {k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("image", {}).items()}
        tiling = d.pop("tiling", None)
        return cls(vision=VisionConfig(**d.pop("vision", {})), text=LMConfig.from_dict(d.pop("text", {})),
                   image=ImageConfig(**image), tiling=Tiling(**tiling) if tiling else None, **d)


def byte_vlm_tokenizer() -> LMTokenizer:
    """The byte-level tokenizer of untrained language models, with an <image> token (id 259) and image parts
    in its chat template."""
    tokenizer = byte_lm_tokenizer()
    tokenizer.backend.add_special_tokens([IMAGE_TOKEN])
    tokenizer.chat_template = CHATML_IMAGES
    return tokenizer


PRESETS: dict[str, VLMConfig] = {
    # LLaVA-1.5: CLIP ViT-L/14 at 336 px, Vicuna-7B (a Llama 2); 576 image tokens.
    "llava-1.5-7b": VLMConfig(
        text=LMConfig(vocab_size=32064, width=4096, layers=32, heads=32, kv_heads=32, mlp_dim=11008,
                      context_length=4096, tie_embeddings=False, bos_token_id=1, eos_token_ids=(2,),
                      pad_token_id=32001),
        image_token_id=32000,
    ),
    # For tests: a 2-block ViT on 32 px images (16 patches) and tiny-lm's shape, with the byte tokenizer.
    "tiny-vlm": VLMConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, act="gelu"),
        text=LMConfig(vocab_size=260, width=64, layers=2, heads=4, kv_heads=2, mlp_dim=128, context_length=512,
                      tie_embeddings=False, bos_token_id=257, eos_token_ids=(258,), pad_token_id=256),
        image_token_id=259,
    ),
}
PRESETS |= {
    # SmolVLM-256M: SigLIP B/16 at 512 px, pixel shuffle by 4 (64 tokens a tile), SmolLM2-135M; tiles of 512 px.
    "smolvlm-256m": VLMConfig(
        vision=VisionConfig(image_size=512, patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072,
                            act="gelu_tanh", norm_eps=1e-6, class_token=False, pre_norm=False, patch_bias=True,
                            pool="mean"),
        text=LMConfig(vocab_size=49280, width=576, layers=30, heads=9, kv_heads=3, mlp_dim=1536,
                      rope_theta=100000.0, context_length=8192, tie_embeddings=False, bos_token_id=1,
                      eos_token_ids=(49279,), pad_token_id=2),
        image=ImageConfig(resize="squash", interpolation="lanczos", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        image_token_id=49190, projector="shuffle", projector_bias=False, scale_factor=4, feature_norm=True,
        tiling=Tiling(longest_edge=2048, tile=512),
    ),
}
PRETRAINED: dict[str, str] = {"llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
                              "smolvlm-256m": "HuggingFaceTB/SmolVLM-256M-Instruct"}


class Projector(nn.Module):
    """Image-tower states to language-model embeddings: two linear layers with an activation between."""

    def __init__(self, vision_width: int, width: int, act: str, bias: bool):
        super().__init__()
        self.fc1 = Linear(vision_width, width, bias=bias)
        self.act = activation(act)
        self.fc2 = Linear(width, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ShuffleProjector(nn.Module):
    """Idefics3's: each s x s square of patch states concatenated into one token (s² fewer tokens), then one
    linear layer into the language model's width."""

    def __init__(self, vision_width: int, width: int, scale: int, bias: bool):
        super().__init__()
        self.scale = scale
        self.fc = Linear(vision_width * scale * scale, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        side, s = math.isqrt(tokens), self.scale
        x = x.view(n, side // s, s, side // s, s, dim).permute(0, 1, 3, 2, 4, 5)  # [n, row, col, dy, dx, dim]
        return self.fc(x.reshape(n, tokens // (s * s), s * s * dim))


class VisionLanguageModel(nn.Module):
    def __init__(self, config: VLMConfig, tokenizer: LMTokenizer | None = None):
        super().__init__()
        self.config = config
        self.vision = VisionTransformer(config.vision)
        if config.projector == "shuffle":
            self.projector = ShuffleProjector(config.vision.width, config.text.width, config.scale_factor,
                                              config.projector_bias)
        else:
            self.projector = Projector(config.vision.width, config.text.width, config.projector_act,
                                       config.projector_bias)
        self.lm = CausalLM(config.text, tokenizer or byte_vlm_tokenizer())
        with torch.no_grad():
            nn.init.normal_(self.vision.pos_embed, std=0.02)
            if self.vision.cls_token is not None:
                nn.init.normal_(self.vision.cls_token, std=0.02)

    @property
    def tokenizer(self) -> LMTokenizer:
        return self.lm.tokenizer

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.dtype

    @property
    def context_length(self) -> int:
        return self.lm.context_length

    @property
    def language_model(self) -> CausalLM:
        """The decoder the generation engine runs (a prompt reaches it as embeddings)."""
        return self.lm

    # Tensors in, logits out: what training and parity tests use.

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [N, 3, H, W] of images (tiles) to the embeddings that stand for each in the prompt,
        [N, image_tokens, width]."""
        pixels = pixels.to(self.device)
        if self.config.feature_norm:
            states = self.vision.tokens(pixels)
        else:
            states = self.vision.layer_states(pixels, self.config.feature_layer)
        if self.vision.cls_token is not None and not self.config.keep_class_token:
            states = states[:, 1:]
        return self.projector(states)

    def idle_vision_parts(self) -> list[nn.Module]:
        """The tower's parts `encode_images` never runs (the blocks after the feature layer, the final norm, a
        pooling head): frozen when the tower trains, as DDP wants every trained weight to get a gradient."""
        pool = [self.vision.pool] if hasattr(self.vision, "pool") else []
        if self.config.feature_norm:
            return pool
        blocks = self.vision.transformer.blocks
        used = self.config.feature_layer % (len(blocks) + 1)
        return [*blocks[used:], self.vision.norm, *pool]

    def embed_prompt(self, ids: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings [B, L, width] of `ids` [B, L], the image tokens' replaced, in order, by `features`."""
        x = self.lm.embed(ids.to(self.device))
        slots = ids.to(self.device) == self.config.image_token_id
        expected = 0 if features is None else features.shape[0] * features.shape[1]
        if int(slots.sum()) != expected:
            raise InputError(f"the prompt has {int(slots.sum())} image tokens for {expected} image embeddings")
        if features is not None:
            x = x.masked_scatter(slots[..., None], features.to(x.dtype))
        return x

    def forward(self, ids: torch.Tensor, pixels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **lm_options: Any) -> torch.Tensor:
        """Logits [B, L, V] of prompts `ids` [B, L] whose image tokens stand for `pixels` [N, 3, H, W], in order;
        `lm_options` (positions, window) go to the language model, as packed training sequences need."""
        features = self.encode_images(pixels) if pixels is not None else None
        return self.lm(embeds=self.embed_prompt(ids, features), attention_mask=attention_mask, **lm_options)

    # Images and text in, text out.

    def chat(self, messages: Sequence[Mapping[str, Any]], max_new_tokens: int = 256, **options: Any) -> str:
        """The assistant's reply to a conversation whose content parts may hold images: OpenAI's
        `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`, or `{"type": "image",
        "image": path | bytes | PIL image}`, or `{"type": "video", "video": path}` (sampled to frames)."""
        return self.reply([messages], max_new_tokens, **options)[0]

    def ask(self, images: ImageInput | Sequence[ImageInput], question: str, max_new_tokens: int = 256,
            **options: Any) -> str:
        """The answer to a question about an image, several images, or a video (a path ending in a video suffix)."""
        return self.reply([[user(images, question)]], max_new_tokens, **options)[0]

    def caption(self, images: ImageInput | Sequence[ImageInput], prompt: str = CAPTION_PROMPT,
                max_new_tokens: int = 64, **options: Any) -> str | list[str]:
        """A caption for an image (a list of captions for a list of images), decoded together."""
        many = isinstance(images, (list, tuple))
        captions = self.reply([[user([image], prompt)] for image in (images if many else [images])],
                              max_new_tokens, **options)
        return captions if many else captions[0]

    def extract(self, image: ImageInput, schema: Mapping[str, Any] | str, prompt: str | None = None,
                max_new_tokens: int = 512, **options: Any) -> dict[str, Any]:
        """The fields of `schema` (a JSON Schema) read from an image: decoding is constrained to the schema, so
        the dict always validates against it."""
        schema = json.loads(schema) if isinstance(schema, str) else dict(schema)
        question = (prompt or EXTRACT_PROMPT).replace("{schema}", json.dumps(schema))
        text = self.reply([[user([image], question)]], max_new_tokens, json_schema=schema, **options)[0]
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise RosettaError(f"extract: the answer is not complete JSON within {max_new_tokens} tokens "
                               "(raise max_new_tokens)") from None

    def check_schema(self, schema: Mapping[str, Any]) -> None:
        """SchemaError (an InputError) unless the constrained decoder compiles `schema`."""
        self.lm.grammars.json_schema(schema)

    def reply(self, conversations: Sequence[Sequence[Mapping[str, Any]]], max_new_tokens: int = 256,
              **options: Any) -> list[str]:
        """The assistant's reply to each conversation, decoded together."""
        from rosetta.generation.tasks import complete

        prompts = [self.prompt_embeds(messages) for messages in conversations]
        with torch.inference_mode():
            completions = complete(self.lm, [ids for ids, _ in prompts], max_new_tokens,
                                   prompt_embeds=[embeds for _, embeds in prompts], **options)
        return [c.text for c in completions]

    @torch.inference_mode()
    def prompt_embeds(self, messages: Sequence[Mapping[str, Any]],
                      fetch: Callable[[str], bytes] | None = None) -> tuple[list[int], torch.Tensor]:
        """A conversation's token ids and its embeddings [len(ids), width], the images' spliced in."""
        ids, images = self.prompt(messages, fetch)
        return ids, self.embed_prompt(torch.tensor([ids]), self._features(images))[0]

    def prompt(self, messages: Sequence[Mapping[str, Any]],
               fetch: Callable[[str], bytes] | None = None) -> tuple[list[int], list]:
        """The token ids of a conversation (one token per image patch where each image goes) and its images.
        `fetch` reads the bytes of a remote image URL; without it, only data: URLs are read."""
        parts, images = _with_image_placeholders(messages, fetch)
        ids, _, tiles = self._tokens([(self._render(parts), False)], images)
        return ids, tiles

    def training_ids(self, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[bool], list]:
        """A whole conversation as it is trained on: its token ids, which of them are the assistant's replies
        (each reply with the end-of-turn token that stops it: what the loss is taken on), and its images."""
        parts, images = _with_image_placeholders(messages)
        chunks, done = [], ""
        for i, message in enumerate(parts):
            if message["role"] != "assistant":
                continue
            head, whole = self._render(parts[:i], True), self._render(parts[: i + 1], False)
            if not head.startswith(done) or not whole.startswith(head):
                raise RosettaError("the chat template does not render a conversation as the prompt of its next "
                                   "reply followed by the reply: cannot tell the replies apart to train on them")
            reply, eos = whole[len(head):], self.tokenizer.special_tokens.get("eos_token")
            cut = reply.rindex(eos) + len(eos) if eos and eos in reply else len(reply)  # not the newline after it
            chunks += [(head[len(done):], False), (reply[:cut], True), (reply[cut:], False)]
            done = whole
        chunks.append((self._render(parts, False)[len(done):], False))
        return self._tokens([c for c in chunks if c[0]], images)

    def _render(self, parts: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        from rosetta.modalities.chat import render

        template = self.tokenizer.chat_template or LLAVA_TEMPLATE
        return render(template, parts, add_generation_prompt=add_generation_prompt,
                      special_tokens=self.tokenizer.special_tokens)

    def _tokens(self, chunks: list[tuple[str, bool]], images: list) -> tuple[list[int], list[bool], list]:
        """Token ids of rendered text chunks (each flagged as a reply or not), every image marker expanded into
        the tokens of its tiles; the flag of each id (a token overlapping a reply's text); the tiles in order.
        The chunks are tokenised as one string: tokenisers that mark word starts (SentencePiece's) would
        tokenise a chunk alone differently."""
        marker = self.tokenizer.backend.id_to_token(self.config.image_token_id)
        placed = sum(text.count(marker) for text, _ in chunks)
        if placed != len(images):
            raise RosettaError(f"the chat template placed {placed} image tokens for {len(images)} images")
        tiled = [self.tiles(image) for image in images]
        grids = iter(tiled)
        text, replies = "", []
        for chunk, reply in chunks:
            pieces = chunk.split(marker)
            expanded = pieces[0]
            for piece in pieces[1:]:
                _, rows, cols = next(grids)
                expanded += self._placeholder(marker, rows, cols) + piece
            if reply:
                replies.append((len(text), len(text) + len(expanded)))
            text += expanded
        bos = self.tokenizer.special_tokens.get("bos_token")
        special = self.config.add_special_tokens and not (bos and text.startswith(bos))
        encoding = self.tokenizer.backend.encode(text, add_special_tokens=special)
        ids = encoding.ids
        flags = [any(begin < stop and end > start for start, stop in replies) for begin, end in encoding.offsets]
        if len(ids) >= self.context_length:
            raise InputError(f"{len(images)} images and the text take {len(ids)} tokens; the model's context "
                             f"window is {self.context_length} (fewer images or frames)")
        return ids, flags, [tile for tiles, _, _ in tiled for tile in tiles]

    def tiles(self, image) -> tuple[list, int, int]:
        """The pictures the tower sees for one image, and the grid they came from: the image itself (LLaVA;
        a video frame), or SmolVLM's tiles row by row then the whole image, with (rows, cols)."""
        tiling = self.config.tiling
        if tiling is None:
            return [image], 0, 0
        if "frame_time" in image.info:  # a video frame: one tile, as SmolVLM takes frames
            return [image.resize((tiling.tile, tiling.tile), Image.Resampling.LANCZOS)], 0, 0
        return split_into_tiles(image, tiling)

    def _placeholder(self, marker: str, rows: int, cols: int) -> str:
        """The text that stands for one image in the prompt."""
        tiling, run = self.config.tiling, marker * self.config.image_tokens
        if tiling is None:
            return run
        whole = f"{tiling.fake_token}{tiling.global_token}{run}{tiling.fake_token}"
        if rows == cols == 0:
            return whole
        grid = "".join("".join(f"{tiling.fake_token}<row_{r + 1}_col_{c + 1}>{run}" for c in range(cols)) + "\n"
                       for r in range(rows))
        return f"{grid}\n{whole}"

    def _features(self, images: list) -> torch.Tensor | None:
        if not images:
            return None
        size = self.config.vision.image_size
        pixels = torch.stack([preprocess(image, size, self.config.image) for image in images])
        return torch.cat([self.encode_images(chunk.to(self.dtype)) for chunk in pixels.split(16)])

    def save_pretrained(self, directory: str | Path, format: str = "rosetta") -> Path:
        """Write a model directory: Rosetta's own format, or `format="transformers"` for transformers."""
        from rosetta.models.registry import save

        return save(self, Path(directory), format)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"params={self.num_params() / 1e6:.1f}M, image_tokens={self.config.image_tokens}"


def split_into_tiles(image, tiling: Tiling) -> tuple[list, int, int]:
    """SmolVLM's image splitting, as its processor does it: longest side to `longest_edge` (the other even),
    then each side up to whole tiles, both with Lanczos on 8-bit pixels; tiles row by row, then the whole
    image squeezed to one tile. An image that fits in one tile is that tile alone (rows = cols = 0)."""
    lanczos = Image.Resampling.LANCZOS
    width, height = image.size
    if width >= height:
        width, height = tiling.longest_edge, int(tiling.longest_edge / (width / height))
        height += height % 2
    else:
        height, width = tiling.longest_edge, int(tiling.longest_edge * (width / height))
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    image = image.resize((width, height), lanczos)
    tile = tiling.tile
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    image = image.resize((width, height), lanczos)
    if width <= tile and height <= tile:
        return [image], 0, 0
    rows, cols = height // tile, width // tile
    tiles = [image.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows)
             for c in range(cols)]
    return [*tiles, image.resize((tile, tile), lanczos)], rows, cols


def user(images: ImageInput | Sequence[ImageInput], text: str) -> dict[str, Any]:
    """A user message of images (or a video) then text."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    return {"role": "user", "content": [*(_part(image) for image in images), {"type": "text", "text": text}]}


def _part(source: ImageInput) -> dict[str, Any]:
    from rosetta.modalities.video import is_video

    if isinstance(source, (str, Path)) and is_video(source):
        return {"type": "video", "video": source}
    return {"type": "image", "image": source}


def _with_image_placeholders(messages: Sequence[Mapping[str, Any]],
                             fetch: Callable[[str], bytes] | None = None) -> tuple[list[dict[str, Any]], list]:
    """The conversation with every image, image URL or video part made `{"type": "image"}` (a video, one per
    frame), as chat templates expect, and the decoded images in order."""
    from rosetta.modalities.chat import check_messages
    from rosetta.modalities.video import sample_frames

    out, images = [], []
    for i, message in enumerate(check_messages(messages)):
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            where = f"messages[{i}].content[{j}]"
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind in ("image", "image_url"):
                source = part.get("image") if kind == "image" else (part.get("image_url") or {}).get("url")
                if source is None:
                    raise InputError(f"{where}: an image part without its image")
                image = load_image(image_from_url(source, fetch) if kind == "image_url" else source)
                images.append(image.convert("RGB"))
                parts.append({"type": "image"})
            elif kind == "video":
                frames = sample_frames(part.get("video"), part.get("fps", 1.0), part.get("max_frames", 32))
                images.extend(frames)
                parts.extend({"type": "image"} for _ in frames)
            else:
                raise InputError(f"{where}: unknown content part type {kind!r} (text, image, image_url, video)")
        out.append({**message, "content": parts})
    return out, images


def image_from_url(url: Any, fetch: Callable[[str], bytes] | None = None) -> bytes:
    """The bytes of a `data:` URL, or of an http(s) URL read by `fetch`. Without `fetch` a remote URL is refused:
    fetching whatever URL a request names is how servers get turned against their own network (the server
    fetches only when started with --allow-remote-images)."""
    if isinstance(url, str) and url.startswith(("http://", "https://")) and fetch is not None:
        return fetch(url)
    if not isinstance(url, str) or not url.startswith("data:"):
        raise InputError("image_url: only data: URLs are read (download remote images first)")
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise InputError("image_url: a data: URL must be base64-encoded")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("image_url: the data: URL is not valid base64") from None


def read_vlm_tokenizer(directory: Path, config: VLMConfig) -> LMTokenizer:
    return read_tokenizer(directory, config.text)


FAMILY = Family(
    name="vlm", config_class=VLMConfig, model_class=VisionLanguageModel, presets=PRESETS, pretrained=PRETRAINED,
    converters=("llava", "idefics3"), read_tokenizer=read_vlm_tokenizer,
)
