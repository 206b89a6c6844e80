"""Parity with Hugging Face transformers: tiny random CLIPModel and SiglipModel checkpoints, their tokenizers
and image processors, written to a directory and loaded with `rosetta.load`; the export back to CLIPModel; and
CLIP's BPE tokenizer against transformers' and open_clip's.

Every reference model is built here with random weights; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

import rosetta
from rosetta.modalities.text import TextTokenizer, clean_clip, clip_bpe

transformers = pytest.importorskip("transformers")

ATOL = 1e-4  # fp32, the same maths in a different order
IMAGE_SIZE = 32
EOS_ID = 49407


pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "a photo of a cat",
    "A PHOTO OF A DOG.",
    "two  people   riding bicycles, on a sunny street!",
    "",
    "naïve café résumé — Zürich",
    "東京の夜景 🎉",
]


def _features(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _perturb(model: torch.nn.Module) -> None:
    """Move every weight off its initial value (unit norms, zero biases) so a misplaced tensor cannot hide."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def _photos() -> list[Image.Image]:
    return [
        Image.fromarray(skimage.data.astronaut()),
        Image.fromarray(skimage.data.coffee()),
        Image.fromarray(np.ascontiguousarray(skimage.data.chelsea()[:, 100:301])),  # portrait
    ]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def _until_eos(ids: list[int], eos: int = EOS_ID) -> list[int]:
    """The ids a causal model sees before pooling at end-of-text; what follows is padding it never attends to."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@dataclass
class Reference:
    """A transformers checkpoint directory, the objects it was written from, and Rosetta's load of it."""

    directory: Path
    model: Any
    tokenizer: Any
    processor: Any
    ours: rosetta.ContrastiveModel


# CLIP


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def hf_clip(request, tmp_path_factory, clip_bpe_dir):
    """A tiny random transformers CLIPModel saved with its tokenizer and PIL image processor.

    The QuickGELU one is laid out like OpenAI's checkpoints: its config says end-of-text is id 2, which
    transformers (and Rosetta) take to mean "pool at the highest id". The GELU one names the real end-of-text
    id, and its weights are sharded as large checkpoints are.
    """
    act = request.param
    openai = act == "quick_gelu"
    special_ids = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1) if openai else {}
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         hidden_act=act, **special_ids),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8, hidden_act=act),
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    _perturb(model)
    directory = tmp_path_factory.mktemp(f"hf_clip_{act}")
    model.save_pretrained(directory, **({} if openai else {"max_shard_size": "4MB"}))
    assert (directory / "model.safetensors.index.json").exists() != openai
    tokenizer = transformers.CLIPTokenizerFast.from_pretrained(clip_bpe_dir)
    tokenizer.save_pretrained(directory)
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor.save_pretrained(directory)
    return Reference(directory, model, tokenizer, processor, rosetta.load(directory))


def test_clip_config_read(hf_clip):
    model, ours = hf_clip.model, hf_clip.ours
    hf = model.config
    assert ours.config.vision.act == ours.config.text.act == hf.vision_config.hidden_act
    assert ours.config.embed_dim == hf.projection_dim
    assert ours.config.text.context_length == hf.text_config.max_position_embeddings
    assert ours.config.image.resize == "shortest"
    assert ours.config.loss == "softmax"
    # eos_token_id 2 is transformers' legacy marker for "the highest id ends the text".
    legacy = hf.text_config.eos_token_id == 2
    assert ours.config.text.eos_token_id == (None if legacy else EOS_ID)


@torch.inference_mode()
def test_clip_features_match(hf_clip):
    model, tokenizer, ours = hf_clip.model, hf_clip.tokenizer, hf_clip.ours
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert _max_diff(ours.encode_image(pixels), _features(model.get_image_features(pixel_values=pixels))) <= ATOL
    ids = torch.tensor(tokenizer(TEXTS, padding="max_length", max_length=77)["input_ids"])
    theirs = _features(model.get_text_features(input_ids=ids))
    assert _max_diff(ours.encode_text(ids), theirs) <= ATOL
    # Rosetta's own token ids: the same up to end-of-text, so the same features.
    own = ours.tokenize(TEXTS)
    assert [_until_eos(row) for row in own.tolist()] == [_until_eos(row) for row in ids.tolist()]
    assert _max_diff(ours.encode_text(own), theirs) <= ATOL


