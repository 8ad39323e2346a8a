"""LLM and CLIP-text tokenisation, reproducing what the references' transformers 4.28-4.31 produced.

The references' slow LLaMA tokenizer split the text at every added token, stripped the whitespace
around it and encoded each remaining chunk with SentencePiece on its own (each chunk gets the dummy
prefix "▁"). transformers 5 has no slow LLaMA tokenizer (`use_fast` is ignored); `load_llm_tokenizer`
configures the tokenizers-backed one so that it gives the same ids (see docs/models.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, normalizers
from transformers import CLIPTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

from litelvlm.errors import LitelvlmError
from litelvlm.models.prompts import IM_END, IM_START, IMAGE_PLACEHOLDER, SEG_TOKEN

IMAGE_TOKEN_INDEX = -200  # sentinel where the visual features are spliced in
IMAGE_PATCH_TOKEN = "<im_patch>"  # LLaVA v1 lineage (LISA) only


class TokenizerError(LitelvlmError):
    """A tokenizer folder or tokenizer lacks what the models need."""


def _require_folder(folder: str | Path, what: str, required_any: tuple[tuple[str, ...], ...]) -> Path:
    """Check the folder exists and holds, for each group, at least one of the named files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(f"{what} folder {folder} does not exist")
    for names in required_any:
        if not any((folder / name).is_file() for name in names):
            raise TokenizerError(f"{what} folder {folder} has no {' or '.join(names)}")
    return folder


def _read_added_token_ids(folder: Path, base_vocab_size: int) -> dict[str, int]:
    """Added tokens (beyond the SentencePiece vocabulary) and their ids, from added_tokens.json and
    tokenizer_config.json's added_tokens_decoder (older folders have only the first)."""
    found: dict[str, int] = {}
    sources = []
    if (folder / "added_tokens.json").is_file():
        sources.append(json.loads((folder / "added_tokens.json").read_text(encoding="utf-8")).items())
    if (folder / "tokenizer_config.json").is_file():
        decoder = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        decoder = decoder.get("added_tokens_decoder") or {}
        sources.append((entry["content"], index) for index, entry in decoder.items())
    for source in sources:
        for content, index in source:
            index = int(index)
            if index < base_vocab_size:
                continue  # a base piece such as <unk>, <s>, </s>
            if found.setdefault(content, index) != index:
                raise TokenizerError(f"{folder}: added token {content!r} has ids {found[content]} and {index}")
    return dict(sorted(found.items(), key=lambda item: item[1]))


def _check_llama_kind(model_path: Path) -> int:
    """The rule holds for LLaMA's normaliser (identity, dummy prefix, whitespace kept); return the vocab size."""
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_path.read_bytes())
    except Exception as error:  # protobuf's DecodeError
        raise TokenizerError(f"{model_path} is not a SentencePiece model: {error}") from None
    spec = proto.normalizer_spec
    if spec.name not in ("identity", "") or spec.remove_extra_whitespaces or not spec.add_dummy_prefix:
        raise TokenizerError(
            f"{model_path} is not a LLaMA-kind SentencePiece model (normaliser {spec.name!r}, "
            f"remove_extra_whitespaces={spec.remove_extra_whitespaces}, add_dummy_prefix={spec.add_dummy_prefix})"
        )
    return len(proto.pieces)


def _base_special_tokens(tokenizer) -> list[str]:
    """<unk>, <s>, </s>: pieces of the SentencePiece model, never stripped (4.28 wrapped them so)."""
    tokens = (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token)
    return list(dict.fromkeys(str(token) for token in tokens if token is not None))


