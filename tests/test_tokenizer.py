import json
import random
import re
import shutil

import pytest
import sentencepiece
import torch
from transformers import AutoTokenizer

from litelvlm.models.prompts import build_glamm_prompt, build_lisa_prompt
from litelvlm.models.tiny_assets import (
    CLIP_FILES,
    LISA_ADDED_TOKENS,
    LLM_FILES,
    TINY_TOKENIZERS_DIRNAME,
    ensure_tiny_tokenizers,
    write_llm_tokenizer_folder,
)
from litelvlm.models.tokenizer import (
    IMAGE_TOKEN_INDEX,
    TokenizerError,
    load_clip_tokenizer,
    load_llm_tokenizer,
    special_token_ids,
    tokenize_prompt,
    tokenize_questions,
)

GLAMM_IDS = {
    "<im_start>": 1000, "<im_end>": 1001, "<bbox>": 1002, "<point>": 1003, "[SEG]": 1004, "<p>": 1005, "</p>": 1006
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny_tokenizers(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def sp(tiny):
    return sentencepiece.SentencePieceProcessor(model_file=str(tiny / "llm" / "tokenizer.model"))


@pytest.fixture(scope="module")
def llm(tiny):
    return load_llm_tokenizer(tiny / "llm")


@pytest.fixture(scope="module")
def clip(tiny):
    return load_clip_tokenizer(tiny / "clip")


def legacy_rule_ids(sp, text, added):
    """transformers 4.28's slow LLaMA tokenizer: BOS, split at added tokens and </s>, whitespace next to
    added tokens stripped, every other chunk encoded by SentencePiece on its own."""
    specials = {**added, "</s>": sp.eos_id()}
    pattern = "(" + "|".join(re.escape(token) for token in sorted(specials, key=len, reverse=True)) + ")"
    parts = re.split(pattern, text)
    ids = [sp.bos_id()]
    for index, part in enumerate(parts):
        if index % 2:
            ids.append(specials[part])
            continue
        if index > 0 and parts[index - 1] in added:
            part = part.lstrip()
        if index + 1 < len(parts) and parts[index + 1] in added:
            part = part.rstrip()
        if part:
            ids.extend(sp.encode(part))
    return ids


def rule_prompt_ids(sp, text, added):
    """The references' tokenizer_image_token on top of the legacy rule."""
    chunks = text.split("<image>")
    ids = legacy_rule_ids(sp, chunks[0], added)
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX] + legacy_rule_ids(sp, chunk, added)[1:]
    return ids


def test_sure_seg_gets_a_dummy_prefix_on_each_chunk(llm, sp):
    expected = [1] + sp.encode("Sure,") + [1004] + sp.encode(".")
    assert sp.id_to_piece(sp.encode(".")[0]).startswith("▁")  # the piece a non-legacy tokenizer would drop
    assert llm("Sure, [SEG].")["input_ids"] == expected
    assert tokenize_prompt(llm, "Sure, [SEG].") == expected


def test_image_between_start_and_end_becomes_the_sentinel_with_stripped_neighbours(llm, sp):
    text = "USER: The <im_start><image><im_end> provides an overview of the picture.\nCan you segment it?"
    expected = (
        [1] + sp.encode("USER: The") + [1000, IMAGE_TOKEN_INDEX, 1001]
        + sp.encode("provides an overview of the picture.\nCan you segment it?")
    )
    assert tokenize_prompt(llm, text) == expected


def test_full_glamm_prompt_matches_the_rule_with_bos_only_at_the_start(llm, sp):
    prompt = build_glamm_prompt(["the big red circle", "blue square.", "left triangle"], random.Random(1))
    ids = tokenize_prompt(llm, prompt.text)
    assert ids == rule_prompt_ids(sp, prompt.text, GLAMM_IDS)
    assert ids[0] == 1 and ids.count(1) == 1
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids.count(1004) == 3 and ids.count(2) == 3
    start = ids.index(1000)
    assert ids[start : start + 3] == [1000, IMAGE_TOKEN_INDEX, 1001]


def test_chunks_starting_with_whitespace_keep_sentencepieces_dummy_prefix(llm, sp):
    # Without <im_start>/<im_end> the chunk after <image> starts with whitespace.
    prompt = build_lisa_prompt("dog", use_im_start_end=False)
    before, after = prompt.text.split("<image>")
    assert tokenize_prompt(llm, prompt.text) == [1] + sp.encode(before) + [IMAGE_TOKEN_INDEX] + rule_prompt_ids(
        sp, after, GLAMM_IDS
    )[1:]
    assert llm(" provides")["input_ids"] == [1] + sp.encode(" provides")
    assert "".join(sp.encode(" provides", out_type=str)).startswith("▁▁provides")  # dummy prefix + the space
    assert llm("a.</s> USER")["input_ids"] == [1] + sp.encode("a.") + [2] + sp.encode(" USER")  # </s> strips nothing


def test_random_texts_tokenise_by_the_rule(llm, sp):
    pieces = ["a", "b", "red", " ", "  ", "\n", ",", ".", "é", "USER:", "circle"]
    pieces += ["[SEG]", "<im_start>", "<im_end>", "<p>", "</p>", "</s>"]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 10)))
        assert llm(text)["input_ids"] == legacy_rule_ids(sp, text, GLAMM_IDS), repr(text)


