"""Training data for `fit`: prompts and labels, per-epoch draws, the training sampler, the splits."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from litelvlm.data.datamodule import ReferringDataModule
from litelvlm.data.refcoco_parquet import MissingSplitError, ReferringImageDataset
from litelvlm.data.sampler import EpochShuffledSampler
from litelvlm.data.sources import open_referring_dataset
from litelvlm.data.synthetic import ensure_demo_data, generate_synthetic_refcoco
from litelvlm.data.training import TrainingDataset, draw_training_sentences
from litelvlm.errors import DataError
from litelvlm.models.batch import IGNORE_INDEX
from litelvlm.models.processor import GroundingProcessor, prompt_labels
from litelvlm.models.prompts import ASSISTANT_SEPARATOR, LISA_TRAINING_QUESTIONS, SEG_ANSWERS, SEG_QUESTIONS
from litelvlm.models.tokenizer import IMAGE_TOKEN_INDEX, tokenize_prompt
from test_data_original import REFCOCO_REFS, coco_name, ref, sentence, write_original_layout


@pytest.fixture(scope="module")
def demo_fit():
    data = ReferringDataModule(batch_size=2, seed=5)
    data.setup("fit")
    return data


def _supervised_runs(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of supervised label ids."""
    runs, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs


def _sample_and_prompt(dataset: TrainingDataset, index: int, epoch: int):
    sample = dataset.samples.load(index, dataset.positions(index, epoch))
    return sample, dataset.processor.build_prompt(sample, epoch)


def _prompt_only(dataset: TrainingDataset, index: int, epoch: int):
    """The training prompt of (index, epoch) without decoding the image (prompts need sentences only)."""
    record_index, _ = dataset.samples.items[index]
    pool = dataset.samples.records[record_index].pooled_sentences()
    sentences = [pool[position][0] for position in dataset.positions(index, epoch)]
    return dataset.processor.build_prompt(SimpleNamespace(index=index, image_id="", sentences=sentences), epoch)


