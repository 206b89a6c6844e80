"""Parity with Hugging Face transformers' CLAP: ClapFeatureExtractor's features on real recordings (espeak-ng
speech, noise, silence; shorter and longer than 10 s) in both truncation modes, and tiny random ClapModels
(unfused and fused) written to a directory and loaded with `rosetta.load`: audio and text embeddings, the
tokenizer, zero-shot probabilities, the export back to ClapModel, and Rosetta's own format.

Every reference model is built here with random weights; nothing is downloaded.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rosetta
from rosetta.errors import InputError
from rosetta.modalities.audio import load_audio
from rosetta.modalities.clap_features import ClapFeatureConfig, ClapFeatureExtractor
from rosetta.models.clap import ClapModel

transformers = pytest.importorskip("transformers")

ATOL = 1e-4  # fp32, the same maths in a different order
RATE = 48_000
TEXTS = ["the sound of a dog barking", "a cat", "rain falling on the roof of a small house", ""]
LABELS = ["dog barking", "rain", "speech", "silence"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _espeak(directory: Path, name: str, text: str) -> Path:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.skip("espeak-ng is not installed")
    path = directory / f"{name}.wav"
    subprocess.run([espeak, "-v", "en", "-s", "160", "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> dict[str, np.ndarray]:
    """48 kHz clips either side of CLAP's 10 seconds: speech (espeak-ng, decoded and resampled from its 22 kHz
    WAV), white noise, silence, and speech over noise."""
    directory = tmp_path_factory.mktemp("clap_audio")
    speech = load_audio(_espeak(directory, "speech", "The quick brown fox jumps over the lazy dog."), RATE)
    rng = np.random.default_rng(0)
    long_speech = np.concatenate([speech] * int(np.ceil(12 * RATE / len(speech))))
    return {
        "speech": speech,  # about 3 s
        "silence": np.zeros(2 * RATE, np.float32),
        "noise": (0.1 * rng.standard_normal(4 * RATE)).astype(np.float32),
        "long noise": (0.3 * rng.standard_normal(13 * RATE)).astype(np.float32),
        "long speech over noise": long_speech + (0.02 * rng.standard_normal(len(long_speech))).astype(np.float32),
        "just over 10 s": (0.1 * rng.standard_normal(10 * RATE + 200)).astype(np.float32),  # within one hop
    }


def _reference_features(extractor, clips: list[np.ndarray], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' features, its random crops (np.random.choice, np.random.randint on numpy's global state)
    drawn after seeding that state: the same draws as ours from np.random.RandomState(seed)."""
    np.random.seed(seed)
    out = extractor(clips, sampling_rate=RATE, return_tensors="pt")
    return out["input_features"], out["is_longer"][:, 0]


@pytest.mark.parametrize("truncation", ["fusion", "rand_trunc"])
@pytest.mark.parametrize(("padding", "which"), [("repeatpad", "all"), ("repeat", "short"), ("pad", "short")])
def test_features_match_clap_feature_extractor(recordings, truncation, padding, which):
    """Padding only touches the clips of at most 10 s: the other two modes are checked on those alone."""
    clips = [clip for clip in recordings.values() if which == "all" or len(clip) <= 10 * RATE]
    config = ClapFeatureConfig(truncation=truncation, padding=padding)
    reference = transformers.ClapFeatureExtractor(frequency_min=config.f_min, frequency_max=config.f_max,
                                                  truncation=truncation, padding=padding)
    seed = len(clips) + len(padding)
    theirs, their_longer = _reference_features(reference, clips, seed)
    ours, our_longer = ClapFeatureExtractor(config)(clips, rng=np.random.RandomState(seed))
    assert ours.shape == theirs.shape == (len(clips), 4 if truncation == "fusion" else 1, 1001, 64)
    assert torch.equal(our_longer, their_longer)
    assert (ours - theirs).abs().max().item() <= ATOL
    # Fusion takes a clip for longer once its frames overflow (by a whole hop): "just over 10 s" is not.
    threshold = 10 * RATE + (479 if truncation == "fusion" else 0)
    long_clips = sum(len(clip) > threshold for clip in clips)
    assert int(our_longer.sum()) == (long_clips or int(truncation == "fusion"))  # fusion marks one at random


