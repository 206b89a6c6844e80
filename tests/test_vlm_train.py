"""Training vision-language models: LLaVA's records, reply-only targets, packing, the trainer's equivalences and
resume, LoRA, composing a model from a contrastive tower and a language model, the shapes questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train import assert_same_weights, losses, torchrun

import rosetta
from rosetta.errors import InputError, RosettaError
from rosetta.train.config import load_config
from rosetta.train.trainer import train
from rosetta.train.vlm import IGNORE, Collate, ConversationDataset, conversation, pack, segment_mask


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from rosetta.data.builtin import make_shapes
    from rosetta.data.shapes_qa import make_shape_questions

    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, n=160, seed=0, image_size=32)
    make_shape_questions(out)
    return out


@pytest.fixture(scope="module")
def tower(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tower") / "clip"
    rosetta.create("tiny").save_pretrained(path)
    return path


def recipe(shapes: Path, tower: Path, out: Path, **settings) -> Path:
    vlm = {"vision_tower": str(tower), "language_model": "tiny-lm", "train": ["projector", "lm"],
           **settings.pop("vlm", {})}
    values = {
        "task": "vlm", "vlm": vlm, "tokenizer_vocab": 320,
        "model_overrides": {"text": {"width": 64, "layers": 2, "heads": 4, "kv_heads": 2, "mlp_dim": 128}},
        "data": {"train": str(shapes / "train-conversations.jsonl"), "workers": 0},
        "out": str(out), "batch_size": 16, "epochs": 1, "lr": 2e-3, "warmup_steps": 2, "log_every": 1,
        "weight_decay": 0.0, "device": "cpu", **settings,
    }
    path = out.with_suffix(".yaml")
    path.write_text(json.dumps(values))
    return path


# Records.

def test_llava_records_become_messages_with_images_where_the_tags_are():
    record = {"key": "a", "image": ["one.png", "two.png"], "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\nCompare with <image> please"},
        {"from": "gpt", "value": "The same."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]}
    messages = conversation(record)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == [{"type": "image", "image": "one.png"}, {"type": "text", "text": "Compare with "},
                                      {"type": "image", "image": "two.png"}, {"type": "text", "text": " please"}]
    assert messages[2]["content"] == "The same."
    caption = conversation({"image": "x.png", "text": "a red circle"})
    assert caption[1] == {"role": "assistant", "content": "a red circle"}
    with pytest.raises(InputError, match="more <image> tags than images"):
        conversation({"key": "b", "image": "x.png", "conversations": [{"from": "human", "value": "<image><image>"}]})
    with pytest.raises(InputError, match="neither"):
        conversation({"key": "c", "text": "no image"})


def test_training_ids_target_the_replies_and_their_prompts_are_what_inference_sees(shapes):
    model = rosetta.create("tiny-vlm")
    record = json.loads((shapes / "train-conversations.jsonl").read_text().splitlines()[1])
    record["image"] = str(shapes / record["image"])
    messages = conversation(record)
    ids, replies, tiles = model.training_ids(messages)
    assert len(ids) == len(replies) and len(tiles) == 1
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    starts = [i for i in range(len(ids)) if replies[i] and (i == 0 or not replies[i - 1])]
    assert len(starts) == len(assistant)
    end_of_turn = model.tokenizer.token_id("<|im_end|>")
    for turn, start in zip(assistant, starts):
        prompt, _ = model.prompt(messages[:turn])  # what generation would be handed for this reply
        assert ids[:start] == prompt
        stop = next(i for i in range(start, len(ids)) if not replies[i])
        assert ids[stop - 1] == end_of_turn  # the reply is trained to end its turn
        assert model.tokenizer.decode(ids[start : stop - 1]) == messages[turn]["content"]
    assert sum(i == model.config.image_token_id for i in ids) == model.config.image_tokens


def test_training_ids_are_the_whole_conversation_tokenised_at_once_for_word_start_tokenisers():
    """SentencePiece-style tokenisers (Llama's, LLaVA-1.5's) mark word starts: a reply tokenised on its own
    would gain a token; the ids must be the whole rendered conversation's."""
    import dataclasses

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rosetta.modalities.text import LMTokenizer
    from rosetta.models.vlm import PRESETS, VisionLanguageModel

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(["USER: What colour is it? ASSISTANT: a red circle</s> blue square"] * 4,
                                trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>", "<image>"]))
    tokenizer = LMTokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>"}, None)  # LLaVA's template
    config = dataclasses.replace(PRESETS["tiny-vlm"], image_token_id=backend.token_to_id("<image>"),
                                 text=dataclasses.replace(PRESETS["tiny-vlm"].text, vocab_size=120))
    model = VisionLanguageModel(config, tokenizer)
    from PIL import Image

    image = Image.new("RGB", (32, 32), "red")
    question = [{"type": "image", "image": image}, {"type": "text", "text": "What colour?"}]
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "content": "a red circle"},
                {"role": "user", "content": "And?"}, {"role": "assistant", "content": "blue square"}]
    ids, replies, _ = model.training_ids(messages)
    text = model.tokenizer.decode(ids, skip_special_tokens=False)
    assert "<image>" in text and text.count("</s>") == 2
    spans, run = [], []
    for token, reply in zip(ids, replies):
        if reply:
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    spans += [run] if run else []
    assert [model.tokenizer.decode(span) for span in spans] == ["a red circle", "blue square"]
    assert [tokenizer.backend.id_to_token(span[-1]) for span in spans] == ["</s>", "</s>"]
    prompt, _ = model.prompt(messages[:3])
    assert ids[: len(prompt)] == prompt  # the second reply's prompt is what generation is handed


