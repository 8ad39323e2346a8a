"""Prompts of the references' referring segmentation, as data plus small builders.

The templates are the reference's data (GLaMM `dataset/utils/utils.py`, LISA `utils/utils.py` and
`utils/dataset.py`); the conversation is rendered with the `llava_v1` template the references
train and evaluate with (docs/models.md). Each prompt records where its assistant answers are, so
training can supervise exactly those tokens.

GLaMM trains on the form it evaluates (`ReferSegmDataset.create_conversations` builds both):
`build_glamm_prompt` serves both, only the sentences and the random source differ. LISA trains on
one single-round conversation per sentence with its own four question templates
(`build_lisa_training_prompt`), while its evaluation asks one fixed question (`build_lisa_prompt`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from litelvlm.errors import LitelvlmError

IMAGE_PLACEHOLDER = "<image>"
IM_START = "<im_start>"
IM_END = "<im_end>"
SEG_TOKEN = "[SEG]"

# The system text of `conv_llava_v1` (GLaMM's and LISA's `model/llava/conversation.py`), the template
# both select (`--conv_type llava_v1`); vicuna_v1 differs only in saying "user" for "human".
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
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
# LISA's ReasonSeg validation (utils/dataset.py ValDataset, lines 393-409): a long query (is_sentence)
# is asked as it stands, a short one inside the RefCOCO question; the query is stripped, not lowercased.
REASONSEG_LONG_QUESTION = "{sent} Please output segmentation mask."
REASONSEG_SHORT_QUESTION = LISA_QUESTION
# LISA's SHORT_QUESTION_LIST (training), in the reference's order, without its "<image>\n" prefix;
# LISA's training ANSWER_LIST is GLaMM's SEG_ANSWERS, same order.
LISA_TRAINING_QUESTIONS: tuple[str, ...] = (
    "Can you segment the {class_name} in this image?",
    "Please segment the {class_name} in this image.",
    "What is {class_name} in this image? Please respond with segmentation mask.",
    "What is {class_name} in this image? Please output segmentation mask.",
)


class PromptError(LitelvlmError):
    """A prompt could not be built from the given sentences."""


@dataclass
class GroundingPrompt:
    """One conversation for one image, and what the rest of the pipeline needs to know about it."""

    text: str  # full prompt; holds the image placeholder exactly once
    questions: list[str]  # each round's question without the image sentence: CLIP text input
    expressions: list[str]  # the normalised referring expressions, one per mask
    num_masks: int  # = number of [SEG] in `text`
    # [start, end) character span in `text` of each assistant message with its closing "</s>":
    # the text a training loss supervises (empty for a prompt that ends with "ASSISTANT:")
    answer_spans: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        if self.text.count(IMAGE_PLACEHOLDER) != 1:
            raise PromptError(f"a grounding prompt must hold {IMAGE_PLACEHOLDER} exactly once: {self.text!r}")
        if self.text.count(SEG_TOKEN) != self.num_masks:
            raise PromptError(f"prompt holds {self.text.count(SEG_TOKEN)} {SEG_TOKEN}, expected {self.num_masks}")
        if not len(self.questions) == len(self.expressions) == self.num_masks:
            raise PromptError(
                f"{len(self.questions)} questions and {len(self.expressions)} expressions for {self.num_masks} masks"
            )
        for start, end in self.answer_spans:
            if not (0 <= start < end <= len(self.text) and self.text[start:end].endswith(ASSISTANT_SEPARATOR)):
                raise PromptError(
                    f"answer span ({start}, {end}) is not an assistant message ending in {ASSISTANT_SEPARATOR}"
                )


def image_text(use_im_start_end: bool = True) -> str:
    """How the image appears in the prompt text: wrapped in <im_start>/<im_end> when the model has them."""
    return IM_START + IMAGE_PLACEHOLDER + IM_END if use_im_start_end else IMAGE_PLACEHOLDER


def render_llava_v1(rounds: Sequence[tuple[str, str | None]], system: str = LLAVA_V1_SYSTEM) -> str:
    """Render (user, assistant) rounds with the llava_v1 template.

    The last assistant message may be None: the prompt then ends with "ASSISTANT:" for generation.
    """
    return render_llava_v1_with_spans(rounds, system)[0]


def render_llava_v1_with_spans(
    rounds: Sequence[tuple[str, str | None]], system: str = LLAVA_V1_SYSTEM
) -> tuple[str, list[tuple[int, int]]]:
    """`render_llava_v1`, plus the [start, end) span of each assistant message and its "</s>".

    These are what the references' training targets keep (their `_process_conversation` masks the
    system prompt and each "USER: ... ASSISTANT:" instruction, and keeps answer + "</s>").
    """
    if not rounds:
        raise PromptError("a conversation needs at least one round")
    text = system + USER_SEPARATOR
    spans = []
    for index, (user_message, assistant_message) in enumerate(rounds):
        text += f"{USER_ROLE}: {user_message}{USER_SEPARATOR}"
        if assistant_message is None:
            if index != len(rounds) - 1:
                raise PromptError(f"round {index} has no assistant message but is not the last round")
            text += f"{ASSISTANT_ROLE}:"
        else:
            text += f"{ASSISTANT_ROLE}: "
            start = len(text)
            text += f"{assistant_message}{ASSISTANT_SEPARATOR}"
            spans.append((start, len(text)))
    return text, spans


def normalise_expression(sentence: str) -> str:
    """Strip surrounding whitespace and lowercase, as both references do (no punctuation is removed)."""
    expression = sentence.strip().lower()
    if not expression:
        raise PromptError(f"empty referring expression: {sentence!r}")
    return expression


def build_glamm_prompt(
    sentences: Sequence[str], rng: random.Random, use_im_start_end: bool = True
) -> GroundingPrompt:
    """GLaMM's prompt (evaluation and training): one conversation, one round per sentence,
    templates drawn from `rng`.

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
    text, spans = render_llava_v1_with_spans(list(zip(user_messages, answers)))
    return GroundingPrompt(
        text=text, questions=questions, expressions=expressions, num_masks=len(expressions), answer_spans=spans
    )


