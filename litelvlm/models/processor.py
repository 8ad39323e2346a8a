"""Turn data-set samples into model batches: prompt, token ids, both image branches, target masks.

It runs in the data loader's workers, so the model's forward only does model work.
"""

from __future__ import annotations

import random
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from litelvlm.errors import DataError
from litelvlm.models.batch import IGNORE_INDEX, GroundingBatch
from litelvlm.models.config import LVLMConfig
from litelvlm.models.image_processing import clip_preprocess, sam_preprocess
from litelvlm.models.prompts import (
    IMAGE_PLACEHOLDER,
    GroundingPrompt,
    PromptError,
    build_glamm_prompt,
    build_lisa_prompt,
    build_lisa_training_prompt,
    build_reasonseg_prompt,
)
from litelvlm.models.tokenizer import IMAGE_TOKEN_INDEX, special_token_ids, tokenize_prompt


class ReferringSample(Protocol):
    """What the processor reads of a sample: the fields of `litelvlm.data.samples.ReferringSample`.

    A protocol, so that the models layer never imports the data layer that feeds it.
    """

    index: int
    image_id: str
    image: Image.Image  # RGB
    sentences: list[str]
    sentence_ids: list[str]
    masks: np.ndarray  # bool [T, H, W]
    ignore_masks: np.ndarray | None  # bool [T, H, W]: pixels scored in neither I nor U; None: none
    is_sentence: list[bool] | None  # ReasonSeg's long-query flag per sentence; None: no query kinds


def query_lengths(tokenizer, expressions: list[str], special_tokens: bool) -> list[int]:
    """Tokens of each query, untruncated: the LLM's without special tokens, CLIP's with [SOS] and
    [EOS] (`special_tokens`), so a CLIP length above 77 is a query that overflows the text window."""
    return [len(tokenizer(text, add_special_tokens=special_tokens, verbose=False)["input_ids"]) for text in expressions]


def prompt_labels(tokenizer, prompt: GroundingPrompt, input_ids: list[int]) -> list[int]:
    """Next-token targets of a tokenised prompt (not shifted): a token's id where it belongs to an
    assistant answer or its closing "</s>", IGNORE_INDEX elsewhere.

    A token is an answer token when its character span overlaps an answer span of the prompt; the
    tokenizer's offsets say where each token came from, so the rule holds whatever the tokenizer
    merges (an added token such as " [SEG]" carries the stripped space in its offsets). The ids are
    recomputed chunk by chunk as `tokenize_prompt` does and must match `input_ids`.
    """
    labels, ids, chunk_start = [], [], 0
    bos = tokenizer.bos_token_id
    for number, chunk in enumerate(prompt.text.split(IMAGE_PLACEHOLDER)):
        if number > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
        encoded = tokenizer(chunk, add_special_tokens=True, return_offsets_mapping=True)
        pairs = list(zip(encoded["input_ids"], encoded["offset_mapping"]))
        if number > 0 and bos is not None and pairs[:1] and pairs[0][0] == bos:
            pairs = pairs[1:]
        for token, (start, end) in pairs:
            start, end = start + chunk_start, end + chunk_start
            supervised = end > start and any(start < stop and end > begin for begin, stop in prompt.answer_spans)
            ids.append(token)
            labels.append(token if supervised else IGNORE_INDEX)
        chunk_start += len(chunk) + len(IMAGE_PLACEHOLDER)
    if ids != list(input_ids):
        raise PromptError(f"labelling tokenised the prompt differently from tokenize_prompt: {prompt.text!r}")
    eos = tokenizer.eos_token_id
    closed = sum(1 for label in labels if label == eos)
    if closed != len(prompt.answer_spans):
        raise PromptError(
            f"{len(prompt.answer_spans)} assistant answers but {closed} supervised {tokenizer.eos_token!r} tokens "
            f"in {prompt.text!r}"
        )
    return labels