@torch.inference_mode()
def test_clip_embeddings_and_logits_match(hf_clip):
    model, tokenizer, processor, ours = hf_clip.model, hf_clip.tokenizer, hf_clip.processor, hf_clip.ours
    photos = _photos()
    labels = ["an astronaut", "a cup of coffee", "a cat"]

    pixels = torch.as_tensor(np.stack(processor(photos, return_tensors="np")["pixel_values"]))
    assert _max_diff(ours.preprocess(photos), pixels) <= 1e-5
    image_embeds = F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
    ids = torch.tensor(tokenizer(labels, padding="max_length", max_length=77)["input_ids"])
    text_embeds = F.normalize(_features(model.get_text_features(input_ids=ids)), dim=-1)

    ours_images, ours_texts = ours.embed_images(photos), ours.embed_texts(labels)
    assert _max_diff(ours_images, image_embeds) <= ATOL
    assert _max_diff(ours_texts, text_embeds) <= ATOL
    logits = model(input_ids=ids, pixel_values=pixels).logits_per_image
    assert _max_diff(ours.logits(ours_images, ours_texts), logits) <= ATOL * logits.abs().max().item()
    assert _max_diff(ours.classify(photos, labels, templates="{}"), logits.softmax(dim=-1)) <= ATOL


# SigLIP

SPM_SENTENCES = [
    "a photo of a cat", "a photo of a dog", "the quick brown fox jumps over the lazy dog",
    "two people riding bicycles on a sunny street", "an astronaut floating in space",
    "a cup of coffee on a wooden table", "Zürich is a city in Switzerland", "naïve café résumé",
    "東京の夜景", "emoji 😀 party 🎉", "numbers 123 4567 89",
]
SPM_NOUNS = (
    "cat dog bird car truck airplane ship horse deer frog apple banana orange bicycle mountain river ocean "
    "forest city street building bridge tower flower tree garden kitchen bedroom window door chair table"
).split()
SIGLIP_CONTEXT = 24

SIGLIP_TEXTS = [
    *TEXTS,
    "  Leading and trailing spaces  ",
    "MiXeD CaSe, punctuation!?... and (brackets) [here] {too}",
    "tabs\tand\nnewlines\r\nand\u00a0no-break spaces",
    "don't stop — it's 12.5% off; a_b-c/d",
    "!!!",
    "   ",
    "Ünïcödé ÀÉÎÕÜ straße",
    "unknown glyphs ☃ ✈ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and digits ①②③",
    "the quick brown fox jumps over the lazy dog " * 6,  # longer than the context: truncated
    # SentencePiece's normalizer deletes or spaces out these; none may leave a stray "▁" token behind.
    "zero\u200bwidth\u200c joiners\u200d\ufeff",
    "\u200b",
    "a cat\u200e",
    "an ▁ underscore-like ▁▁ block ▁",
    "full\u3000width　spaces and ｆｕｌｌｗｉｄｔｈ letters",
]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """A tiny SentencePiece unigram model laid out like SigLIP's: <pad>=0, </s>=1, <unk>=2."""
    import sentencepiece

    from rosetta.templates import IMAGENET

    directory = tmp_path_factory.mktemp("spm")
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(SPM_SENTENCES * 5 + [t.format(n) for t in IMAGENET[:40] for n in SPM_NOUNS]))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "spiece"), vocab_size=160, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )
    return directory / "spiece.model"