def _perturb(model: torch.nn.Module) -> None:
    """Move every weight and batch-norm statistic off its initial value so a misplaced tensor cannot hide."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0.0, 0.5, generator=generator)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0, generator=generator)


@pytest.fixture(scope="module")
def roberta_tokenizer_dir(tmp_path_factory) -> Path:
    """A small RoBERTa byte-level BPE (vocab.json, merges.txt) trained here, with RoBERTa's special tokens."""
    from tokenizers import ByteLevelBPETokenizer

    directory = tmp_path_factory.mktemp("roberta_bpe")
    bpe = ByteLevelBPETokenizer()
    corpus = [*TEXTS, *LABELS, "This is a sound of dogs, cats, rain and people speaking."]
    bpe.train_from_iterator(corpus * 4, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(directory))
    return directory


@dataclass
class Reference:
    """A transformers ClapModel directory, the objects it was written from, and Rosetta's load of it."""

    directory: Path
    model: Any
    tokenizer: Any
    extractor: Any
    ours: ClapModel


@pytest.fixture(scope="module", params=["unfused", "fused"])
def hf_clap(request, tmp_path_factory, roberta_tokenizer_dir) -> Reference:
    """A tiny random transformers ClapModel with HTSAT's geometry, saved with its tokenizer and feature extractor
    (rand_trunc for the unfused model, fusion for the fused one, as LAION's checkpoints). The fused one has 6 x 6
    windows, which do not tile its grids: Swin's padding to whole windows is exercised too."""
    fused = request.param == "fused"
    config = transformers.ClapConfig(
        text_config=dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=40),
        audio_config=dict(patch_embeds_hidden_size=8, hidden_size=64, depths=[2, 2, 2, 2],
                          num_attention_heads=[1, 2, 2, 4], window_size=6 if fused else 8, enable_fusion=fused),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.ClapModel(config).eval()
    _perturb(model)
    directory = tmp_path_factory.mktemp(f"hf_clap_{request.param}")
    model.save_pretrained(directory)
    tokenizer = transformers.RobertaTokenizerFast(str(roberta_tokenizer_dir / "vocab.json"),
                                                  str(roberta_tokenizer_dir / "merges.txt"))
    extractor = transformers.ClapFeatureExtractor(frequency_min=50, frequency_max=14_000,
                                                  truncation="fusion" if fused else "rand_trunc")
    transformers.ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(directory)
    return Reference(directory, model, tokenizer, extractor, rosetta.load(directory))