class GroundingProcessor:
    """Pre-processing for one model: its prompt format, tokenizer and both image branches.

    GLaMM-format models get one multi-round prompt holding all of a sample's sentences; LISA-format
    models get LISA's single-round prompt, so their samples hold one sentence (protocol
    `per-sentence`).

    Evaluation prompts draw their templates from (seed, sample index). Training prompts
    (`training=True`) draw them from (seed, epoch, sample index): reproducible, independent of the
    number of processes, new each epoch; LISA-format models then get LISA's training questions.

    Args:
        config: the model architecture (CLIP and SAM input sizes).
        tokenizer: the LLM tokenizer of the checkpoint.
        seed: seeds the question/answer template choice.
        training: build the training form and its `labels`.
        with_labels: add `labels` (default: when training); evaluation prompts can have them too.
        clip_tokenizer: counts each query's CLIP tokens for the records (None: counted as -1).
    """

    def __init__(
        self,
        config: LVLMConfig,
        tokenizer,
        seed: int = 0,
        training: bool = False,
        with_labels: bool | None = None,
        clip_tokenizer=None,
    ) -> None:
        self.config = config
        self.clip_tokenizer = clip_tokenizer
        self.tokenizer = tokenizer
        self.seed = seed
        self.training = training
        self.with_labels = training if with_labels is None else with_labels
        self.pad_id = special_token_ids(tokenizer).pad

    def for_training(self) -> GroundingProcessor:
        """The same processor in training mode (training prompts, labels)."""
        return GroundingProcessor(
            self.config, self.tokenizer, seed=self.seed, training=True, clip_tokenizer=self.clip_tokenizer
        )

    def __call__(self, sample: ReferringSample, epoch: int = 0) -> dict:
        prompt = self.build_prompt(sample, epoch)
        sam_pixels, resized = sam_preprocess(sample.image, self.config.sam.image_size)
        input_ids = tokenize_prompt(self.tokenizer, prompt.text)
        ignore, is_sentence = getattr(sample, "ignore_masks", None), getattr(sample, "is_sentence", None)
        item = {
            "clip_pixel_values": clip_preprocess(sample.image, self.config.vision.image_size),
            "sam_pixel_values": sam_pixels,
            "sam_resized_size": resized,
            "original_size": (sample.image.height, sample.image.width),
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "questions": prompt.questions,
            "expressions": prompt.expressions,
            "gt_masks": torch.from_numpy(sample.masks),
            "sample_id": sample.index,
            "image_id": sample.image_id,
            "sentence_ids": list(sample.sentence_ids),
            "ignore_masks": None if ignore is None else torch.from_numpy(ignore),
            "is_sentence": None if is_sentence is None else [bool(flag) for flag in is_sentence],
            "query_llm_tokens": query_lengths(self.tokenizer, prompt.expressions, special_tokens=False),
            "query_clip_tokens": (
                query_lengths(self.clip_tokenizer, prompt.expressions, special_tokens=True)
                if self.clip_tokenizer is not None
                else [-1] * prompt.num_masks
            ),
        }
        if self.with_labels:
            item["labels"] = torch.tensor(prompt_labels(self.tokenizer, prompt, input_ids), dtype=torch.long)
        return item

    def build_prompt(self, sample: ReferringSample, epoch: int = 0) -> GroundingPrompt:
        lisa = self.config.protocol == "lisa"
        if lisa and len(sample.sentences) != 1:
            raise DataError(
                f"sample {sample.index} (image {sample.image_id}) holds {len(sample.sentences)} sentences, "
                "but LISA prompts hold one: use data.protocol per-sentence with a LISA model"
            )
        is_sentence = getattr(sample, "is_sentence", None)
        if is_sentence is not None and not self.training:  # ReasonSeg: LISA's form, whatever the model
            if len(sample.sentences) != 1:
                raise DataError(
                    f"sample {sample.index} (image {sample.image_id}) holds {len(sample.sentences)} queries; "
                    "ReasonSeg prompts hold one (protocol lisa-reasonseg or per-sentence)"
                )
            return build_reasonseg_prompt(sample.sentences[0], is_sentence[0])
        if not self.training:
            if lisa:
                return build_lisa_prompt(sample.sentences[0])
            return build_glamm_prompt(sample.sentences, random.Random(f"litelvlm-templates:{self.seed}:{sample.index}"))
        rng = random.Random(f"litelvlm-train-templates:{self.seed}:{epoch}:{sample.index}")
        if lisa:
            return build_lisa_training_prompt(sample.sentences[0], rng)
        return build_glamm_prompt(sample.sentences, rng)

    def collate(self, items: list[dict]) -> GroundingBatch | list[dict]:
        """Stack images, right-pad token ids with the pad id and labels with IGNORE_INDEX; masks stay
        a list (sizes differ).

        Items the data set skipped (skip mode) travel as `skipped` records, and so do the records
        an item carries under `replaced` (training replaces a bad sample by another); a batch of
        only skipped items is just the list of those records.
        """
        skipped = [item["skipped"] for item in items if "skipped" in item]
        items = [item for item in items if "skipped" not in item]
        skipped += [record for item in items for record in item.get("replaced", ())]
        if not items:
            return skipped
        length = max(item["input_ids"].shape[0] for item in items)
        input_ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        with_labels = ["labels" in item for item in items]
        if any(with_labels) and not all(with_labels):
            raise DataError("a batch mixes items with and without labels (training and evaluation items)")
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long) if all(with_labels) else None
        for row, item in enumerate(items):
            n = item["input_ids"].shape[0]
            input_ids[row, :n] = item["input_ids"]
            attention_mask[row, :n] = 1
            if labels is not None:
                labels[row, :n] = item["labels"]
        return GroundingBatch(
            clip_pixel_values=torch.stack([item["clip_pixel_values"] for item in items]),
            sam_pixel_values=torch.stack([item["sam_pixel_values"] for item in items]),
            sam_resized_sizes=torch.tensor([item["sam_resized_size"] for item in items], dtype=torch.long),
            original_sizes=torch.tensor([item["original_size"] for item in items], dtype=torch.long),
            input_ids=input_ids,
            attention_mask=attention_mask,
            questions=[item["questions"] for item in items],
            expressions=[item["expressions"] for item in items],
            gt_masks=[item["gt_masks"] for item in items],
            sample_ids=torch.tensor([item["sample_id"] for item in items], dtype=torch.long),
            image_ids=[item["image_id"] for item in items],
            sentence_ids=[item["sentence_ids"] for item in items],
            ignore_masks=[item.get("ignore_masks") for item in items],
            is_sentence=[item.get("is_sentence") for item in items],
            query_llm_tokens=[item.get("query_llm_tokens", []) for item in items],
            query_clip_tokens=[item.get("query_clip_tokens", []) for item in items],
            skipped=skipped,
            labels=labels,
        )

    def process_and_collate(self, samples: list[ReferringSample], epoch: int = 0) -> GroundingBatch:
        return self.collate([self(sample, epoch) for sample in samples])