@pytest.fixture(scope="module")
def hf_siglip(tmp_path_factory, spm_model):
    """A tiny random transformers SiglipModel saved with its SentencePiece tokenizer and PIL image processor."""
    tokenizer = transformers.SiglipTokenizer(vocab_file=str(spm_model), model_max_length=SIGLIP_CONTEXT)
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=SIGLIP_CONTEXT),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8),
    )
    assert config.text_config.vocab_size >= tokenizer.vocab_size
    torch.manual_seed(0)
    model = transformers.SiglipModel(config).eval()
    _perturb(model)
    directory = tmp_path_factory.mktemp("hf_siglip")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    processor = transformers.SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor.save_pretrained(directory)
    assert (directory / "spiece.model").exists() and not (directory / "tokenizer.json").exists()
    return Reference(directory, model, tokenizer, processor, rosetta.load(directory))


def _siglip_ids(tokenizer, texts) -> torch.Tensor:
    return torch.tensor(
        tokenizer(list(texts), padding="max_length", max_length=SIGLIP_CONTEXT, truncation=True)["input_ids"]
    )


def test_siglip_config_read(hf_siglip):
    model, ours = hf_siglip.model, hf_siglip.ours
    assert ours.config.loss == "sigmoid" and ours.config.vision.pool == "map"
    assert ours.config.image.resize == "squash" and ours.config.image.mean == (0.5, 0.5, 0.5)
    assert ours.config.text.context_length == SIGLIP_CONTEXT
    assert ours.config.embed_dim == model.config.text_config.projection_size


def test_siglip_without_preprocessor_config(tmp_path, hf_siglip):
    """SigLIP checkpoints without preprocessor_config.json squash images, as SiglipImageProcessor does."""
    for path in hf_siglip.directory.iterdir():
        if path.name != "preprocessor_config.json":
            (tmp_path / path.name).symlink_to(path)
    config = rosetta.load(tmp_path).config
    assert config.image.resize == "squash" and config.image.mean == (0.5, 0.5, 0.5)
    assert config.image == hf_siglip.ours.config.image


def test_siglip_tokenizer_matches(hf_siglip):
    tokenizer, ours = hf_siglip.tokenizer, hf_siglip.ours
    expected = _siglip_ids(tokenizer, SIGLIP_TEXTS)
    actual = ours.tokenize(SIGLIP_TEXTS)
    for text, a, e in zip(SIGLIP_TEXTS, actual.tolist(), expected.tolist()):
        assert a == e, text


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Co", "Cn")), max_size=60))
def test_siglip_tokenizer_property(hf_siglip, text):
    # transformers splits its special tokens out of the raw text before cleaning; Rosetta removes their
    # punctuation like any other (see test_siglip_special_token_text).
    assume(not any(token in text for token in ("</s>", "<unk>", "<pad>")))
    assert hf_siglip.ours.tokenize([text])[0].tolist() == _siglip_ids(hf_siglip.tokenizer, [text])[0].tolist()


def test_siglip_special_token_text(hf_siglip):
    """Text that spells a special token stays text: it never ends the sequence early."""
    ids = hf_siglip.ours.tokenize(["a cat</s>a dog"])[0].tolist()
    eos = ids.index(1)
    assert all(i == 1 for i in ids[eos:]) and eos > 3


@torch.inference_mode()
def test_siglip_features_match(hf_siglip):
    model, tokenizer, ours = hf_siglip.model, hf_siglip.tokenizer, hf_siglip.ours
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert _max_diff(ours.encode_image(pixels), _features(model.get_image_features(pixel_values=pixels))) <= ATOL
    ids = _siglip_ids(tokenizer, SIGLIP_TEXTS)
    assert _max_diff(ours.encode_text(ids), _features(model.get_text_features(input_ids=ids))) <= ATOL


@torch.inference_mode()
def test_siglip_embeddings_and_logits_match(hf_siglip):
    model, tokenizer, processor, ours = hf_siglip.model, hf_siglip.tokenizer, hf_siglip.processor, hf_siglip.ours
    photos = _photos()
    labels = ["an astronaut", "a cup of coffee", "a cat", "Two dogs!"]
    pixels = torch.as_tensor(np.stack(processor(photos, return_tensors="np")["pixel_values"]))
    assert _max_diff(ours.preprocess(photos), pixels) <= 1e-5
    ids = _siglip_ids(tokenizer, labels)
    output = model(input_ids=ids, pixel_values=pixels)
    ours_images, ours_texts = ours.embed_images(photos), ours.embed_texts(labels)
    assert _max_diff(ours_images, F.normalize(output.image_embeds, dim=-1)) <= ATOL
    assert _max_diff(ours_texts, F.normalize(output.text_embeds, dim=-1)) <= ATOL
    logits = output.logits_per_image
    assert _max_diff(ours.logits(ours_images, ours_texts), logits) <= ATOL * max(1.0, logits.abs().max().item())
    assert _max_diff(ours.classify(photos, labels, templates="{}"), torch.sigmoid(logits)) <= ATOL