def test_tiny_llm_tokenizer_has_glamms_added_tokens_after_the_base_vocab(llm):
    assert len(llm) == 1007
    expected = dict(seg=1004, im_start=1000, im_end=1001, pad=0, bos=1, eos=2, image_patch=None)
    assert special_token_ids(llm).__dict__ == expected
    assert llm.padding_side == "right" and llm.pad_token == "<unk>"


def test_special_ids_follow_the_files_of_a_lisa_style_folder(tiny, sp, tmp_path):
    sp_model = (tiny / "llm" / "tokenizer.model").read_bytes()
    folder = write_llm_tokenizer_folder(tmp_path / "lisa", sp_model, LISA_ADDED_TOKENS)
    tokenizer = load_llm_tokenizer(folder)
    assert len(tokenizer) == 1004
    ids = special_token_ids(tokenizer)
    assert (ids.image_patch, ids.im_start, ids.im_end, ids.seg) == (1000, 1001, 1002, 1003)
    lisa_ids = {"<im_patch>": 1000, "<im_start>": 1001, "<im_end>": 1002, "[SEG]": 1003}
    text = build_lisa_prompt("the red circle").text
    assert tokenize_prompt(tokenizer, text) == rule_prompt_ids(sp, text, lisa_ids)


def test_released_folder_with_other_strip_flags_still_tokenises_by_the_rule(tiny, sp, tmp_path):
    folder = tmp_path / "released"
    shutil.copytree(tiny / "llm", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for entry in config["added_tokens_decoder"].values():  # <unk>, <s>, </s> included
        entry.update(lstrip=True, rstrip=False, normalized=True, special=False)
    config["eos_token"] = {"__type": "AddedToken", "content": "</s>", "normalized": True}  # 4.28-era form
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    text = build_glamm_prompt(["a  big dog ", "the cat"], random.Random(2)).text
    assert tokenize_prompt(load_llm_tokenizer(folder), text) == rule_prompt_ids(sp, text, GLAMM_IDS)

    del config["added_tokens_decoder"]  # transformers 4.28 saved only added_tokens.json
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenize_prompt(load_llm_tokenizer(folder), text) == rule_prompt_ids(sp, text, GLAMM_IDS)


def test_tiny_folder_loads_with_auto_tokenizer(tiny):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny / "llm"), use_fast=False)
    assert len(tokenizer) == 1007 and tokenizer.convert_tokens_to_ids("[SEG]") == 1004


