import random

import pytest

from litelvlm.models.prompts import (
    SEG_ANSWERS,
    SEG_QUESTIONS,
    LLAVA_V1_SYSTEM,
    GroundingPrompt,
    PromptError,
    build_glamm_prompt,
    build_lisa_prompt,
    render_llava_v1,
)

# conv_llava_v1's system text, character for character (groundingLMM and LISA model/llava/conversation.py).
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def test_templates_are_glamms_sixteen_questions_and_five_seg_answers():
    assert len(SEG_QUESTIONS) == 16 and len(set(SEG_QUESTIONS)) == 16
    assert all(question.count("{class_name}") == 1 for question in SEG_QUESTIONS)
    assert SEG_QUESTIONS[0] == "Can you segment the {class_name} in this image?"
    assert SEG_QUESTIONS[15] == "Can you highlight the {class_name} in this image with a segmentation mask"
    assert SEG_ANSWERS == (
        "It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].", "Sure, the segmentation result is [SEG].", "[SEG]."
    )


def test_system_text_is_llava_v1s_not_vicuna_v1s():
    assert LLAVA_V1_SYSTEM == SYSTEM
    assert len(LLAVA_V1_SYSTEM) == 156 and LLAVA_V1_SYSTEM.count("human") == 2 and "user" not in LLAVA_V1_SYSTEM
    assert render_llava_v1([("q", "a")]).startswith(SYSTEM + " USER: q ASSISTANT: a</s>")


def test_llava_v1_separates_user_turns_by_space_and_assistant_turns_by_eos():
    text = render_llava_v1([("Hi there", "Hello."), ("Next?", "Done.")])
    assert text == SYSTEM + " USER: Hi there ASSISTANT: Hello.</s>USER: Next? ASSISTANT: Done.</s>"


def test_llava_v1_leaves_the_last_assistant_turn_open_for_generation():
    assert render_llava_v1([("Hi", None)]) == SYSTEM + " USER: Hi ASSISTANT:"
    with pytest.raises(PromptError, match="not the last round"):
        render_llava_v1([("Hi", None), ("Again", "ok")])


def test_glamm_prompt_for_three_sentences_is_one_vicuna_conversation():
    prompt = build_glamm_prompt(["The man in Red. ", "blue  car", "LEFT dog"], random.Random(3))
    # Random(3) draws question 7 / answer 4, question 4 / answer 2, question 15 / answer 4.
    expected = (
        SYSTEM
        + " USER: The <im_start><image><im_end> provides an overview of the picture.\n"
        "What is the man in red. in this image? Please output segmentation mask ASSISTANT: [SEG].</s>"
        "USER: Can you segment the blue  car in this image ASSISTANT: Sure, it is [SEG].</s>"
        "USER: Can you highlight the left dog in this image with a segmentation mask ASSISTANT: [SEG].</s>"
    )
    assert prompt.text == expected
    assert prompt.questions == [
        "What is the man in red. in this image? Please output segmentation mask",
        "Can you segment the blue  car in this image",
        "Can you highlight the left dog in this image with a segmentation mask",
    ]
    assert prompt.expressions == ["the man in red.", "blue  car", "left dog"]
    assert prompt.num_masks == 3 and prompt.text.count("[SEG]") == 3
    assert prompt.text.count("<im_start><image><im_end>") == 1


def test_glamm_draws_question_then_answer_per_round_from_the_given_rng():
    sentences = ["a", "b", "c"]
    prompt = build_glamm_prompt(sentences, random.Random(11))
    draws = random.Random(11)
    for index, sentence in enumerate(sentences):
        question = draws.choice(SEG_QUESTIONS).format(class_name=sentence)
        answer = draws.choice(SEG_ANSWERS)
        assert prompt.questions[index] == question
        assert f"{question} ASSISTANT: {answer}</s>" in prompt.text


def test_glamm_prompt_is_reproducible_for_a_seed():
    sentences = ["red circle", "blue square", "green triangle"]
    first = build_glamm_prompt(sentences, random.Random(5))
    assert build_glamm_prompt(sentences, random.Random(5)) == first
    others = {build_glamm_prompt(sentences, random.Random(seed)).text for seed in range(6, 12)}
    assert len(others | {first.text}) > 1


def test_glamm_keeps_punctuation_and_only_strips_and_lowercases():
    prompt = build_glamm_prompt(["  The Big Dog.\n"], random.Random(0))
    assert prompt.expressions == ["the big dog."]


def test_glamm_rejects_empty_input():
    with pytest.raises(PromptError, match="non-empty list"):
        build_glamm_prompt([], random.Random(0))
    with pytest.raises(PromptError, match="non-empty list"):
        build_glamm_prompt("a dog", random.Random(0))
    with pytest.raises(PromptError, match="empty referring expression"):
        build_glamm_prompt(["dog", "  "], random.Random(0))


def test_lisa_prompt_is_one_round_answered_by_seg():
    prompt = build_lisa_prompt(" The Red Circle ")
    assert prompt.text == (
        SYSTEM + " USER: <im_start><image><im_end>\n What is the red circle in this image? "
        "Please output segmentation mask. ASSISTANT: [SEG].</s>"
    )
    assert prompt.questions == ["What is the red circle in this image? Please output segmentation mask."]
    assert prompt.expressions == ["the red circle"] and prompt.num_masks == 1


def test_lisa_prompt_without_start_end_tokens_has_the_bare_image_placeholder():
    prompt = build_lisa_prompt("dog", use_im_start_end=False)
    assert " USER: <image>\n What is dog in this image?" in prompt.text
    assert "<im_start>" not in prompt.text


def test_grounding_prompt_checks_its_seg_count():
    with pytest.raises(PromptError, match="expected 2"):
        GroundingPrompt(text="<image> [SEG]", questions=["q", "q"], expressions=["a", "b"], num_masks=2)
