"""The data module: evaluation protocols, sharding across processes, skip mode, LISA prompts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from litelvlm.data.datamodule import ReferringDataModule
from litelvlm.data.records import protocol_items
from litelvlm.data.sampler import UnpaddedDistributedSampler
from litelvlm.data.synthetic import generate_synthetic_refcoco
from litelvlm.errors import DataError
from test_data_original import coco_name, write_original_layout


@pytest.fixture(scope="module")
def parquet_folder(tmp_path_factory):
    return str(generate_synthetic_refcoco(tmp_path_factory.mktemp("synthetic"), num_images=5, seed=3))


def items_of(data: ReferringDataModule, rank: int = 0, world_size: int = 1) -> list[tuple]:
    """(sample id, sentences, prompt ids) of every item a rank sees, in order."""
    data.trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
    seen = []
    for batch in data.val_dataloader():
        for row, sample_id in enumerate(batch.sample_ids.tolist()):
            ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
            seen.append((sample_id, tuple(batch.expressions[row]), tuple(ids)))
    return seen


@pytest.mark.parametrize("protocol", ["glamm", "per-sentence", "all-sentences"])
def test_each_protocol_gives_the_same_items_on_two_runs_and_across_one_and_two_processes(parquet_folder, protocol):
    def module():
        return ReferringDataModule(data_dir=parquet_folder, protocol=protocol, batch_size=2, seed=7)

    single = items_of(module())
    assert single == items_of(module())
    ranks = [items_of(module(), rank, 2) for rank in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(single)
    assert len({sample_id for sample_id, _, _ in single}) == len(single)


def test_protocols_cover_the_sentences_as_documented(parquet_folder):
    data = ReferringDataModule(data_dir=parquet_folder, seed=7)
    data.setup()
    records = data.samples.records
    counts = [record.num_sentences for record in records]
    glamm = protocol_items(records, "glamm", 3, seed=7)
    assert [index for index, _ in glamm] == list(range(len(records)))
    assert [len(positions) for _, positions in glamm] == [min(3, count) for count in counts]
    assert all(len(set(positions)) == len(positions) for _, positions in glamm)
    per_sentence = protocol_items(records, "per-sentence", 3, seed=7)
    assert len(per_sentence) == sum(counts) and all(len(p) == 1 for _, p in per_sentence)
    every = protocol_items(records, "all-sentences", 2, seed=7)
    for index, count in enumerate(counts):
        positions = [p for record_index, chunk in every if record_index == index for p in chunk]
        assert positions == list(range(count))  # every sentence once, in order
    assert max(len(chunk) for _, chunk in every) <= 2
    with pytest.raises(DataError, match="unknown evaluation protocol"):
        protocol_items(records, "lisa", 3, seed=0)


def test_glamm_prompt_holds_one_seg_per_sentence_and_the_sentinel_once(parquet_folder):
    data = ReferringDataModule(data_dir=parquet_folder, batch_size=5)
    data.setup()
    batch = next(iter(data.val_dataloader()))
    seg_id = data.processor.tokenizer.convert_tokens_to_ids("[SEG]")
    for row, masks in enumerate(batch.gt_masks):
        ids = batch.input_ids[row]
        assert int((ids == seg_id).sum()) == masks.shape[0] == len(batch.questions[row])
        assert int((ids == -200).sum()) == 1


def test_lisa_prompts_hold_one_sentence_and_refuse_more(parquet_folder):
    from dataclasses import replace

    data = ReferringDataModule(data_dir=parquet_folder, protocol="per-sentence", batch_size=1)
    data.setup()
    data.processor.config = replace(data.processor.config, protocol="lisa")
    sample = data.samples[0]
    item = data.processor(sample)
    assert item["questions"][0].startswith("What is ") and "Please output segmentation mask." in item["questions"][0]
    assert int((item["input_ids"] == -200).sum()) == 1
    multi = ReferringDataModule(data_dir=parquet_folder, protocol="glamm")
    multi.setup()
    sample = next(s for s in (multi.samples[i] for i in range(len(multi.samples))) if len(s.sentences) > 1)
    with pytest.raises(DataError, match="per-sentence"):
        data.processor(sample)


def test_skip_mode_reports_load_time_skips_in_batches_and_index_time_skips_on_the_module(tmp_path):
    root = write_original_layout(tmp_path / "data")
    (root / "coco_2014" / "train2014" / coco_name(1)).write_bytes(b"not a jpeg")  # unreadable at load time
    data = ReferringDataModule(data_dir=str(root), dataset="refcoco", on_error="skip", batch_size=1)
    data.setup()
    assert data.skipped == []  # nothing wrong in the annotations
    skipped, scored = [], 0
    for batch in data.val_dataloader():
        if isinstance(batch, list):
            skipped.extend(batch)
        else:
            skipped.extend(batch.skipped)
            scored += batch.batch_size
    assert scored == len(data.dataset) - 1
    assert len(skipped) == 1 and coco_name(1) in skipped[0]["file"] and skipped[0]["stage"] == "load"
    raising = ReferringDataModule(data_dir=str(root), dataset="refcoco", batch_size=1)
    raising.setup()
    with pytest.raises(DataError, match=coco_name(1)):
        list(raising.val_dataloader())


def test_bad_data_module_arguments_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="protocol"):
        ReferringDataModule(protocol="every")
    with pytest.raises(DataError, match="batch_size"):
        ReferringDataModule(batch_size=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ReferringDataModule(data_dir=str(tmp_path / "missing")).setup()


def test_unpadded_sampler_is_used_under_several_processes(parquet_folder):
    data = ReferringDataModule(data_dir=parquet_folder)
    data.setup()
    data.trainer = SimpleNamespace(world_size=2, global_rank=1)
    loader = data.val_dataloader()
    assert isinstance(loader.sampler, UnpaddedDistributedSampler)
    assert list(loader.sampler) == list(range(1, len(data.dataset), 2))
    assert torch.is_tensor(next(iter(loader)).sample_ids)


def test_a_split_with_fewer_items_than_processes_is_refused_instead_of_hanging(parquet_folder):
    """A process with no item skips the epoch and never joins the others' sync: say so up front."""
    data = ReferringDataModule(data_dir=parquet_folder)  # 5 images, glamm protocol: 5 items
    data.setup()
    data.trainer = SimpleNamespace(world_size=5, global_rank=4)
    assert len(list(data.val_dataloader().sampler)) == 1  # exactly as many processes as items: fine
    data.trainer = SimpleNamespace(world_size=6, global_rank=0)
    with pytest.raises(DataError, match=r"split val has 5 items, fewer than the 6 processes.*--trainer.devices 5"):
        data.val_dataloader()
