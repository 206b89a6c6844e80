"""The contrastive image-text model (CLIP, SigLIP): two towers projected into one embedding space."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from rosetta.errors import InputError, RosettaError
from rosetta.modalities.audio import AudioInput, AudioSpans, NoAudioTrack, load_audio, log_mel_spectrogram, pad_or_trim
from rosetta.modalities.image import ImageInput, load_image, preprocess
from rosetta.modalities.sniff import modality_of
from rosetta.modalities.text import (
    CLIP_VOCAB_SIZE,
    TextTokenizer,
    byte_tokenizer,
    load_tokenizer_files,
    openai_clip_bpe,
)
from rosetta.modalities.video import VideoInput, sample_frames, timed_frames
from rosetta.models.compiled import compiled_image_features
from rosetta.models.config import PRESETS, PRETRAINED, AudioConfig, ContrastiveConfig, ImageConfig, VideoConfig
from rosetta.models.encoders import AudioTransformer, ConvStem, TemporalPool, TextTransformer, VisionTransformer
from rosetta.models.registry import Family
from rosetta.templates import resolve_templates

T = TypeVar("T")


def _batches(items: Sequence[T], size: int, progress: bool | None, desc: str) -> Iterator[Sequence[T]]:
    starts = range(0, len(items), size)
    show = progress if progress is not None else len(starts) > 1
    for start in tqdm(starts, desc=desc, unit="batch", disable=not show or None, leave=False):
        yield items[start : start + size]


def _joined(chunks: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(frame vectors, patch tokens or None) of consecutive chunks of frames, concatenated."""
    vectors, patches = zip(*chunks)
    return torch.cat(vectors), torch.cat(patches) if patches[0] is not None else None