def test_labels_supervise_exactly_each_answer_and_its_closing_eos(demo_fit):
    dataset, tokenizer = demo_fit.train_dataset, demo_fit.processor.tokenizer
    for index in range(6):
        item = dataset[(index, 0)]
        _, prompt = _sample_and_prompt(dataset, index, 0)
        input_ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        assert len(labels) == len(input_ids)
        answers = [prompt.text[start:end] for start, end in prompt.answer_spans]
        assert len(answers) == prompt.num_masks == len(item["gt_masks"])
        for answer in answers:  # the spans are the assistant messages with their "</s>"
            assert answer.endswith(ASSISTANT_SEPARATOR) and answer[: -len(ASSISTANT_SEPARATOR)] in SEG_ANSWERS
        runs = _supervised_runs(labels)
        assert runs == [tokenizer(answer, add_special_tokens=False)["input_ids"] for answer in answers]
        assert [tokenizer.decode(run).replace(" ", "") for run in runs] == [a.replace(" ", "") for a in answers]
        # Not shifted: a supervised label is the token at its own position; all else is ignored.
        for token, label in zip(input_ids, labels):
            assert label in (token, IGNORE_INDEX)
        assert labels[0] == IGNORE_INDEX and labels[input_ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX
        assert sum(label == tokenizer.eos_token_id for label in labels) == len(answers)


def test_labels_match_the_references_length_rule(demo_fit):
    """GLaMM's `_process_conversation`, restated: split the prompt at "</s>"; per round, the
    instruction ("... ASSISTANT: ") minus 2 tokens is ignored, round length = its tokens with BOS."""
    dataset, tokenizer = demo_fit.train_dataset, demo_fit.processor.tokenizer
    separator = " ASSISTANT: "
    for index in range(len(dataset)):
        for epoch in (0, 1):
            prompt = _prompt_only(dataset, index, epoch)
            input_ids = tokenize_prompt(tokenizer, prompt.text)
            labels = torch.tensor(prompt_labels(tokenizer, prompt, input_ids))
            supervised = [True] * len(input_ids)
            supervised[0] = False
            position = 1
            for round_text in prompt.text.split(ASSISTANT_SEPARATOR)[:-1]:
                instruction, _ = round_text.split(separator)
                instruction_length = len(tokenize_prompt(tokenizer, instruction + separator)) - 2
                supervised[position : position + instruction_length] = [False] * instruction_length
                position += len(tokenize_prompt(tokenizer, round_text))
            assert position == len(supervised)
            assert (labels != IGNORE_INDEX).tolist() == supervised


def test_training_batches_pad_labels_with_ignore_and_eval_batches_have_none(demo_fit):
    batch = next(iter(demo_fit.train_dataloader()))
    assert batch.labels is not None and batch.labels.shape == batch.input_ids.shape
    assert batch.labels.dtype == torch.long
    assert (batch.labels[batch.attention_mask == 0] == IGNORE_INDEX).all()
    assert (batch.attention_mask == 0).any()  # the two prompts differ in length: padding was checked
    assert next(iter(demo_fit.val_dataloader())).labels is None
    # Evaluation prompts can be labelled on request.
    processor = GroundingProcessor(demo_fit.processor.config, demo_fit.processor.tokenizer, with_labels=True)
    item = processor(demo_fit.samples[0])
    assert len(_supervised_runs(item["labels"].tolist())) == len(demo_fit.samples[0].sentences)


def test_draws_depend_on_seed_epoch_and_index_only(demo_fit):
    dataset = demo_fit.train_dataset
    keys = [(index, epoch) for index in (3, 0, 7) for epoch in (0, 2)]
    again = ReferringDataModule(batch_size=2, seed=5)
    again.setup("fit")
    reversed_order = {key: again.train_dataset[key] for key in reversed(keys)}
    for key in keys:  # another instance, other access order (as another rank or worker): same item
        item = dataset[key]
        assert torch.equal(item["input_ids"], reversed_order[key]["input_ids"])
        assert item["sentence_ids"] == reversed_order[key]["sentence_ids"]
    other_seed = ReferringDataModule(batch_size=2, seed=6)
    other_seed.setup("fit")
    assert any(
        not torch.equal(dataset[(index, 0)]["input_ids"], other_seed.train_dataset[(index, 0)]["input_ids"])
        for index in range(len(dataset))
    )


def test_a_new_epoch_redraws_sentences_and_templates(demo_fit):
    dataset = demo_fit.train_dataset
    redrawn_sentences = redrawn_templates = 0
    for index in range(len(dataset)):
        if dataset.positions(index, 0) != dataset.positions(index, 1):
            redrawn_sentences += 1
        first = _prompt_only(dataset, index, 0)
        sample = SimpleNamespace(index=index, image_id="", sentences=first.expressions)
        second = dataset.processor.build_prompt(sample, 1)  # same sentences, next epoch's templates
        assert first.expressions == second.expressions
        redrawn_templates += first.text != second.text
        for question, expression in zip(first.questions, first.expressions):
            assert any(question == template.format(class_name=expression) for template in SEG_QUESTIONS)
    many = sum(dataset.samples.records[r].num_sentences > 3 for r, _ in dataset.samples.items)
    assert many > 0 and redrawn_sentences > 0
    assert redrawn_templates > len(dataset) // 2


def test_sentence_draw_keeps_all_when_few_and_draws_distinct_ones_when_many():
    assert draw_training_sentences(2, 3, seed=0, epoch=4, index=1) == [0, 1]
    assert draw_training_sentences(7, None, seed=0, epoch=4, index=1) == list(range(7))
    draws = {tuple(draw_training_sentences(7, 3, seed=0, epoch=epoch, index=1)) for epoch in range(10)}
    assert all(len(set(draw)) == 3 and set(draw) <= set(range(7)) for draw in draws)
    assert len(draws) > 1


def test_lisa_format_trains_one_sentence_per_single_round_prompt(demo_fit):
    config = replace(demo_fit.processor.config, protocol="lisa")
    processor = GroundingProcessor(config, demo_fit.processor.tokenizer, seed=0, training=True)
    samples = open_referring_dataset(ensure_demo_data(), split="train", protocol="per-sentence")
    dataset = TrainingDataset(samples, processor, max_sentences=3)
    assert len(dataset) == sum(record.num_sentences for record in samples.records)
    item = dataset[(4, 1)]
    _, prompt = _sample_and_prompt(dataset, 4, 1)
    assert prompt.text.count("USER:") == 1 and "<im_start><image><im_end>\n" + prompt.questions[0] in prompt.text
    assert any(prompt.questions[0] == t.format(class_name=prompt.expressions[0]) for t in LISA_TRAINING_QUESTIONS)
    assert dataset.positions(4, 0) == dataset.positions(4, 1) == samples.items[4][1]
    runs = _supervised_runs(item["labels"].tolist())
    answer = prompt.text[slice(*prompt.answer_spans[0])]
    assert runs == [demo_fit.processor.tokenizer(answer, add_special_tokens=False)["input_ids"]]


# --- the training sampler -----------------------------------------------------------------------


class _Sized(Dataset):
    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        return torch.tensor(key)


@pytest.mark.parametrize("length", [7, 8])
def test_two_ranks_get_equal_shards_that_cover_every_index(length):
    shards = []
    for rank in range(2):
        sampler = EpochShuffledSampler(_Sized(length), num_replicas=2, rank=rank, seed=3)
        sampler.set_epoch(2)
        pairs = list(sampler)
        assert len(pairs) == len(sampler) == -(-length // 2)
        assert {epoch for _, epoch in pairs} == {2}
        shards.append([index for index, _ in pairs])
        # Same number of batches on every rank: DDP needs it to not hang.
        assert len(DataLoader(_Sized(length), batch_size=3, sampler=sampler)) == -(-len(pairs) // 3)
    counts = Counter(shards[0] + shards[1])
    assert sorted(counts) == list(range(length))
    assert sum(counts.values()) - length == (-length) % 2  # only the padding repeats an index
    if length % 2 == 0:
        assert not set(shards[0]) & set(shards[1])


def test_the_order_is_seeded_per_epoch():
    def order(seed, epoch):
        sampler = EpochShuffledSampler(_Sized(20), seed=seed)
        sampler.set_epoch(epoch)
        return [index for index, _ in sampler]

    assert order(0, 1) == order(0, 1)
    assert sorted(order(0, 1)) == list(range(20))
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)


class _EpochRecorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_index):
        self.seen.append((self.current_epoch, batch[:, 1].tolist()))
        return (self.weight * batch[:, 0].float()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_keeps_the_sampler_and_tells_it_the_epoch(tmp_path):
    loader = DataLoader(_Sized(5), batch_size=2, sampler=EpochShuffledSampler(_Sized(5), seed=0))
    module = _EpochRecorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=loader)
    assert isinstance(trainer.train_dataloader.sampler, EpochShuffledSampler)
    assert [(epoch, sorted(set(epochs))) for epoch, epochs in module.seen] == [
        (epoch, [epoch]) for epoch in range(3) for _ in range(3)
    ]


def test_lightning_would_not_swap_in_its_sampler_under_ddp():
    from lightning.pytorch.trainer.connectors.data_connector import _DataConnector

    fake_trainer = SimpleNamespace(
        _accelerator_connector=SimpleNamespace(use_distributed_sampler=True, is_distributed=True)
    )
    connector = _DataConnector(fake_trainer)
    sampler = EpochShuffledSampler(_Sized(5), num_replicas=2, rank=1)
    assert not connector._requires_distributed_sampler(DataLoader(_Sized(5), sampler=sampler))
    assert connector._requires_distributed_sampler(DataLoader(_Sized(5)))  # control


# --- the splits ---------------------------------------------------------------------------------


def test_the_synthetic_demo_set_has_a_train_split_of_its_own():
    folder = ensure_demo_data()
    train = ReferringImageDataset(folder, split="train")
    val = ReferringImageDataset(folder, split="val")
    assert len(train) == 32
    assert {r.image_id for r in train.records}.isdisjoint({r.image_id for r in val.records})
    sample = train[0]
    assert sample.masks.shape[0] == len(sample.sentences) and sample.masks.any()


def _train_refs():
    return REFCOCO_REFS + [
        ref(10, 201, 2, "train", sentence("two train squares", 100), sentence("the train pair", 101)),
        ref(11, 202, 2, "train", sentence("the train bar", 110)),
    ]


def test_fit_reads_the_train_split_of_the_original_layout(tmp_path):
    root = write_original_layout(tmp_path / "data", refs=_train_refs())
    data = ReferringDataModule(data_dir=str(root), dataset="refcoco", batch_size=2, split="val")
    batch = next(iter(data.train_dataloader()))
    assert len(data.train_dataset) == 2 and batch.batch_size == 2
    train_sentences = {"a train sentence", "two train squares", "the train pair", "the train bar"}
    assert {e for expressions in batch.expressions for e in expressions} <= train_sentences
    assert sorted(len(expressions) for expressions in batch.expressions) == [1, 3]
    assert batch.labels is not None and [m.shape[0] for m in batch.gt_masks] == [len(e) for e in batch.expressions]
    # `dataset/split` names the data set too, as `splits` entries do.
    named = ReferringDataModule(data_dir=str(root), train_split="refcoco/train", splits=["refcoco/val"])
    named.setup("fit")
    assert len(named.train_dataset) == 2


def test_a_missing_train_split_is_a_clear_error(tmp_path):
    root = write_original_layout(tmp_path / "original", refs=[r for r in REFCOCO_REFS if r["split"] != "train"])
    with pytest.raises(DataError, match=r"no ref in split 'train'; its splits: \['testA', 'val'\]"):
        ReferringDataModule(data_dir=str(root), dataset="refcoco").setup("fit")
    parquet = generate_synthetic_refcoco(tmp_path / "parquet", num_images=1, seed=0, split="val")
    with pytest.raises(MissingSplitError, match=r"split 'train'.*data/val-00000-of-00001\.parquet"):
        ReferringDataModule(data_dir=str(parquet)).setup("fit")
    assert issubclass(MissingSplitError, DataError) and issubclass(MissingSplitError, FileNotFoundError)


def test_a_bad_training_image_raises_or_is_replaced_in_skip_mode(tmp_path):
    root = write_original_layout(tmp_path / "data", refs=_train_refs())
    (root / "coco_2014" / "train2014" / coco_name(1)).write_bytes(b"not a jpeg")  # image of train item 0
    with pytest.raises(DataError, match=coco_name(1)):
        ReferringDataModule(data_dir=str(root), dataset="refcoco").train_dataloader().dataset[(0, 0)]
    data = ReferringDataModule(data_dir=str(root), dataset="refcoco", on_error="skip", batch_size=2)
    item = data.train_dataloader().dataset[(0, 0)]
    assert item["sample_id"] == 1 and item["replaced"][0]["index"] == 0
    assert coco_name(1) in item["replaced"][0]["reason"]
    batch = data.train_dataset.processor.collate([item, data.train_dataset[(1, 0)]])
    assert batch.batch_size == 2 and [record["index"] for record in batch.skipped] == [0]