# Export to transformers and Rosetta's own format


@torch.inference_mode()
def test_siglip_export_to_transformers(tmp_path, hf_siglip):
    """A SigLIP model written with format="transformers" is the SiglipModel it came from: the same weights, the
    same logits in transformers, the same pixels from its processor, the same ids from its tokenizer, and it
    loads back into Rosetta unchanged."""
    model, tokenizer, processor, ours = hf_siglip.model, hf_siglip.tokenizer, hf_siglip.processor, hf_siglip.ours
    ours.save_pretrained(tmp_path, format="transformers")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "siglip"
    exported = transformers.SiglipModel.from_pretrained(tmp_path).eval()
    original = model.state_dict()
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    labels = ["an astronaut", "a cup of coffee", "two dogs"]
    ids = _siglip_ids(tokenizer, labels)
    theirs = _siglip_ids(transformers.AutoTokenizer.from_pretrained(tmp_path), labels)
    assert torch.equal(theirs, ids)
    photos = _photos()
    pixels = torch.as_tensor(np.stack(processor(photos, return_tensors="np")["pixel_values"]))
    assert type(transformers.AutoImageProcessor.from_pretrained(tmp_path)).__name__.startswith("SiglipImageProcessor")
    again = transformers.SiglipImageProcessorPil.from_pretrained(tmp_path)
    assert _max_diff(torch.as_tensor(np.stack(again(photos, return_tensors="np")["pixel_values"])), pixels) <= 1e-5
    logits = exported(input_ids=ids, pixel_values=pixels).logits_per_image
    assert _max_diff(logits, model(input_ids=ids, pixel_values=pixels).logits_per_image) <= 1e-5
    back = rosetta.load(tmp_path)
    assert back.config == ours.config
    assert _max_diff(back.embed_images(photos), ours.embed_images(photos)) <= 1e-6
    assert _max_diff(back.embed_texts(labels), ours.embed_texts(labels)) <= 1e-6


def _tiny_clip_config(act: str = "quick_gelu") -> rosetta.ContrastiveConfig:
    return rosetta.ContrastiveConfig(
        vision=rosetta.VisionConfig(image_size=IMAGE_SIZE, patch_size=8, width=64, layers=2, heads=4, mlp_dim=128,
                                    act=act),
        text=rosetta.TextConfig(width=64, layers=2, heads=4, mlp_dim=128, act=act),
        embed_dim=32,
    )


_CLIP_BPE: dict[Path, Any] = {}


def _clip_model(config: rosetta.ContrastiveConfig, bpe_dir: Path) -> rosetta.ContrastiveModel:
    if bpe_dir not in _CLIP_BPE:  # parsing 49k merges takes a moment; the backend can be shared
        _CLIP_BPE[bpe_dir] = clip_bpe(bpe_dir / "vocab.json", bpe_dir / "merges.txt")
    tokenizer = TextTokenizer(_CLIP_BPE[bpe_dir], 77, 0)
    model = rosetta.ContrastiveModel(config, tokenizer=tokenizer).eval()
    _perturb(model)
    return model


