"""Model configurations: one frozen dataclass per tower, composed per family, plus named presets.

A config is everything needed to rebuild a model and its input pipeline; it is saved as
`config.json` beside the weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ImageConfig:
    """How an image becomes pixels: resize, crop, normalise (the model's image size is in VisionConfig)."""

    resize: str = "shortest"  # "shortest": shortest side to size, then centre crop; "squash": both sides to size
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    # Where a processor's settings differ from "resize to the model's size, crop it, scale by 1/255": the size it
    # resizes to before cropping (None: the model's), whether it crops the centre at all, the pixel scale.
    resize_size: int | None = None
    center_crop: bool = True
    rescale: float = 1 / 255
    # Where the centre crop starts when the margin is odd: "floor" as transformers' image processors do,
    # "round" (half to even) as torchvision's CenterCrop in open_clip's transforms.
    crop_offset: str = "floor"


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    class_token: bool = True
    pre_norm: bool = True  # CLIP normalises patch tokens before the first block; SigLIP does not
    patch_bias: bool = False
    pool: str = "cls"  # "cls", "mean" (over patch tokens) or "map" (attention pooling with a learned probe)
    # "patch": one linear projection per patch (ViT); "conv": 3x3 stride-2 convolutions down to the patch grid,
    # which learn shapes from little data much faster (Xiao et al. 2021, "Early convolutions help transformers
    # see better")
    stem: str = "patch"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def stem_channels(self) -> tuple[int, ...]:
        return stem_channels(self.width, self.patch_size)


def stem_channels(width: int, patch_size: int) -> tuple[int, ...]:
    """Output channels of a conv stem's stride-2 convolutions: from a quarter of the width, doubling up to it."""
    return tuple(min(width, (width // 4) << i) for i in range(patch_size.bit_length() - 1))


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    causal: bool = True
    pool: str = "eos"  # "eos" (first end-of-text token), "last" or "first"
    eos_token_id: int | None = None  # None: the highest id in the sequence is end-of-text (CLIP's BPE)
    pad_token_id: int = 0
    proj_bias: bool = False
    cleaning: str = "clip"  # text cleaning before tokenizing: "clip", "siglip" (lower case, no punctuation) or "none"


@dataclass(frozen=True)
class AudioConfig:
    """An audio tower of our own (a ViT over log-mel patches, as AST and ImageBind's audio tower) and how a
    sound becomes its input: 16 kHz samples, Whisper's log-mel (25 ms windows every 10 ms), cut or padded to
    `seconds`."""

    seconds: float = 3.0
    n_mels: int = 64
    patch_size: int = 16  # square patches of mel bins x frames
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_dim: int = 1024
    act: str = "gelu"
    norm_eps: float = 1e-5
    stem: str = "conv"  # "conv" (3x3 stride-2 convolutions, quicker to learn from little data) or "patch"
    sample_rate: int = 16_000

    @property
    def frames(self) -> int:
        """Log-mel frames the tower reads: `seconds` at Whisper's 10 ms hop, cut to whole patches."""
        return int(self.seconds * self.sample_rate) // 160 // self.patch_size * self.patch_size

    @property
    def window_samples(self) -> int:
        """Samples of one window the tower hears (`seconds` cut to whole patches of frames)."""
        return self.frames * 160

    @property
    def grid(self) -> tuple[int, int]:
        return self.n_mels // self.patch_size, self.frames // self.patch_size

    @property
    def stem_channels(self) -> tuple[int, ...]:
        return stem_channels(self.width, self.patch_size)


@dataclass(frozen=True)
class VideoConfig:
    """A video is frames sampled at `fps` (at most `max_frames`), each through the image tower; the frame
    embeddings are pooled by their mean (`layers=0`) or by a small temporal transformer, which can tell a shape
    moving left from one moving right as a mean cannot. With `patches`, the transformer also reads each frame's
    patch tokens (the image tower's last hidden states): an image tower trained on captions that seldom say where
    things are pools position away, and motion is position changing over time."""

    fps: float = 1.0
    max_frames: int = 8
    layers: int = 2  # 0: the mean of the frame embeddings, nothing to train
    patches: bool = False
    heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self):
        if self.patches and not self.layers:
            raise ValueError("video patches: true needs a temporal transformer (layers > 0) to read them")


@dataclass(frozen=True)
class ContrastiveConfig:
    """Towers projected into one space: image and text (CLIP's softmax loss or SigLIP's sigmoid loss), and
    optionally audio and video bound to them (ImageBind's recipe)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    audio: AudioConfig | None = None
    video: VideoConfig | None = None
    embed_dim: int = 512
    vision_proj: bool = True  # SigLIP's vision tower ends in its pooling head, without a projection
    loss: str = "softmax"  # "softmax" (CLIP) or "sigmoid" (SigLIP)
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: float | None = None  # SigLIP learns a bias beside the temperature

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ContrastiveConfig:
        d = dict(d)
        image = d.pop("image", {})
        image = {k: tuple(v) if isinstance(v, list) else v for k, v in image.items()}
        audio, video = d.pop("audio", None), d.pop("video", None)
        return cls(
            vision=VisionConfig(**d.pop("vision", {})),
            text=TextConfig(**d.pop("text", {})),
            image=ImageConfig(**image),
            audio=AudioConfig(**audio) if audio is not None else None,
            video=VideoConfig(**video) if video is not None else None,
            **d,
        )


def _clip(vision: VisionConfig, text: TextConfig, embed_dim: int) -> ContrastiveConfig:
    return ContrastiveConfig(vision=vision, text=text, embed_dim=embed_dim)


_SIGLIP_VISION = VisionConfig(
    image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072, act="gelu_tanh",
    norm_eps=1e-6, class_token=False, pre_norm=False, patch_bias=True, pool="map",
)
_SIGLIP_TEXT = TextConfig(
    vocab_size=32000, context_length=64, width=768, layers=12, heads=12, mlp_dim=3072, act="gelu_tanh",
    norm_eps=1e-6, causal=False, pool="last", eos_token_id=1, pad_token_id=1, proj_bias=True,
    cleaning="siglip",
)

PRESETS: dict[str, ContrastiveConfig] = {
    "vit-b-32": _clip(VisionConfig(patch_size=32), TextConfig(), 512),
    "vit-b-16": _clip(VisionConfig(patch_size=16), TextConfig(), 512),
    "vit-l-14": _clip(
        VisionConfig(patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096),
        TextConfig(width=768, heads=12, mlp_dim=3072),
        768,
    ),
    "siglip-base-patch16-224": ContrastiveConfig(
        vision=_SIGLIP_VISION,
        text=_SIGLIP_TEXT,
        image=ImageConfig(resize="squash", mean=HALF, std=HALF),
        embed_dim=768,
        vision_proj=False,
        loss="sigmoid",
        logit_scale_init=math.log(10),
        logit_bias_init=-10.0,
    ),
    # Small enough to train and test in seconds on a laptop CPU; byte-level tokenizer ids fit its vocabulary.
    "tiny": _clip(
        VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_dim=256, act="gelu"),
        TextConfig(vocab_size=258, context_length=32, width=64, layers=2, heads=4, mlp_dim=256, act="gelu"),
        64,
    ),
}

# Audio towers to bind (model_overrides: {audio: ast-small}): AST's shapes (Gong et al. 2021: DeiT's widths over
# 128 mel bins, 10-s windows, 16 x 16 patches) and the binding quickstart's small one.
AUDIO_PRESETS: dict[str, AudioConfig] = {
    "ast-tiny": AudioConfig(seconds=10.0, n_mels=128, stem="patch", width=192, layers=12, heads=3, mlp_dim=768),
    "ast-small": AudioConfig(seconds=10.0, n_mels=128, stem="patch", width=384, layers=12, heads=6, mlp_dim=1536),
    "ast-base": AudioConfig(seconds=10.0, n_mels=128, stem="patch", width=768, layers=12, heads=12, mlp_dim=3072),
    "shapes-speech": AudioConfig(seconds=4.0, n_mels=32, stem="conv", width=128, layers=4, heads=4, mlp_dim=512),
}

# The checkpoint each preset name loads when pretrained weights are asked for.
PRETRAINED: dict[str, str] = {
    "vit-b-32": "openai/clip-vit-base-patch32",
    "vit-b-16": "openai/clip-vit-base-patch16",
    "vit-l-14": "openai/clip-vit-large-patch14",
    "siglip-base-patch16-224": "google/siglip-base-patch16-224",
}