def test_dataset_targets_are_the_next_reply_token(shapes):
    model = rosetta.create("tiny-vlm")
    ids, targets, pixels = ConversationDataset([{"image": str(shapes / "images/train/train-000000.png"),
                                                 "text": "a blue circle"}], model)[0]
    kept = targets != IGNORE
    assert torch.equal(targets[:-1][kept[:-1]], ids[1:][kept[:-1]])
    reply = model.tokenizer.decode(targets[kept].tolist(), skip_special_tokens=False)
    assert reply == "a blue circle<|im_end|>"
    assert pixels.shape == (1, 3, 32, 32)


def test_long_conversations_are_cut_never_inside_an_image(shapes):
    model = rosetta.create("tiny-vlm")
    image, tokens = str(shapes / "images/train/train-000000.png"), model.config.image_tokens
    record = {"conversations": [{"from": "human", "value": "<image>\nwhat is it?"},
                                {"from": "gpt", "value": "a blue circle " * 20}]}
    full_ids, full_targets, _ = ConversationDataset([{**record, "image": image}], model)[0]
    start = full_ids.tolist().index(model.config.image_token_id)
    after_image = start + tokens + 5
    ids, targets, pixels = ConversationDataset([{**record, "image": image}], model, max_length=after_image)[0]
    assert torch.equal(ids, full_ids[:after_image]) and pixels.shape[0] == 1  # the image fits: kept
    assert torch.equal(targets[:-1], full_targets[: after_image - 1])
    inside = start + tokens // 2
    ids, targets, pixels = ConversationDataset([{**record, "image": image}], model, max_length=inside)[0]
    assert torch.equal(ids, full_ids[:start]) and pixels.shape[0] == 0  # cut before the image, dropped whole
    assert (targets == IGNORE).all()  # no reply left to learn from
    with torch.no_grad():
        assert model(ids[None], pixels).shape[:2] == (1, start)  # what is left still runs


# Packing.