def _their_audio(model, features: torch.Tensor, is_longer: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.get_audio_features(input_features=features, is_longer=is_longer[:, None])
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # a ModelOutput in transformers 5


def _their_text(model, tokenizer, texts: list[str]) -> torch.Tensor:
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(**inputs)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _one_by_one(extractor, clips: list[np.ndarray], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' features of each clip as a batch of its own, seeded as Rosetta's `preprocess` seeds each."""
    features, is_longer = zip(*(_reference_features(extractor, [clip], seed) for clip in clips))
    return torch.cat(features), torch.cat(is_longer)


def test_reads_the_config_and_features(hf_clap):
    c = hf_clap.ours.config
    fused = hf_clap.model.config.audio_config.enable_fusion
    assert c.audio.fusion == fused and c.audio.depths == (2, 2, 2, 2) and c.embed_dim == 16
    assert c.features.truncation == ("fusion" if fused else "rand_trunc") and c.features.f_min == 50
    assert c.text.width == 32 and c.text.context_length == 40 - 2


def test_audio_embeddings_match(hf_clap, recordings):
    clips = list(recordings.values())
    features, is_longer = _reference_features(hf_clap.extractor, clips, seed=3)
    if hf_clap.ours.config.audio.fusion:
        assert is_longer.any() and not is_longer.all()  # both branches of the fusion run
    theirs = _their_audio(hf_clap.model, features, is_longer)
    with torch.inference_mode():
        ours = F.normalize(hf_clap.ours.encode_audio(features, is_longer), dim=-1)
    assert (ours - theirs).abs().max().item() <= ATOL


def test_embed_audio_matches_transformers_clip_by_clip(hf_clap, recordings, tmp_path):
    """From files and arrays: each clip's embedding is transformers' for that clip alone, whatever its batch."""
    clips = list(recordings.values())
    theirs = _their_audio(hf_clap.model, *_one_by_one(hf_clap.extractor, clips))
    ours = hf_clap.ours.embed_audio(clips, batch_size=4)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= ATOL
    import soundfile as sf

    path = tmp_path / "speech.wav"
    sf.write(path, recordings["speech"], RATE, subtype="FLOAT")  # the same samples, decoded from a file
    assert (hf_clap.ours.embed_audio(path) - theirs[:1]).abs().max().item() <= ATOL


def test_segments_are_windows_of_ten_seconds_each_embedded_as_if_cut_out(hf_clap, tmp_path):
    """A recording of different parts (noise, a tone, silence, then a tail): one row per consecutive 10-s window,
    its vector `embed_audio`'s of that window alone, from an array or a file, in one batch or several; a tail
    under a quarter of a window is dropped, as the audio tower's windows drop it."""
    import soundfile as sf

    rng = np.random.default_rng(1)
    t = np.arange(10 * RATE) / RATE
    parts = [(0.2 * rng.standard_normal(10 * RATE)).astype(np.float32),
             (0.3 * np.sin(2 * np.pi * 880 * t)).astype(np.float32), np.zeros(3 * RATE, np.float32)]
    whole = np.concatenate(parts)
    expected = hf_clap.ours.embed_audio(parts)
    assert not torch.allclose(expected[0], expected[1], atol=1e-2)
    path = tmp_path / "parts.wav"
    sf.write(path, whole, RATE, subtype="FLOAT")
    for source, batch_size in ((whole, 16), (path, 2)):
        rows = hf_clap.ours.embed_audio_segments(source, batch_size=batch_size)
        assert [(start, end) for start, end, _ in rows] == [(0.0, 10.0), (10.0, 20.0), (20.0, 23.0)]
        vectors = torch.stack([vector for _, _, vector in rows])
        assert (vectors - expected).abs().max().item() <= 1e-6
        assert torch.allclose(vectors.norm(dim=-1), torch.ones(3))
    # The tail of one second past the last whole window is dropped; a short clip is its own window.
    rows = hf_clap.ours.embed_audio_segments(np.concatenate([parts[0], parts[2][:RATE]]))
    assert [(start, end) for start, end, _ in rows] == [(0.0, 10.0)]
    (start, end, vector), = hf_clap.ours.embed_audio_segments(parts[2])
    assert (start, end) == (0.0, 3.0) and torch.allclose(vector, expected[2], atol=1e-6)


def test_text_embeddings_and_tokens_match(hf_clap):
    ids, mask = hf_clap.ours.tokenize(TEXTS)
    reference = hf_clap.tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(ids, reference["input_ids"])
    assert torch.equal(mask.long(), reference["attention_mask"])
    theirs = _their_text(hf_clap.model, hf_clap.tokenizer, TEXTS)
    assert (hf_clap.ours.embed_texts(TEXTS) - theirs).abs().max().item() <= ATOL


def test_zero_shot_matches_logits_per_audio(hf_clap, recordings):
    clips = [recordings[name] for name in ("speech", "silence", "long noise")]
    template = "This is a sound of {}."
    features, is_longer = _one_by_one(hf_clap.extractor, clips)
    inputs = hf_clap.tokenizer([template.format(label) for label in LABELS], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = hf_clap.model(**inputs, input_features=features, is_longer=is_longer[:, None])
    theirs = out.logits_per_audio.softmax(dim=-1)
    ours = hf_clap.ours.classify(clips, LABELS)  # the default template is LAION's, above
    assert ours.shape == (3, len(LABELS))
    assert torch.allclose(ours.sum(dim=-1), torch.ones(3))
    assert (ours - theirs).abs().max().item() <= ATOL


def test_export_loads_in_transformers_with_the_same_outputs(hf_clap, recordings, tmp_path):
    hf_clap.ours.save_pretrained(tmp_path, format="transformers")
    exported = transformers.ClapModel.from_pretrained(tmp_path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    extractor = transformers.ClapFeatureExtractor.from_pretrained(tmp_path)
    assert extractor.truncation == hf_clap.extractor.truncation and extractor.frequency_min == 50
    clips = list(recordings.values())
    features, is_longer = _reference_features(extractor, clips, seed=5)
    with torch.inference_mode():
        ours = F.normalize(hf_clap.ours.encode_audio(features, is_longer), dim=-1)
    assert (_their_audio(exported, features, is_longer) - ours).abs().max().item() <= ATOL
    assert (_their_text(exported, tokenizer, TEXTS) - hf_clap.ours.embed_texts(TEXTS)).abs().max().item() <= ATOL
    assert exported.logit_scale_a.item() == pytest.approx(hf_clap.model.logit_scale_a.item())


def test_rosetta_format_round_trip(hf_clap, recordings, tmp_path):
    hf_clap.ours.save_pretrained(tmp_path)
    again = rosetta.load(tmp_path)
    assert isinstance(again, ClapModel) and again.config == hf_clap.ours.config
    clips = [recordings["speech"], recordings["long noise"]]
    assert torch.equal(again.embed_audio(clips), hf_clap.ours.embed_audio(clips))
    assert torch.equal(again.embed_texts(TEXTS), hf_clap.ours.embed_texts(TEXTS))


def test_tiny_preset_exports_to_transformers(recordings, tmp_path):
    """A model built untrained, with its byte-level tokenizer: the export is a ClapModel with its outputs."""
    model = rosetta.create("tiny-clap").eval()
    _perturb(model)
    model.save_pretrained(tmp_path, format="transformers")
    exported = transformers.ClapModel.from_pretrained(tmp_path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert torch.equal(tokenizer(TEXTS, padding=True, return_tensors="pt")["input_ids"], model.tokenize(TEXTS)[0])
    clips = [recordings["speech"], recordings["long speech over noise"]]
    features, is_longer = model.preprocess(clips)
    assert is_longer.all()  # a short clip alone in its batch is marked longer, as transformers marks it
    with torch.inference_mode():
        ours = F.normalize(model.encode_audio(features, is_longer), dim=-1)
    assert (_their_audio(exported, features, is_longer) - ours).abs().max().item() <= ATOL
    assert (_their_text(exported, tokenizer, TEXTS) - model.embed_texts(TEXTS)).abs().max().item() <= ATOL
    assert (rosetta.load(tmp_path).embed_texts(TEXTS) - model.embed_texts(TEXTS)).abs().max().item() <= ATOL


def test_tiny_preset_tasks(recordings):
    model = rosetta.create("tiny-clap").eval()
    clips = [recordings["speech"], torch.from_numpy(recordings["noise"]), np.stack([recordings["silence"]] * 2)]
    audio = model.embed_audio(clips)
    assert audio.shape == (3, 32) and torch.allclose(audio.norm(dim=-1), torch.ones(3))
    texts = model.embed_texts(LABELS)
    assert model.similarity(audio, texts).shape == (3, len(LABELS))
    assert torch.allclose(model.classifier(LABELS, ["a {}", "the sound of {}"]).norm(dim=-1), torch.ones(4))
    probabilities = model.classify(clips[0], LABELS)
    assert probabilities.shape == (1, 4) and torch.allclose(probabilities.sum(), torch.tensor(1.0))
    # Samples at another rate are resampled to the model's 48 kHz.
    at_16k = load_audio(recordings["speech"], 16_000, source_rate=RATE)
    resampled = load_audio(at_16k, RATE, source_rate=16_000)
    assert torch.equal(model.embed_audio(at_16k, sample_rate=16_000), model.embed_audio(resampled))


def test_audio_that_does_not_decode_is_one_line(tmp_path):
    model = rosetta.create("tiny-clap")
    with pytest.raises(InputError, match=r"<18 bytes>: not an audio") as error:
        model.embed_audio(b"this is not audio!")
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="no such file"):
        model.classify(tmp_path / "missing.wav", LABELS)
