"""Parity with Hugging Face transformers for vision-language models: a tiny random LlavaForConditionalGeneration
(a CLIP image tower and a Llama) with its LlavaProcessor, built and saved here, loaded with `rosetta.load`:
the prompt expansion and the pixels against the processor on real photos, the logits, greedy generation,
the older checkpoint layout, and the export back to transformers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import rosetta
from rosetta.generation.tasks import complete
from rosetta.models.vlm import user

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
CORPUS = ["A photo of a cat sitting on a mat.", "What colour is the square? It is red.", "Describe the image.",
          "There are two dogs on the beach, naïve café.", "JSON: {\"total\": 12.5, \"date\": \"2024-05-01\"}"] * 20
# ChatML with image parts, in the style of the templates VLM processors ship.
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PHOTOS = {
    "astronaut": lambda: skimage_data.astronaut(),  # 512x512
    "rocket": lambda: skimage_data.rocket(),  # 427x640
    "portrait": lambda: skimage_data.astronaut()[:, 100:341],  # 512x241
    "small": lambda: skimage_data.chelsea()[:27, :19],  # 27x19, upscaled
}


def _photo(name: str) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(PHOTOS[name]()))


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A tiny random LLaVA-1.5 (CLIP tower at 32 px in 8 px patches: 16 image tokens; a 2-layer Llama), saved by
    transformers with its processor: (directory, model, processor)."""
    return _llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def llama_llava(tmp_path_factory):
    """The same with a Llama-style tokenizer, which starts every text with BOS, and LLaVA-1.5's own prompt format,
    which leaves BOS to the tokenizer (as llava-hf/llava-1.5-7b-hf's)."""
    return _llava(tmp_path_factory.mktemp("llama-llava"), bos="<s>")


def _llava(directory, bos: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from rosetta.models.vlm import LLAVA_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIALS + [bos] if bos else SPECIALS
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=380, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos or "<|im_start|>",
                                                     eos_token="<|im_end|>", pad_token="<|endoftext|>")
    image_id = tok.token_to_id("<image>")
    vision = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
                                           num_attention_heads=2, intermediate_size=64, hidden_act="quick_gelu")
    text = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=512, tie_word_embeddings=False,
                                    bos_token_id=tok.token_to_id(bos or "<|im_start|>"),
                                    eos_token_id=tok.token_to_id("<|im_end|>"),
                                    pad_token_id=tok.token_to_id("<|endoftext|>"))
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                      image_seq_length=16, vision_feature_layer=-2,
                                      vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off the initial values (unit norms, zero biases), so a misplaced tensor shows
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                         crop_size={"height": 32, "width": 32})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                            chat_template=LLAVA_TEMPLATE if bos else TEMPLATE)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory, model, processor


def _theirs(processor, images: list[Image.Image], question: str) -> dict:
    messages = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=images, text=text, return_tensors="pt")


@pytest.mark.parametrize("name", list(PHOTOS))
def test_prompt_expansion_and_pixels_equal_the_processors(llava, name):
    directory, _, processor = llava
    ours = rosetta.load(directory)
    photo = _photo(name)
    inputs = _theirs(processor, [photo, photo.rotate(90, expand=True)], "Compare the two pictures.")
    ids, images = ours.prompt([user([photo, photo.rotate(90, expand=True)], "Compare the two pictures.")])
    assert ids == inputs["input_ids"][0].tolist()
    assert ids.count(ours.config.image_token_id) == 2 * 16
    from rosetta.modalities.image import preprocess

    pixels = torch.stack([preprocess(image, 32, ours.config.image) for image in images])
    assert (pixels - inputs["pixel_values"]).abs().max() < 1e-5


def test_a_llama_tokenizers_bos_starts_the_prompt_as_in_the_processors(llama_llava):
    directory, theirs, processor = llama_llava
    ours = rosetta.load(directory)
    photo = _photo("rocket")
    inputs = _theirs(processor, [photo], "Describe the image.")
    ids, _ = ours.prompt([user(photo, "Describe the image.")])
    assert ids == inputs["input_ids"][0].tolist()
    assert ids[0] == processor.tokenizer.bos_token_id and ids.count(ids[0]) == 1
    with torch.no_grad():
        want = theirs(**inputs).logits[0, -1]
    assert ours.ask(photo, "Describe the image.", max_new_tokens=1) == processor.decode(want.argmax(-1))
    as_processed = processor.apply_chat_template([user(photo, "Describe the image.")], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)
    assert as_processed["input_ids"][0] == ids  # the processor's own chat path adds the BOS too