def test_pack_first_fit_decreasing_keeps_rows_within_capacity():
    rows = pack([5, 9, 3, 7, 2], capacity=10)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4]
    assert all(sum([5, 9, 3, 7, 2][i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3


def test_segment_mask_keeps_each_packed_sample_to_itself():
    mask = segment_mask(torch.tensor([[1, 1, 2, 2, 0]]))[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]])
    assert torch.equal(mask, expected.bool())


def test_packed_rows_give_each_sample_the_logits_it_has_alone(shapes):
    from rosetta.nn.cache import CacheWindow

    torch.manual_seed(0)
    model = rosetta.create("tiny-vlm").eval()
    records = [json.loads(line) for line in (shapes / "train-conversations.jsonl").read_text().splitlines()[:4]]
    for r in records:
        r["image"] = str(shapes / r["image"])
    dataset = ConversationDataset(records, model)
    samples = [dataset[i] for i in range(4)]
    packed = Collate(pad_id=256, pack_length=2 * max(len(s[0]) for s in samples))(samples)
    assert packed["ids"].shape[0] < 4  # some share a row
    with torch.no_grad():
        logits = model(packed["ids"], packed["pixels"], positions=packed["positions"],
                       window=CacheWindow.uncached(segment_mask(packed["segments"])))
        for ids, targets, pixels in samples:
            alone = model(ids[None], pixels)[0]
            row, at = next((r, c) for r in range(len(packed["ids"])) for c in range(packed["ids"].shape[1])
                           if torch.equal(packed["targets"][r, c : c + len(ids)], targets)
                           and torch.equal(packed["ids"][r, c : c + len(ids)], ids))
            torch.testing.assert_close(logits[row, at : at + len(ids)], alone, atol=1e-5, rtol=0)


# The trainer.

def test_vlm_training_learns_and_the_model_answers(shapes, tower, tmp_path):
    final = train(load_config(recipe(shapes, tower, tmp_path / "run", epochs=3)))
    curve = losses(tmp_path / "run")
    assert curve[-1] < 0.6 * curve[0]
    model = rosetta.load(final)
    assert isinstance(model.ask(shapes / "images/test/test-000000.png", "How many shapes are there?"), str)
    clip = rosetta.load(tower)
    for key, value in clip.vision.state_dict().items():  # the tower was frozen
        torch.testing.assert_close(model.vision.state_dict()[key], value, atol=0, rtol=0)


def test_accumulation_and_packing_leave_the_run_unchanged(shapes, tower, tmp_path):
    """The loss is the mean over the global batch's reply tokens however it is cut into rows and micro-batches."""
    plain = train(load_config(recipe(shapes, tower, tmp_path / "plain")))
    accumulated = train(load_config(recipe(shapes, tower, tmp_path / "accum", accum_steps=2,
                                           vlm={"pack_length": 400})))
    assert losses(tmp_path / "accum") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)
    assert_same_weights(plain, accumulated, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_follow_the_one_process_trajectory(shapes, tower, tmp_path, strategy):
    """The tower trained too: DDP needs every trained weight to get a gradient (the blocks after the feature
    layer are frozen); FSDP shards trained and frozen weights side by side."""
    tuned = {"vlm": {"train": ["vision", "projector", "lm"], "lr_scale": {"vision": 0.5}}, "epochs": 0.5}
    single = train(load_config(recipe(shapes, tower, tmp_path / "single", **tuned)))
    torchrun(recipe(shapes, tower, tmp_path / strategy, distributed=strategy, **tuned))
    assert losses(tmp_path / strategy) == pytest.approx(losses(tmp_path / "single"), abs=1e-4)
    assert_same_weights(single, tmp_path / strategy / "model", atol=1e-4)


def test_a_sharded_run_resumes_on_the_one_process_trajectory(shapes, tower, tmp_path):
    """FSDP, rewound to a mid-run checkpoint and resumed: the sharded optimiser state comes back exactly."""
    import shutil

    settings = {"vlm": {"train": ["vision", "projector", "lm"], "lr_scale": {"vision": 0.5}}, "checkpoint_every": 3,
                "keep_checkpoints": 10}
    single = train(load_config(recipe(shapes, tower, tmp_path / "single", **settings)))
    run = tmp_path / "fsdp"
    config = recipe(shapes, tower, run, distributed="fsdp", **settings)
    torchrun(config)
    steps = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert steps[0] == "step-00000003" and len(steps) > 1  # the resumed run has steps to retrace
    for later in steps[1:]:
        shutil.rmtree(run / "checkpoints" / later)
    shutil.rmtree(run / "model")
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 3, "checkpoint": steps[0]}))
    out = torchrun(config, "--resume")
    assert "(step 3)" in out.stdout
    assert losses(run) == pytest.approx(losses(tmp_path / "single"), abs=1e-4)
    assert_same_weights(single, run / "model", atol=1e-4)