def test_missing_folder_or_model_file_is_named(tmp_path):
    with pytest.raises(TokenizerError, match=r"folder .*nowhere does not exist"):
        load_llm_tokenizer(tmp_path / "nowhere")
    with pytest.raises(TokenizerError, match="has no tokenizer.model"):
        load_llm_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="has no vocab.json"):
        load_clip_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="is not a SentencePiece model"):
        load_llm_tokenizer(tmp_path)


def test_missing_seg_token_is_named(tiny, tmp_path):
    sp_model = (tiny / "llm" / "tokenizer.model").read_bytes()
    folder = write_llm_tokenizer_folder(tmp_path / "noseg", sp_model, ["<im_start>", "<im_end>"])
    with pytest.raises(TokenizerError, match=r"has no \[SEG\]"):
        special_token_ids(load_llm_tokenizer(folder))


def test_added_token_ids_that_cannot_be_kept_are_an_error(tiny, tmp_path):
    folder = tmp_path / "gap"
    shutil.copytree(tiny / "llm", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "added_tokens.json").write_text(json.dumps({"<im_start>": 1000, "[SEG]": 1005}))
    with pytest.raises(TokenizerError, match=r"'\[SEG\]' file id 1005"):
        load_llm_tokenizer(folder)


def test_clip_tokenizer_knows_the_corpus_words(clip):
    tokens = clip.convert_ids_to_tokens(clip("The big red circle?")["input_ids"])
    assert tokens == ["<|startoftext|>", "the</w>", "big</w>", "red</w>", "circle</w>", "?</w>", "<|endoftext|>"]


def test_questions_are_padded_to_the_most_questions_in_the_batch(clip):
    questions = [["the red circle", "a big blue square in this image"], ["dog"], []]
    input_ids, attention_mask, text_mask = tokenize_questions(clip, questions)
    longest = clip("a big blue square in this image")["input_ids"]
    assert input_ids.shape == attention_mask.shape == (3, 2, len(longest))
    assert text_mask.tolist() == [[True, True], [True, False], [False, False]]
    assert input_ids[0, 1].tolist() == longest
    dog = clip("dog")["input_ids"]
    assert input_ids[1, 0, : len(dog)].tolist() == dog
    assert attention_mask[1, 0].tolist() == [1] * len(dog) + [0] * (len(longest) - len(dog))
    pad = clip.pad_token_id
    for sample, slot in [(1, 1), (2, 0), (2, 1)]:  # empty slots: pad ids, one attended position
        assert (input_ids[sample, slot] == pad).all()
        assert attention_mask[sample, slot].tolist() == [1] + [0] * (len(longest) - 1)
    assert input_ids.dtype == torch.long and text_mask.dtype == torch.bool


def test_long_questions_are_truncated_to_max_length_keeping_the_end_token(clip):
    input_ids, attention_mask, _ = tokenize_questions(clip, [["red " * 30]], max_length=10)
    assert input_ids.shape == (1, 1, 10)
    assert input_ids[0, 0, -1].item() == clip.eos_token_id and attention_mask.all()


def test_empty_question_batch_is_an_error(clip):
    with pytest.raises(TokenizerError, match="no question"):
        tokenize_questions(clip, [[], []])


def test_tiny_build_is_deterministic_and_reused(tiny, tmp_path):
    again = ensure_tiny_tokenizers(tmp_path)
    for sub, names in (("llm", LLM_FILES), ("clip", CLIP_FILES)):
        for name in names:
            assert (again / sub / name).read_bytes() == (tiny / sub / name).read_bytes(), f"{sub}/{name}"
    stamp = (again / "llm" / "tokenizer.model").stat().st_mtime_ns
    assert ensure_tiny_tokenizers(tmp_path) == again
    assert (again / "llm" / "tokenizer.model").stat().st_mtime_ns == stamp
    assert [path.name for path in tmp_path.iterdir()] == [TINY_TOKENIZERS_DIRNAME]  # no staging folder left


def test_tiny_cache_defaults_to_litelvlm_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LITELVLM_CACHE", str(tmp_path))
    assert ensure_tiny_tokenizers() == tmp_path / TINY_TOKENIZERS_DIRNAME