@torch.inference_mode()
def _assert_same_as_transformers(ours: rosetta.ContrastiveModel, directory: Path, texts: list[str]) -> None:
    model = transformers.CLIPModel.from_pretrained(directory).eval()
    size = ours.config.vision.image_size
    pixels = torch.randn(2, 3, size, size)
    assert _max_diff(ours.encode_image(pixels), _features(model.get_image_features(pixel_values=pixels))) <= ATOL
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    length = ours.config.text.context_length
    theirs = tokenizer(texts, padding="max_length", max_length=length, truncation=True)["input_ids"]
    own = ours.tokenize(texts)
    eos = tokenizer.eos_token_id
    assert [_until_eos(row, eos) for row in own.tolist()] == [_until_eos(row, eos) for row in theirs]
    text_features = _features(model.get_text_features(input_ids=torch.tensor(theirs)))
    assert _max_diff(ours.encode_text(own), text_features) <= ATOL
    # The exported preprocessor_config.json asks for the same resize, crop and normalisation.
    assert transformers.AutoImageProcessor.from_pretrained(directory).crop_size["height"] == size
    processor = transformers.CLIPImageProcessorPil.from_pretrained(directory)
    photos = _photos()
    hf_pixels = torch.as_tensor(np.stack(processor(photos, return_tensors="np")["pixel_values"]))
    assert _max_diff(ours.preprocess(photos), hf_pixels) <= 1e-5


@pytest.mark.parametrize("settings", [
    {"size": {"shortest_edge": 40}, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}},  # 256 -> 224 style
    {"size": {"shortest_edge": IMAGE_SIZE}, "crop_size": IMAGE_SIZE, "resample": 2},  # bilinear
    {"size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_center_crop": False, "resample": 1},  # squash, lanczos
    {"size": {"shortest_edge": 37}, "crop_size": IMAGE_SIZE, "resample": 0, "do_normalize": False},  # nearest
    {"size": {"shortest_edge": IMAGE_SIZE}, "crop_size": IMAGE_SIZE, "resample": 4, "rescale_factor": 1 / 127.5},
    {"size": {"shortest_edge": 48}, "crop_size": IMAGE_SIZE, "resample": 5, "do_rescale": False},  # hamming
])
def test_image_processor_settings_are_honoured(tmp_path, hf_clip, settings):
    """preprocessor_config.json settings other than the defaults give the pixels CLIPImageProcessor gives, and
    survive the export back to transformers."""
    directory = tmp_path / "model"
    shutil.copytree(hf_clip.directory, directory)
    processor = transformers.CLIPImageProcessorPil(**settings)
    processor.save_pretrained(directory)
    ours = rosetta.load(directory)
    ours.save_pretrained(tmp_path / "exported", format="transformers")
    exported = transformers.CLIPImageProcessorPil.from_pretrained(tmp_path / "exported")
    for photo in _photos():
        theirs = torch.as_tensor(processor([photo], return_tensors="np")["pixel_values"][0])
        assert _max_diff(ours.preprocess([photo])[0], theirs) <= 1e-5
        again = torch.as_tensor(exported([photo], return_tensors="np")["pixel_values"][0])
        assert _max_diff(again, theirs) <= 1e-5


@pytest.mark.parametrize("settings,match", [
    ({"crop_size": IMAGE_SIZE + 8}, "crops"),
    ({"size": {"shortest_edge": IMAGE_SIZE}, "do_center_crop": False}, "neither crops"),  # the long side stays
    ({"size": {"height": 40, "width": 40}, "do_center_crop": False}, "neither crops"),
])
def test_pixels_the_tower_cannot_take_are_refused(tmp_path, hf_clip, settings, match):
    directory = tmp_path / "model"
    shutil.copytree(hf_clip.directory, directory)
    transformers.CLIPImageProcessorPil(**settings).save_pretrained(directory)
    with pytest.raises(rosetta.RosettaError, match=match):
        rosetta.load(directory)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_export_to_transformers(tmp_path, clip_bpe_dir, act):
    ours = _clip_model(_tiny_clip_config(act), clip_bpe_dir)
    ours.save_pretrained(tmp_path, format="transformers")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "clip" and config["text_config"]["eos_token_id"] == EOS_ID
    _assert_same_as_transformers(ours, tmp_path, TEXTS)
    # And back: Rosetta reads its own export.
    again = rosetta.load(tmp_path)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_export_byte_tokenizer_model_to_transformers(tmp_path):
    """The `tiny` preset (byte-level tokenizer, no CLIP BPE) exports to a CLIPModel whose tokenizer loads."""
    ours = rosetta.create("tiny").eval()
    _perturb(ours)
    ours.save_pretrained(tmp_path, format="transformers")
    _assert_same_as_transformers(ours, tmp_path, ["a photo of a cat", "Hello, World! ünïcode"])