@pytest.mark.parametrize("lora,precision", [(None, "fp32"), ({"rank": 4, "alpha": 8}, "fp32"),
                                            ({"rank": 4, "alpha": 8}, "bf16-true")])
def test_resume_from_a_checkpoint_ends_where_the_whole_run_does(shapes, tower, tmp_path, lora, precision):
    settings = {"checkpoint_every": 3, "keep_checkpoints": 5, "precision": precision}
    if lora:
        settings["vlm"] = {"train": ["projector"], "lora": lora}
    whole = train(load_config(recipe(shapes, tower, tmp_path / "whole", **settings)))
    partial = tmp_path / "partial"
    train(load_config(recipe(shapes, tower, partial, **settings)))
    pointer = partial / "checkpoints" / "latest.json"
    pointer.write_text(json.dumps({"step": 3, "checkpoint": "step-00000003"}))
    resumed = train(load_config(recipe(shapes, tower, partial, **settings)), resume=True)
    assert_same_weights(whole, resumed, atol=1e-6)
    if lora:  # the adapters alone: the frozen base weights are rebuilt, not stored twice
        from rosetta.train import checkpoint

        kept = checkpoint.load_state(partial / "checkpoints" / "step-00000003")["lora"]
        assert kept and all(".lora_" in k for k in kept)


def test_lora_trains_adapters_and_saves_them_merged(shapes, tower, tmp_path):
    from rosetta.nn.lora import LoRALinear

    cfg = load_config(recipe(shapes, tower, tmp_path / "lora", vlm={"train": ["projector"],
                                                                    "lora": {"rank": 4, "alpha": 8}}))
    from rosetta.train.vlm import VLMTrainer

    trainer = VLMTrainer(cfg)
    adapted = [m for m in trainer.model.lm.modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 2 * 2  # qkv and out of both blocks
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("projector.") or ".lora_" in n for n in trained)
    before = {n: p.detach().clone() for n, p in trainer.model.lm.named_parameters() if ".base." in n}
    final = trainer.fit()
    saved = rosetta.load(final)
    assert not any(isinstance(m, LoRALinear) for m in saved.modules())
    batch = Collate(0)([trainer.dataset[0]])
    with torch.no_grad():
        trainer.model.eval()
        torch.testing.assert_close(saved(batch["ids"], batch["pixels"]),
                                   trainer.model(batch["ids"], batch["pixels"]), atol=1e-5, rtol=0)
    for name, value in trainer.model.lm.named_parameters():
        if ".base." in name:
            assert torch.equal(value, before[name])  # the base weights stayed frozen


def test_parts_train_at_their_own_learning_rates(shapes, tower, tmp_path):
    from rosetta.train.vlm import VLMTrainer

    cfg = load_config(recipe(shapes, tower, tmp_path / "run", lr=1e-3,
                             vlm={"train": ["vision", "projector", "lm"], "lr_scale": {"vision": 0.1}}))
    trainer = VLMTrainer(cfg)
    rates = {id(p): g["initial_lr"] for g in trainer.optimizer.param_groups for p in g["params"]}  # before warmup
    idle = {id(p) for part in trainer.model.idle_vision_parts() for p in part.parameters()}
    assert idle and not idle & set(rates)  # the tower's last block and final norm never reach the projector
    assert all(rates[id(p)] == pytest.approx(1e-4) for p in trainer.model.vision.parameters() if id(p) not in idle)
    assert all(rates[id(p)] == pytest.approx(1e-3) for p in trainer.model.lm.parameters())
    assert len(rates) + len(idle) == sum(1 for _ in trainer.model.parameters())