class ContrastiveModel(nn.Module):
    def __init__(self, config: ContrastiveConfig, tokenizer: TextTokenizer | None = None):
        super().__init__()
        self.config = config
        self.vision = VisionTransformer(config.vision)
        self.text = TextTransformer(config.text)
        if config.vision_proj:
            self.vision_proj = nn.Linear(config.vision.width, config.embed_dim, bias=False)
        elif config.vision.width != config.embed_dim:
            raise ValueError("without a vision projection, embed_dim must equal the vision width")
        else:
            self.vision_proj = nn.Identity()
        self.text_proj = nn.Linear(config.text.width, config.embed_dim, bias=config.text.proj_bias)
        # Shape [1], not a scalar: FSDP shards parameters along their first dimension.
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.logit_scale_init)))
        bias = config.logit_bias_init
        self.logit_bias = nn.Parameter(torch.full((1,), float(bias))) if bias is not None else None
        # Towers bound to the image-text space (ImageBind): each learns its own temperature against its anchor.
        audio = config.audio
        self.audio = AudioTransformer(audio) if audio else None
        self.audio_proj = nn.Linear(audio.width, config.embed_dim, bias=False) if audio else None
        self.video = (TemporalPool(config.video, config.embed_dim, config.vision.width)
                      if config.video and config.video.layers else None)
        self.bound_logit_scale = nn.ParameterDict({
            m: nn.Parameter(torch.full((1,), math.log(1 / 0.07))) for m in self.bound_modalities
        })
        self.tokenizer = tokenizer or default_tokenizer(config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as CLIP does: small normal weights, projections scaled by the width."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for tower in (self.vision, self.text):
            nn.init.normal_(tower.pos_embed, std=0.01)
        if self.vision.cls_token is not None:
            nn.init.normal_(self.vision.cls_token, std=self.config.vision.width**-0.5)
        if isinstance(self.vision_proj, nn.Linear):
            nn.init.normal_(self.vision_proj.weight, std=self.config.vision.width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=self.config.text.width**-0.5)
        for stem in (self.vision.patch_embed, self.audio and self.audio.patch_embed):
            if isinstance(stem, ConvStem):
                stem.reset_parameters()
        if self.audio is not None:
            nn.init.normal_(self.audio.pos_embed, std=0.01)
            nn.init.normal_(self.audio.cls_token, std=self.config.audio.width**-0.5)
            nn.init.normal_(self.audio_proj.weight, std=self.config.audio.width**-0.5)
        if self.video is not None:
            nn.init.normal_(self.video.pos_embed, std=0.01)
            nn.init.zeros_(self.video.proj.weight)  # a new video tower starts as the mean of its frames

    @property
    def bound_modalities(self) -> tuple[str, ...]:
        """The modalities bound to the image-text space beside image and text: "audio", "video"."""
        return tuple(m for m, tower in (("audio", self.config.audio), ("video", self.config.video)) if tower)

    @property
    def video_config(self) -> VideoConfig:
        """How videos are sampled and pooled; a model without a video tower pools the mean of 1 frame/s."""
        return self.config.video or VideoConfig(layers=0)

    # On CPUs without native bf16, dtype="auto" embeds in int8: twice open_clip's fp32 speed, within cosine 0.99
    # of fp32, the same zero-shot class (benchmarks/embed.py, benchmarks/int8.py).
    int8_when_auto = True

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text.token_embed.weight.dtype  # an embedding: it keeps its dtype when the linears are int8

    # Tensors in, features out: what training and export use.

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [N, 3, H, W] to unnormalised image features [N, D]."""
        compiled = compiled_image_features(self, pixels)  # after `rosetta.models.compiled.compile_image_tower`
        return compiled if compiled is not None else self.vision_proj(self.vision(pixels))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [N, L] to unnormalised text features [N, D]."""
        return self.text_proj(self.text(ids))

    def encode_audio(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel spectrograms [N, n_mels, frames] to unnormalised audio features [N, D]."""
        if self.audio is None:
            raise InputError("this model has no audio tower (bind one with `rosetta train`'s pairings)")
        return self.audio_proj(self.audio(mel))

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Frame pixels [N, T, 3, H, W] to unnormalised video features [N, D]: each frame through the image
        tower, normalised, then pooled over time (reading the frames' patch tokens too where the config says)."""
        n, t = frames.shape[:2]
        vectors, patches = self.frame_features(frames.flatten(0, 1))
        per_frame = F.normalize(vectors, dim=-1).view(n, t, -1)
        if self.video is None:
            return per_frame.mean(dim=1)
        return self.video(per_frame, patches.view(n, t, *patches.shape[1:]) if patches is not None else None)

    def frame_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Frame pixels [N, 3, H, W] to their unnormalised image features [N, D] and, for a video tower that
        reads them, their patch tokens [N, P, width] (else None), from one pass of the image tower."""
        if self.video is None or not self.video.cfg.patches:
            return self.encode_image(pixels), None
        tokens = self.vision.tokens(pixels)
        return self.vision_proj(self.vision.pooled(tokens)), tokens[:, int(self.config.vision.class_token):]

    def encode(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """The tower of `modality` ("image", "text", "audio" or "video") on its input tensor."""
        encoders = {"image": self.encode_image, "text": self.encode_text, "audio": self.encode_audio,
                    "video": self.encode_video}
        if modality not in encoders:
            raise InputError(f"unknown modality {modality!r} (expected {', '.join(encoders)})")
        return encoders[modality](inputs)

    def temperature_of(self, modality: str) -> torch.Tensor:
        """The log inverse temperature [1] of `modality` against text: a bound tower's own, else image-text's."""
        return self.bound_logit_scale[modality] if modality in self.bound_logit_scale else self.logit_scale

    def forward(self, pixels: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                pairs: list[tuple[str, str, torch.Tensor, torch.Tensor]] | None = None):
        """What the contrastive losses take: L2-normalised image and text features, log temperature, bias.

        With `pairs`, [(modality, anchor, its inputs, the anchor's inputs)], what binding takes: per pairing the
        normalised features of both sides and the modality's log temperature. Everything comes out of forward so
        that DDP and FSDP see every trained parameter used in it.
        """
        if pairs is not None:
            return [(F.normalize(self.encode(modality, a), dim=-1), F.normalize(self.encode(anchor, b), dim=-1),
                     self.temperature_of(modality)) for modality, anchor, a, b in pairs]
        image = F.normalize(self.encode_image(pixels), dim=-1)
        return image, F.normalize(self.encode_text(ids), dim=-1), self.logit_scale, self.logit_bias

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor, modality: str = "image"
               ) -> torch.Tensor:
        """Image-by-text logits [N, M] from normalised features, with the learned temperature (and bias); for
        another modality's features, its own temperature."""
        logits = self.temperature_of(modality).exp().float() * image_features.float() @ text_features.float().T
        if self.logit_bias is not None and modality not in self.bound_logit_scale:
            logits = logits + self.logit_bias.float()
        return logits

    # Inputs users hold in, embeddings out.

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Load and preprocess images into a float32 batch [N, 3, H, W]."""
        size = self.config.vision.image_size
        return torch.stack([preprocess(load_image(image), size, self.config.image) for image in images])

    def tokenize(self, texts: str | Sequence[str], truncate: bool = True) -> torch.Tensor:
        return self.tokenizer(texts, truncate=truncate)

    @torch.inference_mode()
    def embed_images(
        self, images: torch.Tensor | ImageInput | Sequence[ImageInput], batch_size: int = 32,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """L2-normalised embeddings [N, D] of images given as paths, bytes, PIL images, arrays, or a pixel tensor."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
                raise InputError(f"pixel tensor: expected float [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
            batches = _batches(images, batch_size, progress, "images")
        else:
            if not isinstance(images, (list, tuple)):
                images = [images]
            batches = (self.preprocess(batch) for batch in _batches(images, batch_size, progress, "images"))
        out = [self.encode_image(batch.to(self.device, self.dtype)) for batch in batches]
        return F.normalize(torch.cat(out).float(), dim=-1) if out else self._empty()

    @torch.inference_mode()
    def embed_texts(
        self, texts: str | Sequence[str], batch_size: int = 256, progress: bool | None = None, truncate: bool = True
    ) -> torch.Tensor:
        """L2-normalised embeddings [N, D] of strings."""
        if isinstance(texts, str):
            texts = [texts]
        out = [
            self.encode_text(self.tokenize(batch, truncate=truncate).to(self.device))
            for batch in _batches(list(texts), batch_size, progress, "texts")
        ]
        return F.normalize(torch.cat(out).float(), dim=-1) if out else self._empty()

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, self.config.embed_dim, device=self.device)

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity [N, M] between two sets of embeddings."""
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T

    @torch.inference_mode()
    def classifier(self, labels: Sequence[str], templates: str | Sequence[str] | None = None,
                   modality: str = "image") -> torch.Tensor:
        """One embedding per label [L, D], averaged over prompt templates (prompt ensembling); by default
        "a photo of a {}." for images, the label itself for sounds and videos."""
        labels = [label.strip() for label in labels]
        if not labels or any(not label for label in labels):
            raise InputError("labels: need at least one non-empty label")
        prompts = resolve_templates(templates, modality)
        texts = [prompt.format(label) for label in labels for prompt in prompts]
        per_prompt = self.embed_texts(texts).view(len(labels), len(prompts), -1)
        return F.normalize(per_prompt.mean(dim=1), dim=-1)

    @torch.inference_mode()
    def classify(
        self, inputs, labels: Sequence[str], templates: str | Sequence[str] | None = None, batch_size: int = 32,
        progress: bool | None = None, modality: str | None = None,
    ) -> torch.Tensor:
        """Zero-shot probabilities [N, L] of images, sounds or videos (told apart as `embed` does): softmax over
        labels for CLIP and bound towers, per-label sigmoid for SigLIP's images."""
        modality = modality or _modality_of_all(inputs)
        classifier = self.classifier(labels, templates, modality)
        embeddings = self.embed(inputs, modality=modality, batch_size=batch_size, progress=progress)
        return self.probabilities(embeddings, classifier, modality)

    @torch.inference_mode()
    def probabilities(self, embeddings: torch.Tensor, classifier: torch.Tensor, modality: str = "image"
                      ) -> torch.Tensor:
        """Label probabilities from embeddings and a `classifier()`, as the model's loss defines them."""
        logits = self.logits(embeddings, classifier, modality)
        sigmoid = self.config.loss == "sigmoid" and modality not in self.bound_logit_scale
        return torch.sigmoid(logits) if sigmoid else logits.softmax(dim=-1)

    @torch.inference_mode()
    def embed(self, inputs, modality: str | None = None, batch_size: int = 32, progress: bool | None = None
              ) -> torch.Tensor:
        """L2-normalised embeddings [N, D] of images, sounds or videos, told apart by `modality_of` (a file's
        suffix or first bytes, an array's shape) unless `modality` says; one modality per call."""
        modality = modality or _modality_of_all(inputs)
        if modality == "image":
            return self.embed_images(inputs, batch_size=batch_size, progress=progress)
        if modality == "audio":
            return self.embed_audio(inputs, batch_size=batch_size, progress=progress)
        if modality == "video":
            return self.embed_videos(inputs, progress=progress)
        if modality == "text":
            return self.embed_texts(inputs, progress=progress)
        raise InputError(f"unknown modality {modality!r} (expected image, audio, video or text)")

    # Sound and video: what the bound towers hear and see.

    def audio_windows(self, audio: AudioInput) -> tuple[torch.Tensor, list[float]]:
        """A clip's log-mel windows [W, n_mels, frames] and when each starts (s): `audio_windows`."""
        return audio_windows(audio, self._audio_config())

    @torch.inference_mode()
    def embed_audio(self, audio: AudioInput | Sequence[AudioInput], batch_size: int = 32,
                    progress: bool | None = None) -> torch.Tensor:
        """L2-normalised embeddings [N, D] of sounds given as paths (audio files, or videos' audio tracks),
        bytes, or 16 kHz waveforms; a clip longer than the tower's window is the mean of its windows."""
        clips = [audio] if not isinstance(audio, (list, tuple)) else audio
        out = []
        for batch in _batches(clips, batch_size, progress, "audio"):
            windows = [self.audio_windows(clip)[0] for clip in batch]
            vectors = F.normalize(self.encode_audio(torch.cat(windows).to(self.device, self.dtype)).float(), dim=-1)
            out += [chunk.mean(dim=0) for chunk in vectors.split([len(w) for w in windows])]
        return F.normalize(torch.stack(out), dim=-1) if out else self._empty()

    @torch.inference_mode()
    def embed_audio_segments(self, audio: AudioInput) -> list[tuple[float, float, torch.Tensor]]:
        """(start s, end s, embedding [D]) of each window of a clip: where in a recording a sound is."""
        windows, starts = self.audio_windows(audio)
        vectors = F.normalize(self.encode_audio(windows.to(self.device, self.dtype)).float(), dim=-1)
        cfg = self._audio_config()
        length = cfg.window_samples / cfg.sample_rate
        return [(start, start + length, vector) for start, vector in zip(starts, vectors)]

    @torch.inference_mode()
    def embed_videos(self, videos: VideoInput | Sequence[VideoInput], progress: bool | None = None) -> torch.Tensor:
        """One L2-normalised embedding per video [N, D]: frames at the video config's rate (at most
        `max_frames`, spread over the whole video), pooled over time; with the audio track's embedding
        averaged in when the model has an audio tower and the video has sound."""
        videos = [videos] if not isinstance(videos, (list, tuple)) else videos
        cfg = self.video_config
        out = []
        for video in tqdm(videos, desc="videos", unit="video", disable=not (progress or len(videos) > 8) or None,
                          leave=False):
            frames = sample_frames(video, cfg.fps, cfg.max_frames)
            vector = self._pool_frames(*self._frame_features(frames))
            out.append(self._with_sound(vector, self._sound(video)))
        return torch.stack(out) if out else self._empty()

    @torch.inference_mode()
    def embed_video_segments(self, video: VideoInput, window: float | None = None
                             ) -> list[tuple[float, float, torch.Tensor]]:
        """(start s, end s, embedding [D]) of consecutive windows of a video (default: `max_frames` frames at
        the config's rate): for finding the moment something happens. Frames and sound stream: a long video is
        never held in memory, only one window's frame embeddings (and patch tokens, for a video tower that
        reads them) and the sound of about one window."""
        cfg = self.video_config
        window = window or cfg.max_frames / cfg.fps
        if window <= 0:
            raise InputError(f"window {window}: must be positive seconds")
        timed = timed_frames(video, cfg.fps, max_frames=None)
        first = next(timed)  # a video whose first frame does not decode says so before its sound track is opened
        spans = self._sound_spans(video)
        rate = self.config.audio.sample_rate if spans is not None else 0
        rows: list[tuple[float, float, torch.Tensor]] = []
        pending: list[Image.Image] = []  # decoded frames, embedded 32 at a time
        embedded: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # the window's frames so far

        def embed_pending() -> None:
            if pending:
                embedded.append(self._frame_features(pending))
                pending.clear()

        def pool(k: int, end: float) -> None:
            # Windows come in ascending order (frame times only go up): each one's sound is read after the last.
            embed_pending()
            features = _joined(embedded)
            embedded.clear()
            start = k * window
            sound = spans(int(start * rate), int(end * rate)) if spans is not None else None
            rows.append((start, end, self._with_sound(self._pool_frames(*features), sound)))

        current, last = 0, 0.0
        for time, frame in itertools.chain([first], timed):
            k = int(time // window)
            if (pending or embedded) and k != current:
                pool(current, (current + 1) * window)
            current, last = k, time
            pending.append(frame)
            if len(pending) == 32:
                embed_pending()
        pool(current, min((current + 1) * window, last + 1 / cfg.fps))
        return rows

    def _frame_features(self, frames: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`frame_features` of decoded frames, 32 at a time: vectors L2-normalised in float32 [T, D]."""
        chunks = []
        for batch in _batches(frames, 32, False, "frames"):
            vectors, patches = self.frame_features(self.preprocess(batch).to(self.device, self.dtype))
            chunks.append((F.normalize(vectors.float(), dim=-1), patches))
        return _joined(chunks)

    def _pool_frames(self, frame_vectors: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        """One video vector from its normalised frame vectors [T, D] (and their patch tokens [T, P, width] for a
        tower that reads them); more frames than the temporal tower has positions for are thinned evenly."""
        limit = self.video_config.max_frames
        if self.video is not None and len(frame_vectors) > limit:
            keep = torch.linspace(0, len(frame_vectors) - 1, limit).round().long()
            frame_vectors = frame_vectors[keep]
            patches = patches[keep] if patches is not None else None
        if self.video is None:
            return F.normalize(frame_vectors.mean(0), dim=-1)
        patches = patches[None] if patches is not None else None
        return F.normalize(self.video(frame_vectors[None].to(self.dtype), patches)[0].float(), dim=-1)

    def _sound(self, video: VideoInput) -> torch.Tensor | None:
        """A video's audio track at the audio tower's rate, or None (no audio tower, or a silent video)."""
        if self.audio is None:
            return None
        try:
            return torch.from_numpy(load_audio(video, self.config.audio.sample_rate))
        except NoAudioTrack:
            return None

    def _sound_spans(self, video: VideoInput) -> AudioSpans | None:
        """A video's audio track at the audio tower's rate, to be read window by window (a long video's sound
        is never held whole), or None (no audio tower, or a silent video)."""
        if self.audio is None:
            return None
        try:
            return AudioSpans(video, self.config.audio.sample_rate)
        except NoAudioTrack:
            return None

    def _with_sound(self, vector: torch.Tensor, sound: torch.Tensor | np.ndarray | None) -> torch.Tensor:
        """The video vector, averaged with its sound's embedding where the model hears (and there is sound)."""
        if sound is None or not len(sound):
            return vector
        heard = self.embed_audio(sound.numpy() if isinstance(sound, torch.Tensor) else sound)[0]
        return F.normalize(vector + heard, dim=-1)

    def _audio_config(self) -> AudioConfig:
        if self.config.audio is None:
            raise InputError("this model has no audio tower (bind one with `rosetta train`'s pairings)")
        return self.config.audio

    def save_pretrained(self, directory: str | Path, format: str = "rosetta") -> Path:
        """Write a model directory: Rosetta's own format, or `format="transformers"` for transformers' CLIPModel."""
        from rosetta.models.registry import save

        return save(self, Path(directory), format)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"params={self.num_params() / 1e6:.1f}M, temperature={1 / math.exp(self.logit_scale.item()):.4f}"


def audio_windows(audio: AudioInput, cfg: AudioConfig) -> tuple[torch.Tensor, list[float]]:
    """A clip's log-mel windows [W, n_mels, frames] of the audio tower's length, and when each starts (s).

    A clip shorter than a window is padded with silence; a longer one is cut into consecutive windows, the
    last padded when it holds at least a quarter of a window (or is the only one).
    """
    samples = cfg.window_samples
    waveform = torch.from_numpy(load_audio(audio, cfg.sample_rate))
    starts = [s for s in range(0, len(waveform), samples) if s == 0 or len(waveform) - s >= samples // 4]
    chunks = torch.stack([pad_or_trim(waveform[s : s + samples], samples) for s in starts])
    return log_mel_spectrogram(chunks, cfg.n_mels), [s / cfg.sample_rate for s in starts]


def video_pixels(video: VideoInput, cfg: VideoConfig, image_size: int, image_config: ImageConfig) -> torch.Tensor:
    """Frames at `cfg.fps` spread over the video, preprocessed, [max_frames, 3, H, W]: a video with fewer
    frames repeats its last, so that videos batch."""
    frames = sample_frames(video, cfg.fps, cfg.max_frames)
    frames += frames[-1:] * (cfg.max_frames - len(frames))
    return torch.stack([preprocess(frame, image_size, image_config) for frame in frames])


def _modality_of_all(inputs) -> str:
    """The one modality of a batch of inputs (a pixel tensor is images); a mixed batch is an error."""
    if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
        return "image"
    items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    kinds = {modality_of(item) for item in items} or {"image"}
    if len(kinds) > 1:
        raise InputError(f"one modality per call: these inputs mix {', '.join(sorted(kinds))}")
    return kinds.pop()


def default_tokenizer(config: ContrastiveConfig) -> TextTokenizer:
    """The tokenizer of a model that ships none: OpenAI CLIP's BPE for a CLIP-sized vocabulary (open_clip's default,
    which its exports often leave out; Rosetta ships it), else bytes (models trained from scratch)."""
    t = config.text
    backend = openai_clip_bpe() if t.vocab_size == CLIP_VOCAB_SIZE and t.cleaning == "clip" else byte_tokenizer()
    return TextTokenizer(backend, t.context_length, t.pad_token_id, t.cleaning)


def read_tokenizer(directory: Path, config: ContrastiveConfig) -> TextTokenizer:
    backend = load_tokenizer_files(directory)
    if backend is None:
        if config.text.vocab_size != CLIP_VOCAB_SIZE or config.text.cleaning != "clip":
            raise RosettaError(f"{directory}: no tokenizer files (tokenizer.json, vocab.json + merges.txt or "
                               "spiece.model), and its vocabulary is not OpenAI CLIP's")
        return default_tokenizer(config)
    return TextTokenizer(backend, config.text.context_length, config.text.pad_token_id, config.text.cleaning)


FAMILY = Family(
    name="contrastive", config_class=ContrastiveConfig, model_class=ContrastiveModel, presets=PRESETS,
    pretrained=PRETRAINED, converters=("open_clip", "clip"), read_tokenizer=read_tokenizer,
)