def test_reexport_of_transformers_checkpoint(tmp_path, hf_clip):
    """transformers -> Rosetta -> transformers gives back the original model's features."""
    hf_clip.ours.save_pretrained(tmp_path, format="transformers")
    again = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    original, exported = hf_clip.model.state_dict(), again.state_dict()
    for name, tensor in original.items():
        if name in exported:
            assert torch.equal(tensor, exported[name]), name
    assert set(exported) <= set(original)


def test_rosetta_format_round_trip(tmp_path, clip_bpe_dir):
    ours = _clip_model(_tiny_clip_config(), clip_bpe_dir)
    ours.save_pretrained(tmp_path)
    again = rosetta.load(tmp_path)
    assert again.config == ours.config
    state = again.state_dict()
    assert state.keys() == ours.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())
    assert torch.equal(again.tokenize(TEXTS), ours.tokenize(TEXTS))
    photos = _photos()
    assert torch.equal(again.embed_images(photos), ours.embed_images(photos))
    assert torch.equal(again.embed_texts(TEXTS), ours.embed_texts(TEXTS))


def test_siglip_rosetta_format_round_trip(tmp_path, hf_siglip):
    ours = hf_siglip.ours
    ours.save_pretrained(tmp_path)
    again = rosetta.load(tmp_path)
    assert again.config == ours.config
    assert torch.equal(again.tokenize(SIGLIP_TEXTS), ours.tokenize(SIGLIP_TEXTS))
    assert torch.equal(again.embed_texts(SIGLIP_TEXTS), ours.embed_texts(SIGLIP_TEXTS))


def test_export_refuses_an_architecture_transformers_lacks(tmp_path, hf_siglip):
    ours = hf_siglip.ours
    config = dataclasses.replace(ours.config, vision=dataclasses.replace(ours.config.vision, pool="mean"))
    with pytest.raises(rosetta.RosettaError, match="architecture"):
        rosetta.ContrastiveModel(config, tokenizer=ours.tokenizer).save_pretrained(tmp_path, format="transformers")


# CLIP's BPE tokenizer against transformers' and open_clip's


@pytest.fixture(scope="module")
def clip_tokenizers(clip_bpe_dir):
    import open_clip.tokenizer

    ours = TextTokenizer(clip_bpe(clip_bpe_dir / "vocab.json", clip_bpe_dir / "merges.txt"), 77, 0)
    hf = transformers.CLIPTokenizerFast.from_pretrained(clip_bpe_dir)
    return ours, hf, open_clip.tokenizer.SimpleTokenizer()


TOKENIZER_TEXTS = [
    *TEXTS,
    "Hello, World!",
    "I'm here; you're there; they've gone, we'll see, she'd know, it's fine, don't.",
    "UPPER lower MiXeD",
    "numbers 1234567890 and 3.14159 and 1,000,000",
    "   leading, trailing   and    repeated    spaces   ",
    "tabs\tnewlines\nand\r\ncarriage returns",
    "emoji 😀👍🏽🇨🇭 and symbols ©®™ ±×÷ →⇒",
    "Ελληνικά κείμενα, русский текст, עברית, العربية, हिन्दी, 한국어, ไทย",
    "mixed-script words: naïveté Ωmega straße İstanbul",
    "punctuation!!! ??? ... --- ___ *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
    "a-b_c.d/e\\f|g~h`i'j\"k",
    "URL https://example.com/path?query=1&b=2#frag and e-mail someone@example.org",
    "x" * 300,
    "word " * 100,
]
# CLIP's text cleaning (ftfy, HTML entities), which transformers' fast tokenizer leaves out.
CLEANING_TEXTS = ["fish &amp; chips", "caf&eacute; &lt;b&gt;", "mojibake: cafÃ©", "&amp;amp;"]