def test_lora_merges_to_the_same_function():
    from rosetta.nn.lora import add_lora, merge_lora

    torch.manual_seed(0)
    lm = rosetta.create("tiny-lm").eval()
    ids = torch.randint(0, 250, (2, 12))
    reference = lm(ids)
    add_lora(lm, rank=4, alpha=8)
    torch.testing.assert_close(lm(ids), reference)  # B starts at zero
    for name, p in lm.named_parameters():
        if name.endswith("lora_b"):
            torch.nn.init.normal_(p, std=0.1)
    adapted = lm(ids)
    assert not torch.allclose(adapted, reference)
    torch.testing.assert_close(merge_lora(lm)(ids), adapted, atol=1e-5, rtol=0)
    with pytest.raises(RosettaError, match="no linear layer"):
        add_lora(lm, targets=("nothing",))


def test_composing_from_a_saved_language_model_keeps_its_weights_and_adds_the_image_token(shapes, tower, tmp_path):
    import dataclasses

    from rosetta.models.lm import PRESETS
    from rosetta.train.vlm import build_vlm

    torch.manual_seed(1)
    lm = rosetta.create(dataclasses.replace(PRESETS["tiny-lm"], vocab_size=259))  # no row to spare: it grows
    lm.save_pretrained(tmp_path / "lm")
    cfg = load_config(recipe(shapes, tower, tmp_path / "run", tokenizer_vocab=None, model_overrides={},
                             vlm={"language_model": str(tmp_path / "lm")}))
    model = build_vlm(cfg, [])
    image = model.tokenizer.token_id("<image>")
    assert model.config.image_token_id == image == 259 and model.config.text.vocab_size == 260
    state = lm.state_dict()
    for key, value in model.lm.state_dict().items():
        if key in ("embed.weight", "lm_head.weight"):
            torch.testing.assert_close(value[: state[key].shape[0]], state[key])
            torch.testing.assert_close(value[image], state[key].mean(0))
        else:
            torch.testing.assert_close(value, state[key])
    with pytest.raises(RosettaError, match="both"):
        build_vlm(load_config(recipe(shapes, tower, tmp_path / "x", vlm={"language_model": None})), [])


def test_the_tower_runs_at_a_resolution_it_was_not_trained_at(shapes, tower, tmp_path):
    from rosetta.models.encoders import resize_position_embedding
    from rosetta.train.vlm import build_vlm

    model = build_vlm(load_config(recipe(shapes, tower, tmp_path / "run", vlm={"image_size": 48})), ["a question"])
    clip = rosetta.load(tower)
    assert model.config.vision.image_size == 48 and model.config.image_tokens == 36
    assert torch.equal(model.vision.pos_embed[0], clip.vision.pos_embed[0])  # the class token's row is kept
    grid = clip.vision.pos_embed[1:].reshape(4, 4, -1)
    resized = model.vision.pos_embed[1:].reshape(6, 6, -1)
    torch.testing.assert_close(resized.mean((0, 1)), grid.mean((0, 1)), atol=0.02, rtol=0)
    assert isinstance(model.ask(shapes / "images/test/test-000000.png", "Count the shapes."), str)
    flat = torch.ones(17, 8)
    assert torch.equal(resize_position_embedding(flat, True, 4), flat)  # its own grid: unchanged
    torch.testing.assert_close(resize_position_embedding(flat, True, 7), torch.ones(50, 8))


def test_recipe_mistakes_are_one_clear_error(shapes, tower, tmp_path):
    with pytest.raises(RosettaError, match="unknown parts"):
        load_config(recipe(shapes, tower, tmp_path / "a", vlm={"train": ["projector", "head"]}))
    with pytest.raises(RosettaError, match="leave lm out"):
        train(load_config(recipe(shapes, tower, tmp_path / "b", vlm={"lora": {"rank": 2}})))
    with pytest.raises(RosettaError, match="not a contrastive model"):
        rosetta.create("tiny-lm").save_pretrained(tmp_path / "lm")
        train(load_config(recipe(shapes, tower, tmp_path / "c", vlm={"vision_tower": str(tmp_path / "lm")})))


