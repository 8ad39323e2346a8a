"""Tiny stand-ins for the LLaMA and CLIP tokenizers, built offline so tests and tiny runs need no download.

The LLaMA one is a SentencePiece BPE model trained like LLaMA's (byte fallback, identity normaliser,
dummy prefix, whitespace kept) with GLaMM's added tokens after the base vocabulary, saved in the
file layout of a released checkpoint. The CLIP one is a byte-level BPE with "</w>" word ends and
merges learned here on the same corpus. Both builds are deterministic: same files on every machine.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import sentencepiece

from litelvlm.errors import LitelvlmError
from litelvlm.models.prompts import (
    GLAMM_IMAGE_SENTENCE,
    LISA_QUESTION,
    SEG_ANSWERS,
    SEG_QUESTIONS,
    LLAVA_V1_SYSTEM,
)

TINY_TOKENIZERS_DIRNAME = "tiny_tokenizers_v2"  # bump the suffix whenever the files below change
GLAMM_ADDED_TOKENS = ("<im_start>", "<im_end>", "<bbox>", "<point>", "[SEG]", "<p>", "</p>")
LISA_ADDED_TOKENS = ("<im_patch>", "<im_start>", "<im_end>", "[SEG]")
LLM_BASE_VOCAB_SIZE = 1000
CLIP_MAX_MERGES = 400  # the corpus runs out of pairs first (about 300 merges)
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MAX_LENGTH = 77

LLM_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
CLIP_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "brown", "gray")
SHAPES = ("circle", "square", "triangle", "star", "ring", "box")
SIZES = ("big", "small", "large", "tiny")
POSITIONS = ("left of", "right of", "above", "below", "next to", "behind", "in front of")
EXTRA_WORDS = (
    "the a an of and is it in on at to with first second third one two three man woman person "
    "dog cat car bus chair table cup bottle tree boy girl player shirt hat horse bird top bottom "
    "middle front back near far image picture photo object region mask segment"
)


class TinyAssetError(LitelvlmError):
    """The tiny tokenizer cache could not be built or is broken."""


def default_cache_dir() -> Path:
    """$LITELVLM_CACHE, else ~/.cache/litelvlm."""
    return Path(os.environ.get("LITELVLM_CACHE") or Path.home() / ".cache" / "litelvlm")


def tiny_corpus() -> list[str]:
    """Lines the tiny tokenizers learn from: the template, the prompts and the synthetic-scene words.

    Placeholder and added tokens are left out so that no base piece can collide with an added token.
    """
    expressions = [
        f"{size} {colour} {shape} {position} the {other_colour} {other_shape}"
        for (size, colour, shape, position), other_colour, other_shape in zip(
            itertools.product(SIZES, COLOURS, SHAPES, POSITIONS),
            itertools.cycle(COLOURS[3:] + COLOURS[:3]),
            itertools.cycle(SHAPES[2:] + SHAPES[:2]),
        )
    ]
    lines = [LLAVA_V1_SYSTEM, "USER: ASSISTANT: USER: ASSISTANT:"]
    for index, expression in enumerate(expressions):
        question = SEG_QUESTIONS[index % len(SEG_QUESTIONS)].format(class_name=expression)
        answer = SEG_ANSWERS[index % len(SEG_ANSWERS)]
        opening = GLAMM_IMAGE_SENTENCE if index % 7 == 0 else ""
        lines.append(f"USER: {opening}{question} ASSISTANT: {answer}")
        lines.append(LISA_QUESTION.format(sent=expression))
    lines.append(" ".join(COLOURS + SHAPES + SIZES + POSITIONS) + " " + EXTRA_WORDS)
    lines.append("0 1 2 3 4 5 6 7 8 9 , . ? ! ' \" : ; ( ) - /")
    removed = (*GLAMM_ADDED_TOKENS, *LISA_ADDED_TOKENS, "<image>", "</s>", "<s>", "<unk>")
    pattern = re.compile("|".join(re.escape(token) for token in removed))
    return [pattern.sub(" ", line) for line in lines]


def train_tiny_sentencepiece(vocab_size: int = LLM_BASE_VOCAB_SIZE) -> bytes:
    """Train the tiny LLaMA-kind SentencePiece model; single-threaded and unshuffled, hence reproducible."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def _write_json(path: Path, content) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_llm_tokenizer_folder(folder: str | Path, sp_model: bytes, added_tokens: Sequence[str]) -> Path:
    """Write a LLaMA tokenizer folder as a released checkpoint has it; added tokens follow the base vocab.

    The added tokens are registered as special, with the strip flags transformers 4.3x writes
    (none), so loaders must re-register them to get the references' tokenisation.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor = sentencepiece.SentencePieceProcessor(model_proto=sp_model)
    base_size = processor.get_piece_size()
    colliding = [token for token in added_tokens if processor.piece_to_id(token) != processor.unk_id()]
    if colliding:
        raise TinyAssetError(f"added tokens {colliding} are already pieces of the SentencePiece model")
    added_ids = {token: base_size + offset for offset, token in enumerate(added_tokens)}

    def entry(content: str, special: bool = True) -> dict:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }

    base_special = {processor.unk_id(): "<unk>", processor.bos_id(): "<s>", processor.eos_id(): "</s>"}
    decoder = {str(index): entry(token) for index, token in sorted(base_special.items())}
    decoder.update({str(index): entry(token) for token, index in added_ids.items()})
    (folder / "tokenizer.model").write_bytes(sp_model)
    _write_json(folder / "added_tokens.json", added_ids)
    _write_json(
        folder / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"},
    )
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": decoder,
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "model_max_length": 2048,
            "pad_token": "<unk>",
            "padding_side": "right",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
        },
    )
    return folder


def byte_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable characters, in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _clip_words(lines: Sequence[str]) -> Counter:
    """Word counts under CLIP's pre-tokenisation (lowercased; letters, single digits, punctuation runs)."""
    to_unicode = byte_to_unicode()
    pattern = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+")
    words = Counter()
    for line in lines:
        for word in pattern.findall(line.lower()):
            words["".join(to_unicode[byte] for byte in word.encode("utf-8"))] += 1
    return words