def load_llm_tokenizer(folder: str | Path, model_max_length: int | None = None) -> LlamaTokenizer:
    """The LLaMA tokenizer of a checkpoint folder, tokenising as the references did.

    Padding on the right with the unk token as pad. Every added token of the folder is re-registered
    as AddedToken(lstrip=True, rstrip=True, normalized=False, special=True) with the id the files give
    it; <unk>, <s>, </s> split the text but strip nothing, as in 4.28. The backend normaliser is set
    to SentencePiece's own (prepend "▁", spaces to "▁"): every chunk between added tokens then gets
    its dummy prefix even when it starts with whitespace, which the default Metaspace skips. Tokens
    must therefore be matched on the raw text (normalized=False), whatever the files say.
    """
    folder = _require_folder(folder, "LLM tokenizer", (("tokenizer.model",),))
    base_vocab_size = _check_llama_kind(folder / "tokenizer.model")
    added_ids = _read_added_token_ids(folder, base_vocab_size)
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    tokenizer = LlamaTokenizer.from_pretrained(str(folder), legacy=True, **extra)
    base_specials = {token: tokenizer.convert_tokens_to_ids(token) for token in _base_special_tokens(tokenizer)}
    tokenizer.add_tokens(
        [AddedToken(token, lstrip=False, rstrip=False, normalized=False, special=True) for token in base_specials]
        + [AddedToken(token, lstrip=True, rstrip=True, normalized=False, special=True) for token in added_ids],
        special_tokens=True,
    )
    vocab = tokenizer.get_vocab()
    moved = [token for token, index in base_specials.items() if vocab.get(token) != index]
    if moved:
        raise TokenizerError(f"{folder}: special tokens {moved} changed id when re-registered")
    wrong = {token: (index, vocab.get(token)) for token, index in added_ids.items() if vocab.get(token) != index}
    if wrong:
        detail = ", ".join(f"{token!r} file id {want}, tokenizer id {got}" for token, (want, got) in wrong.items())
        raise TokenizerError(f"{folder}: added tokens do not keep the ids of the files ({detail})")
    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the tokens the model code needs, read from the tokenizer because checkpoints differ."""

    seg: int
    im_start: int
    im_end: int
    pad: int
    bos: int
    eos: int
    image_patch: int | None = None  # only LLaVA v1 lineage (LISA) has <im_patch>


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialTokenIds:
    """Look up [SEG], <im_start>, <im_end>, pad, BOS and EOS; name every one that is missing."""
    vocab = tokenizer.get_vocab()
    named = {"seg": SEG_TOKEN, "im_start": IM_START, "im_end": IM_END}
    ids = {field: vocab.get(token) for field, token in named.items()}
    ids.update(pad=tokenizer.pad_token_id, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id)
    missing = [named.get(field, f"{field} token") for field, index in ids.items() if index is None]
    if missing:
        source = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise TokenizerError(f"tokenizer {source} has no {', '.join(missing)}")
    return SpecialTokenIds(**ids, image_patch=vocab.get(IMAGE_PATCH_TOKEN))


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt_text: str) -> list[int]:
    """Token ids of a prompt with IMAGE_TOKEN_INDEX where "<image>" was.

    As the references' tokenizer_image_token: each chunk between "<image>"s is tokenised on its
    own, only the first keeps its BOS.
    """
    chunks = [tokenizer(chunk, add_special_tokens=True)["input_ids"] for chunk in prompt_text.split(IMAGE_PLACEHOLDER)]
    bos = tokenizer.bos_token_id
    drop_bos = bos is not None and chunks[0][:1] == [bos]
    input_ids = list(chunks[0])
    for chunk in chunks[1:]:
        input_ids.append(IMAGE_TOKEN_INDEX)
        input_ids.extend(chunk[1:] if drop_bos and chunk[:1] == [bos] else chunk)
    return input_ids


def load_clip_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """The CLIP text tokenizer of a CLIP checkpoint folder (tokenizer.json, or vocab.json + merges.txt)."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        _require_folder(folder, "CLIP tokenizer", (("vocab.json",), ("merges.txt",)))
    return CLIPTokenizer.from_pretrained(str(folder))


TEXT_OVERFLOWS: tuple[str, ...] = ("truncate", "chunk")


def clip_token_ids(clip_tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Each text's CLIP token ids with [SOS] and [EOS], never truncated (`len` is its length in CLIP tokens)."""
    return clip_tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]


def fit_clip_window(ids: list[int], max_length: int, overflow: str) -> list[list[int]]:
    """The rows one text becomes in a `max_length`-token window.

    `truncate`: one row, the first `max_length - 1` tokens and the [EOS] (what the tokenizer's
    `truncation=True` gives). `chunk`: consecutive `max_length`-token pieces, the last one shorter;
    the first keeps [SOS], the last [EOS], and no piece gets new ones (CDPruner's rule, docs/pruners.md).
    """
    if overflow not in TEXT_OVERFLOWS:
        raise TokenizerError(f"text_overflow must be 'truncate' or 'chunk', got {overflow!r}")
    if len(ids) <= max_length:
        return [list(ids)]
    if overflow == "truncate":
        return [list(ids[: max_length - 1]) + [ids[-1]]]
    return [list(ids[start : start + max_length]) for start in range(0, len(ids), max_length)]


def tokenize_questions(
    clip_tokenizer: PreTrainedTokenizerBase, questions: list[list[str]], max_length: int = 77, overflow: str = "truncate"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenise each sample's questions for the CLIP text tower, padded to [B, T, L].

    A question longer than `max_length` tokens is truncated or cut into chunks (`overflow`, see
    `fit_clip_window`); each chunk is a slot of its own. T is the most slots of any sample, L the
    longest row (at most `max_length`). Empty slots hold pad ids and attend only to their first
    position, so the text tower stays finite; `text_mask` [B, T] says which slots are real.
    """
    if not questions:
        raise TokenizerError("tokenize_questions got an empty batch")
    flat = [question for sample in questions for question in sample]
    if not flat:
        raise TokenizerError("tokenize_questions got no question in any sample")
    if clip_tokenizer.pad_token_id is None:
        raise TokenizerError("the CLIP tokenizer has no pad token")
    token_ids = iter(clip_token_ids(clip_tokenizer, flat))
    rows = [[row for _ in sample for row in fit_clip_window(next(token_ids), max_length, overflow)] for sample in questions]
    batch_size, slots = len(questions), max(len(sample_rows) for sample_rows in rows)
    length = max(len(row) for sample_rows in rows for row in sample_rows)
    input_ids = torch.full((batch_size, slots, length), clip_tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, slots, length), dtype=torch.long)
    attention_mask[:, :, 0] = 1
    text_mask = torch.zeros((batch_size, slots), dtype=torch.bool)
    for sample_index, sample_rows in enumerate(rows):
        for slot, row in enumerate(sample_rows):
            input_ids[sample_index, slot, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[sample_index, slot, : len(row)] = 1
            attention_mask[sample_index, slot, len(row) :] = 0
            text_mask[sample_index, slot] = True
    return input_ids, attention_mask, text_mask