def test_logits_match(llava):
    directory, theirs, processor = llava
    ours = rosetta.load(directory)
    assert ours.config.image_tokens == 16 and ours.config.feature_layer == -2
    inputs = _theirs(processor, [_photo("astronaut"), _photo("rocket")], "What is in the pictures?")
    with torch.no_grad():
        expected = theirs(**inputs).logits
        got = ours(inputs["input_ids"], inputs["pixel_values"])
    assert (got - expected).abs().max() < ATOL


def test_greedy_generation_equals_transformers_generate(llava):
    directory, theirs, processor = llava
    ours = rosetta.load(directory)
    photo = _photo("rocket")
    inputs = _theirs(processor, [photo], "Describe the image.")
    with torch.no_grad():
        expected = theirs.generate(**inputs, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    expected = expected[0, inputs["input_ids"].shape[1]:].tolist()
    ids, images = ours.prompt([user(photo, "Describe the image.")])
    with torch.inference_mode():
        embeds = ours.embed_prompt(torch.tensor([ids]), ours._features(images))[0]
        got = complete(ours.lm, [ids], 32, prompt_embeds=[embeds], ignore_eos=True)[0].tokens
    assert got == expected
    assert ours.ask(photo, "Describe the image.", max_new_tokens=32, ignore_eos=True) == processor.decode(
        expected, skip_special_tokens=True)


@pytest.mark.parametrize("layout", ["hub", "transformers-4.52"])
def test_every_checkpoint_layout_loads_the_same(llava, tmp_path, layout):
    """The hub's LLaVA checkpoints name their weights vision_tower.vision_model.*, language_model.model.*;
    transformers 4.52+ model.vision_tower.vision_model.*, model.language_model.*; transformers 5 writes
    vision_tower.embeddings.* (the fixture's own layout)."""
    from safetensors.torch import load_file, save_file

    directory, theirs, processor = llava
    renamed = {}
    for name, tensor in load_file(directory / "model.safetensors").items():
        name = name.replace("vision_tower.", "vision_tower.vision_model.")
        if layout == "transformers-4.52":
            name = name.replace("language_model.model.", "model.language_model.")
            name = name.replace("language_model.lm_head.", "lm_head.")
            for part in ("vision_tower.", "multi_modal_projector."):
                name = name.replace(part, "model." + part) if name.startswith(part) else name
        renamed[name] = tensor
    for f in directory.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file(renamed, tmp_path / "model.safetensors")
    inputs = _theirs(processor, [_photo("portrait")], "What is it?")
    with torch.no_grad():
        assert (rosetta.load(tmp_path)(inputs["input_ids"], inputs["pixel_values"])
                - theirs(**inputs).logits).abs().max() < ATOL


def test_export_loads_in_transformers_with_the_same_logits(llava, tmp_path):
    directory, theirs, processor = llava
    ours = rosetta.load(directory)
    ours.save_pretrained(tmp_path / "hf", format="transformers")
    back = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    inputs = _theirs(processor, [_photo("small")], "Colour?")
    with torch.no_grad():
        assert (back(**inputs).logits - theirs(**inputs).logits).abs().max() < ATOL
    again = rosetta.load(tmp_path / "hf")
    assert again.prompt([user(_photo("small"), "Colour?")])[0] == inputs["input_ids"][0].tolist()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llava" and config["image_token_id"] == ours.config.image_token_id


def test_rosetta_format_round_trip(llava, tmp_path):
    directory, _, _ = llava
    ours = rosetta.load(directory)
    ours.save_pretrained(tmp_path / "ours")
    again = rosetta.load(tmp_path / "ours")
    photo = _photo("astronaut")
    assert again.ask(photo, "Colour?", max_new_tokens=8) == ours.ask(photo, "Colour?", max_new_tokens=8)


# SmolVLM (Idefics3's architecture): a SigLIP tower, pixel shuffle, image tiles.

SMOL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                 "<global-img>", *(f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4))]
SMOL_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'] is string %}"
    "{{': ' + message['content']}}{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}"
    "{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smolvlm(tmp_path_factory):
    """A tiny random SmolVLM (SigLIP-style tower on 32 px tiles of 8 px patches, pixel shuffle by 2: 4 tokens a
    tile; images cut into tiles up to 96 px, so at most 3 x 3 tiles and the whole image), saved by transformers
    with its processor: (directory, model, processor)."""
    pytest.importorskip("num2words")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=SMOL_SPECIALS,
                                                        show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                                     eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
    vision = transformers.SmolVLMVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=32, patch_size=8)
    text = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=1024, tie_word_embeddings=False,
                                    bos_token_id=tok.token_to_id("<|im_start|>"),
                                    eos_token_id=tok.token_to_id("<end_of_utterance>"),
                                    pad_token_id=tok.token_to_id("<|endoftext|>"))
    config = transformers.SmolVLMConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=2,
                                        image_token_id=tok.token_to_id("<image>"))
    torch.manual_seed(0)
    model = transformers.SmolVLMForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    image_processor = transformers.SmolVLMImageProcessorPil(size={"longest_edge": 96},
                                                            max_image_size={"longest_edge": 32})
    processor = transformers.SmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                              video_processor=transformers.SmolVLMVideoProcessor(), image_seq_len=4,
                                              chat_template=SMOL_TEMPLATE)
    directory = tmp_path_factory.mktemp("smolvlm")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory, model, processor