def test_the_llava_recipes_run_as_written(shapes, tower, tmp_path):
    """Stage 1, stage 2 and LoRA from configs/, every setting as written but the model and data (no hub here)."""
    repo = Path(__file__).resolve().parents[1]
    rosetta.create("tiny-lm").save_pretrained(tmp_path / "lm")
    small = ["data.workers=0", "batch_size=16", "epochs=0.2", "warmup_steps=1", "checkpoint_every=0",
             "device=cpu", "precision=fp32", "vlm.pack_length=600"]
    stage1 = train(load_config(repo / "configs" / "vlm-stage1.yaml", [
        f"vlm.vision_tower={tower}", f"vlm.language_model={tmp_path / 'lm'}",
        f"data.train={shapes / 'train.jsonl'}", f"out={tmp_path / 'stage1'}", *small]))
    for name in ("vlm-stage2", "vlm-lora"):
        final = train(load_config(repo / "configs" / f"{name}.yaml", [
            f"model={stage1}", f"data.train={shapes / 'train-conversations.jsonl'}", f"out={tmp_path / name}",
            *small]))
        assert isinstance(rosetta.load(final).ask(shapes / "images/test/test-000001.png", "Count the shapes."), str)


# The built-in questions.

def test_shape_questions_are_answered_by_the_scene(shapes):
    records = {r["key"]: r for r in map(json.loads, (shapes / "test.jsonl").read_text().splitlines())}
    vqa = [json.loads(line) for line in (shapes / "test-vqa.jsonl").read_text().splitlines()]
    pope = [json.loads(line) for line in (shapes / "test-pope.jsonl").read_text().splitlines()]
    assert {q["type"] for q in vqa} == {"colour", "shape", "count", "position"}
    for q in vqa:
        scene = records[q["key"].rsplit("-", 1)[0]]["shapes"]
        answer = q["answers"][0]
        if q["type"] == "colour":
            assert any(s["color"] == answer and s["shape"] in q["question"] for s in scene)
        elif q["type"] == "shape":
            assert any(s["shape"] == answer and s["color"] in q["question"] for s in scene)
        elif q["type"] == "count":
            assert answer == str(len(scene))
    assert sum(p["answer"] == "yes" for p in pope) == len(pope) / 2
    for p in pope:
        scene = records[p["key"].rsplit("-", 1)[0]]["shapes"]
        named = any(f"{s['color']} {s['shape']}" in p["question"] for s in scene)
        assert named == (p["answer"] == "yes")
        if p["answer"] == "no" and p["type"] == "adversarial":
            assert any(s["color"] in p["question"] or s["shape"] in p["question"] for s in scene)
    conversations = [json.loads(line) for line in (shapes / "test-conversations.jsonl").read_text().splitlines()]
    assert len(conversations) == len(records)
    assert all(c["conversations"][0]["value"].startswith("<image>\n") for c in conversations)


def test_the_vlm_quickstart_runs_end_to_end(shapes, tower, tmp_path, monkeypatch):
    """On the tiny shapes and a tiny CLIP in place of the quickstart's (which the default run trains first)."""
    import shutil

    from rosetta.train import quickstart

    out = tmp_path / "qs"
    shutil.copytree(shapes, out / "data")
    shutil.copytree(tower, out / "run" / "model")
    small = quickstart.VLM_RECIPE.read_text().replace("batch_size: 64", "batch_size: 16").replace(
        "workers: 1", "workers: 0").replace("checkpoint_every: 100", "checkpoint_every: 0")
    (tmp_path / "recipe.yaml").write_text(small)
    monkeypatch.setattr(quickstart, "VLM_RECIPE", tmp_path / "recipe.yaml")
    results = quickstart.vlm_quickstart(out, epochs=1)
    assert 0 <= results["vqa"]["accuracy"] <= 1 and 0 <= results["pope"]["yes_ratio"] <= 1
    entries = {e["task"]: e["metrics"] for e in json.loads((out / "vlm-results.json").read_text())}
    assert entries["pope"]["n"] == 32 and entries["vqa"]["n"] == 64  # 16 test images
    assert (out / "vlm" / "model" / "model.safetensors").exists()
