"""Turn data-set samples into model batches: prompt, token ids, both image branches, target masks.

It runs in the data loader's workers, so the model's forward only does model work.
"""

from __future__ import annotations

import random

import torch

from litelvlm.data.samples import ReferringSample
from litelvlm.models.batch import GroundingBatch
from litelvlm.models.config import LVLMConfig
from litelvlm.models.image_processing import clip_preprocess, sam_preprocess
from litelvlm.errors import DataError
from litelvlm.models.prompts import GroundingPrompt, build_glamm_prompt, build_lisa_prompt
from litelvlm.models.tokenizer import special_token_ids, tokenize_prompt


class GroundingProcessor:
    """Pre-processing for one model: its prompt format, tokenizer and both image branches.

    GLaMM-format models get one multi-round prompt holding all of a sample's sentences; LISA-format
    models get LISA's single-round prompt, so their samples hold one sentence (protocol
    `per-sentence`).

    Args:
        config: the model architecture (CLIP and SAM input sizes).
        tokenizer: the LLM tokenizer of the checkpoint.
        seed: seeds the question/answer template choice; sample i always draws from (seed, i).
    """

    def __init__(self, config: LVLMConfig, tokenizer, seed: int = 0) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.seed = seed
        self.pad_id = special_token_ids(tokenizer).pad

    def __call__(self, sample: ReferringSample) -> dict:
        prompt = self.build_prompt(sample)
        sam_pixels, resized = sam_preprocess(sample.image, self.config.sam.image_size)
        return {
            "clip_pixel_values": clip_preprocess(sample.image, self.config.vision.image_size),
            "sam_pixel_values": sam_pixels,
            "sam_resized_size": resized,
            "original_size": (sample.image.height, sample.image.width),
            "input_ids": torch.tensor(tokenize_prompt(self.tokenizer, prompt.text), dtype=torch.long),
            "questions": prompt.questions,
            "expressions": prompt.expressions,
            "gt_masks": torch.from_numpy(sample.masks),
            "sample_id": sample.index,
            "image_id": sample.image_id,
            "sentence_ids": list(sample.sentence_ids),
        }

    def build_prompt(self, sample: ReferringSample) -> GroundingPrompt:
        if self.config.protocol == "lisa":
            if len(sample.sentences) != 1:
                raise DataError(
                    f"sample {sample.index} (image {sample.image_id}) holds {len(sample.sentences)} sentences, "
                    "but LISA prompts hold one: evaluate LISA with data.protocol per-sentence"
                )
            return build_lisa_prompt(sample.sentences[0])
        rng = random.Random(f"litelvlm-templates:{self.seed}:{sample.index}")
        return build_glamm_prompt(sample.sentences, rng)

    def collate(self, items: list[dict]) -> GroundingBatch | list[dict]:
        """Stack images, right-pad token ids with the pad id; masks stay a list (sizes differ).

        Items the data set skipped (skip mode) travel as `skipped` records; a batch of only
        skipped items is just the list of those records.
        """
        skipped = [item["skipped"] for item in items if "skipped" in item]
        items = [item for item in items if "skipped" not in item]
        if not items:
            return skipped
        length = max(item["input_ids"].shape[0] for item in items)
        input_ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = item["input_ids"].shape[0]
            input_ids[row, :n] = item["input_ids"]
            attention_mask[row, :n] = 1
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
            skipped=skipped,
        )

    def process_and_collate(self, samples: list[ReferringSample]) -> GroundingBatch:
        return self.collate([self(sample) for sample in samples])