@pytest.mark.parametrize("name", list(PHOTOS))
def test_smolvlm_tiles_and_prompt_equal_the_processors(smolvlm, name):
    directory, _, processor = smolvlm
    ours = rosetta.load(directory)
    photo = _photo(name)
    inputs = _theirs(processor, [photo], "What is it?")
    ids, tiles = ours.prompt([user(photo, "What is it?")])
    assert ids == inputs["input_ids"][0].tolist()
    from rosetta.modalities.image import preprocess

    pixels = torch.stack([preprocess(tile, 32, ours.config.image) for tile in tiles])
    theirs = inputs["pixel_values"][0]
    assert pixels.shape == theirs.shape and (pixels - theirs).abs().max() < 1e-5
    assert len(tiles) > 1  # upscaled to 96 px: tiles and the whole image


def test_smolvlm_logits_and_greedy_generation_match(smolvlm):
    directory, theirs, processor = smolvlm
    ours = rosetta.load(directory)
    assert ours.config.image_tokens == 4 and ours.config.tiling.longest_edge == 96
    photos = [_photo("rocket"), _photo("portrait")]
    inputs = _theirs(processor, photos, "Compare them.")
    ids, tiles = ours.prompt([user(photos, "Compare them.")])
    with torch.no_grad():
        expected = theirs(**inputs).logits
        got = ours(torch.tensor([ids]), torch.stack([
            __import__("rosetta.modalities.image", fromlist=["preprocess"]).preprocess(t, 32, ours.config.image)
            for t in tiles]))
    assert (got - expected).abs().max() < ATOL
    with torch.no_grad():
        reference = theirs.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    reference = reference[0, inputs["input_ids"].shape[1]:].tolist()
    with torch.inference_mode():
        prompt, embeds = ours.prompt_embeds([user(photos, "Compare them.")])
        assert complete(ours.lm, [prompt], 32, prompt_embeds=[embeds], ignore_eos=True)[0].tokens == reference


def test_smolvlm_export_loads_in_transformers(smolvlm, tmp_path):
    directory, theirs, processor = smolvlm
    rosetta.load(directory).save_pretrained(tmp_path / "hf", format="transformers")
    back = transformers.SmolVLMForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    inputs = _theirs(processor, [_photo("astronaut")], "Colour?")
    with torch.no_grad():
        assert (back(**inputs).logits - theirs(**inputs).logits).abs().max() < ATOL
    again = rosetta.load(tmp_path / "hf")
    assert again.prompt([user(_photo("astronaut"), "Colour?")])[0] == inputs["input_ids"][0].tolist()