def build_lisa_prompt(sentence: str, use_im_start_end: bool = True) -> GroundingPrompt:
    """LISA's evaluation prompt: one round per sentence, answered "[SEG].".

    LISA-7B-v1 runs with `use_mm_start_end=True` (the default of its scripts), hence the default here.
    """
    expression = normalise_expression(sentence)
    question = LISA_QUESTION.format(sent=expression)
    text, spans = render_llava_v1_with_spans([(image_text(use_im_start_end) + "\n " + question, LISA_ANSWER)])
    return GroundingPrompt(text=text, questions=[question], expressions=[expression], num_masks=1, answer_spans=spans)


def build_reasonseg_prompt(query: str, is_sentence: bool, use_im_start_end: bool = True) -> GroundingPrompt:
    """LISA's ReasonSeg evaluation prompt: one round, "<image>\n " + the question of the query's kind, "[SEG].".

    The expression (CLIP's text and the records' query) is the stripped query, case kept.
    """
    expression = query.strip()
    if not expression:
        raise PromptError(f"empty ReasonSeg query: {query!r}")
    template = REASONSEG_LONG_QUESTION if is_sentence else REASONSEG_SHORT_QUESTION
    question = template.format(sent=expression)
    text, spans = render_llava_v1_with_spans([(image_text(use_im_start_end) + "\n " + question, LISA_ANSWER)])
    return GroundingPrompt(text=text, questions=[question], expressions=[expression], num_masks=1, answer_spans=spans)


def build_lisa_training_prompt(sentence: str, rng: random.Random, use_im_start_end: bool = True) -> GroundingPrompt:
    """LISA's training prompt: one round, "<image>\n" + a drawn LISA question, a drawn answer.

    As LISA's `ReferSegDataset`: question template drawn before the answer; no space after the
    newline (unlike its evaluation prompt).
    """
    expression = normalise_expression(sentence)
    question = rng.choice(LISA_TRAINING_QUESTIONS).format(class_name=expression)
    answer = rng.choice(SEG_ANSWERS)
    text, spans = render_llava_v1_with_spans([(image_text(use_im_start_end) + "\n" + question, answer)])
    return GroundingPrompt(text=text, questions=[question], expressions=[expression], num_masks=1, answer_spans=spans)