def _open_clip_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return [_until_eos(row) for row in tokenizer(texts, context_length=77).tolist()]


def _hf_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=77)["input_ids"]


def _our_ids(tokenizer: TextTokenizer, texts: list[str]) -> list[list[int]]:
    return [_until_eos(row) for row in tokenizer(texts).tolist()]


def test_clip_tokenizer_matches_transformers(clip_tokenizers):
    ours, hf, _ = clip_tokenizers
    assert _our_ids(ours, TOKENIZER_TEXTS) == _hf_ids(hf, TOKENIZER_TEXTS)
    assert _our_ids(ours, CLEANING_TEXTS) == _hf_ids(hf, [clean_clip(t) for t in CLEANING_TEXTS])


def test_clip_tokenizer_matches_open_clip(clip_tokenizers):
    ours, _, oc = clip_tokenizers
    texts = TOKENIZER_TEXTS + CLEANING_TEXTS
    assert _our_ids(ours, texts) == _open_clip_ids(oc, texts)


def test_clip_tokenizer_from_checkpoint_matches(hf_clip, clip_tokenizers):
    """The tokenizer.json transformers writes loads to the same tokenizer as vocab.json + merges.txt."""
    texts = TOKENIZER_TEXTS + CLEANING_TEXTS
    assert _our_ids(hf_clip.ours.tokenizer, texts) == _our_ids(clip_tokenizers[0], texts)


def test_clip_tokenizer_special_token_text(clip_tokenizers):
    """Text spelling CLIP's special tokens is read as those tokens, as OpenAI's tokenizer and transformers do."""
    ours, hf, _ = clip_tokenizers
    texts = ["a cat <|endoftext|> a dog", "<|startoftext|>"]
    assert [ours.encode(text) for text in texts] == _hf_ids(hf, texts)


# Unicode's unassigned and private-use code points are classified differently by the Unicode versions behind
# `regex` (open_clip) and `tokenizers`; surrogates cannot be encoded.
_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Co", "Cn")), max_size=120)
_SPECIAL = ("<|startoftext|>", "<|endoftext|>", "<start_of_text>", "<end_of_text>")


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(text=_TEXT)
def test_clip_tokenizer_property(clip_tokenizers, text):
    assume(not any(special in text.lower() for special in _SPECIAL))
    ours, hf, oc = clip_tokenizers
    assert _our_ids(ours, [text]) == _open_clip_ids(oc, [text])
    assert _our_ids(ours, [text]) == _hf_ids(hf, [clean_clip(text)])


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(words=st.lists(st.sampled_from(["cat", "a", "photo", "of", "!", "naïve", "1", "😀", "x-y"]), max_size=120))
def test_clip_tokenizer_truncation_property(clip_tokenizers, words):
    ours, _, oc = clip_tokenizers
    text = " ".join(words)
    assert ours([text])[0].tolist() == oc([text], context_length=77)[0].tolist()  # both pad with 0


def test_clip_truncation(clip_tokenizers):
    ours, _, oc = clip_tokenizers
    long_text = "a photo of a very large cat " * 30
    ids = ours(long_text, truncate=True)
    assert ids.shape == (1, 77)
    assert ids[0, 0].item() == 49406 and ids[0, -1].item() == EOS_ID
    assert (ids[0, 1:-1] != EOS_ID).all()
    assert ids[0].tolist() == oc([long_text], context_length=77)[0].tolist()
    with pytest.raises(rosetta.InputError, match="context length"):
        ours(long_text, truncate=False)
    # The boundary: 75 tokens between start and end of text fit, 76 do not.
    assert ours("cat " * 75, truncate=False)[0, -1].item() == EOS_ID
    with pytest.raises(rosetta.InputError):
        ours("cat " * 76, truncate=False)


def test_model_truncation(hf_clip):
    model = hf_clip.ours
    long_text = "a photo of a very large cat " * 30
    assert model.tokenize([long_text]).shape == (1, 77)
    with pytest.raises(rosetta.InputError):
        model.embed_texts([long_text], truncate=False)
    assert model.embed_texts([long_text]).shape == (1, 32)