def learn_clip_merges(lines: Sequence[str], max_merges: int = CLIP_MAX_MERGES) -> list[tuple[str, str]]:
    """Plain BPE on word counts; ties broken by the pair itself so the result never depends on ordering."""
    word_counts = _clip_words(lines)
    segmented = {word: (*word[:-1], word[-1] + "</w>") for word in sorted(word_counts)}
    merges = []
    while len(merges) < max_merges:
        pair_counts = Counter()
        for word, symbols in segmented.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += word_counts[word]
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        for word, symbols in segmented.items():
            merged, index = [], 0
            while index < len(symbols):
                if symbols[index : index + 2] == best:
                    merged.append(best[0] + best[1])
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            segmented[word] = tuple(merged)
    return merges


def write_clip_tokenizer_folder(folder: str | Path, merges: Sequence[tuple[str, str]]) -> Path:
    """Write vocab.json/merges.txt in CLIP's layout: bytes, bytes+"</w>", merged symbols, then the two specials."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(byte_to_unicode().values())
    symbols += [symbol + "</w>" for symbol in symbols]
    symbols += [left + right for left, right in merges]
    symbols += [CLIP_BOS, CLIP_EOS]
    vocab = {}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
    _write_json(folder / "vocab.json", vocab)
    merges_text = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    specials = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS, "unk_token": CLIP_EOS}
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(
        folder / "tokenizer_config.json",
        {**specials, "model_max_length": CLIP_MAX_LENGTH, "tokenizer_class": "CLIPTokenizer"},
    )
    return folder


def _is_complete(folder: Path) -> bool:
    return all((folder / "llm" / name).is_file() for name in LLM_FILES) and all(
        (folder / "clip" / name).is_file() for name in CLIP_FILES
    )


def ensure_tiny_tokenizers(cache_dir: str | Path | None = None) -> Path:
    """Return `<cache>/tiny_tokenizers_v2` holding `llm/` and `clip/`, building it once.

    The build goes to a temporary sibling folder that is renamed into place, so a concurrent
    process sees either no folder or a complete one.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / TINY_TOKENIZERS_DIRNAME
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_TOKENIZERS_DIRNAME}.", dir=root))
    try:
        corpus = tiny_corpus()
        write_llm_tokenizer_folder(staging / "llm", train_tiny_sentencepiece(), GLAMM_ADDED_TOKENS)
        write_clip_tokenizer_folder(staging / "clip", learn_clip_merges(corpus))
        staging.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:
            if not _is_complete(target):  # someone else's folder is there but broken
                raise TinyAssetError(f"{target} exists but is incomplete; delete it to rebuild") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
