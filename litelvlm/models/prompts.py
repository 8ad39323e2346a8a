"""Prompts of the references' referring-segmentation evaluation, as data plus two small builders.

The templates are the reference's data (GLaMM `dataset/utils/utils.py`, LISA `utils/dataset.py`);
the conversation is rendered with the vicuna v1 ("llava_v1") template the references evaluate with.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from litelvlm.errors import LitelvlmError

IMAGE_PLACEHOLDER = "<image>"
IM_START = "<im_start>"
IM_END = "<im_end>"
SEG_TOKEN = "[SEG]"

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"
USER_SEPARATOR = " "
ASSISTANT_SEPARATOR = "</s>"

# GLaMM's SEG_QUESTIONS, in the reference's order (the order matters for seeded choice).
SEG_QUESTIONS: tuple[str, ...] = (
    "Can you segment the {class_name} in this image?",
    "Please segment {class_name} in this image.",
    "What is {class_name} in this image? Please respond with segmentation mask.",
    "What is {class_name} in this image? Please output segmentation mask.",
    "Can you segment the {class_name} in this image",
    "Please segment {class_name} in this image",
    "What is {class_name} in this image? Please respond with segmentation mask",
    "What is {class_name} in this image? Please output segmentation mask",
    "Could you provide a segmentation mask for the {class_name} in this image?",
    "Please identify and segment the {class_name} in this image.",
    "Where is the {class_name} in this picture? Please respond with a segmentation mask.",
    "Can you highlight the {class_name} in this image with a segmentation mask?",
    "Could you provide a segmentation mask for the {class_name} in this image",
    "Please identify and segment the {class_name} in this image",
    "Where is the {class_name} in this picture? Please respond with a segmentation mask",
    "Can you highlight the {class_name} in this image with a segmentation mask",
)

# GLaMM's ANSWER_LIST: every answer holds exactly one [SEG].
SEG_ANSWERS: tuple[str, ...] = (
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
)

GLAMM_IMAGE_SENTENCE = "The <image> provides an overview of the picture.\n"
LISA_QUESTION = "What is {sent} in this image? Please output segmentation mask."
LISA_ANSWER = "[SEG]."


class PromptError(LitelvlmError):
    """A prompt could not be built from the given sentences."""


@dataclass
class GroundingPrompt:
    """One conversation for one image, and what the rest of the pipeline needs to know about it."""

    text: str  # full prompt; holds the image placeholder exactly once
    questions: list[str]  # each round's question without the image sentence: CLIP text input
    expressions: list[str]  # the normalised referring expressions, one per mask
    num_masks: int  # = number of [SEG] in `text`

    def __post_init__(self):
        if self.text.count(IMAGE_PLACEHOLDER) != 1:
            raise PromptError(f"a grounding prompt must hold {IMAGE_PLACEHOLDER} exactly once: {self.text!r}")
        if self.text.count(SEG_TOKEN) != self.num_masks:
            raise PromptError(f"prompt holds {self.text.count(SEG_TOKEN)} {SEG_TOKEN}, expected {self.num_masks}")
        if not len(self.questions) == len(self.expressions) == self.num_masks:
            raise PromptError(
                f"{len(self.questions)} questions and {len(self.expressions)} expressions for {self.num_masks} masks"
            )


def image_text(use_im_start_end: bool = True) -> str:
    """How the image appears in the prompt text: wrapped in <im_start>/<im_end> when the model has them."""
    return IM_START + IMAGE_PLACEHOLDER + IM_END if use_im_start_end else IMAGE_PLACEHOLDER


def render_llava_v1(rounds: Sequence[tuple[str, str | None]], system: str = VICUNA_V1_SYSTEM) -> str:
    """Render (user, assistant) rounds with the vicuna v1 template.

    The last assistant message may be None: the prompt then ends with "ASSISTANT:" for generation.
    """
    if not rounds:
        raise PromptError("a conversation needs at least one round")
    text = system + USER_SEPARATOR
    for index, (user_message, assistant_message) in enumerate(rounds):
        text += f"{USER_ROLE}: {user_message}{USER_SEPARATOR}"
        if assistant_message is None:
            if index != len(rounds) - 1:
                raise PromptError(f"round {index} has no assistant message but is not the last round")
            text += f"{ASSISTANT_ROLE}:"
        else:
            text += f"{ASSISTANT_ROLE}: {assistant_message}{ASSISTANT_SEPARATOR}"
    return text


def normalise_expression(sentence: str) -> str:
    """Strip surrounding whitespace and lowercase, as both references do (no punctuation is removed)."""
    expression = sentence.strip().lower()
    if not expression:
        raise PromptError(f"empty referring expression: {sentence!r}")
    return expression


def build_glamm_prompt(
    sentences: Sequence[str], rng: random.Random, use_im_start_end: bool = True
) -> GroundingPrompt:
    """GLaMM's evaluation prompt: one conversation, one round per sentence, templates drawn from `rng`.

    Per round the question template is drawn before the answer, the reference's order.
    """
    if isinstance(sentences, str) or not sentences:
        raise PromptError(f"build_glamm_prompt needs a non-empty list of sentences, got {sentences!r}")
    expressions = [normalise_expression(sentence) for sentence in sentences]
    questions, answers = [], []
    for expression in expressions:
        questions.append(rng.choice(SEG_QUESTIONS).format(class_name=expression))
        answers.append(rng.choice(SEG_ANSWERS))
    image_sentence = GLAMM_IMAGE_SENTENCE.replace(IMAGE_PLACEHOLDER, image_text(use_im_start_end))
    user_messages = [image_sentence + questions[0], *questions[1:]]
    text = render_llava_v1(list(zip(user_messages, answers)))
    return GroundingPrompt(text=text, questions=questions, expressions=expressions, num_masks=len(expressions))


def build_lisa_prompt(sentence: str, use_im_start_end: bool = True) -> GroundingPrompt:
    """LISA's evaluation prompt: one round per sentence, answered "[SEG].".

    LISA-7B-v1 runs with `use_mm_start_end=True` (the default of its scripts), hence the default here.
    """
    expression = normalise_expression(sentence)
    question = LISA_QUESTION.format(sent=expression)
    text = render_llava_v1([(image_text(use_im_start_end) + "\n " + question, LISA_ANSWER)])
    return GroundingPrompt(text=text, questions=[question], expressions=[expression], num_masks=1)
