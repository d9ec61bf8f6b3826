"""Prompt templates (TA, RPS, stage 2) and their encoding into token ids with a soft-prompt slot.

The wording follows the authors' templates (see docs/delrec-method.md), with the domain's verb and
noun and the teacher's name. A template is rendered to text holding ``[SOFT]`` where the soft prompt
goes; encoding splits at the marker, tokenises both halves and puts ``n_soft`` placeholder ids in
between, whose embeddings the soft prompt replaces (:meth:`SoftPrompt.splice`).

For decoder-only models the prompt stops where the answer starts (``... might be:``) and the answer
is scored as its continuation; RPS's text after the answer slot (the teacher's ranks 2-10) is moved
before the question. For encoder-decoder models the slot is T5's first sentinel and the answer is
the decoder target after it. Prompts without a soft prompt (the ablation and the untuned LLM) drop
the pattern clause and the teacher reference.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

from delrec.llm.backbone import SENTINEL, Backbone

log = logging.getLogger(__name__)

SOFT_MARKER = "[SOFT]"
# domain -> (past verb, present verb, noun)
WORDING = {
    "movies": ("watched", "watch", "movie"),
    "games": ("played", "play", "game"),
    "products": ("bought", "buy", "product"),
}
DEFAULT_WORDING = ("consumed", "consume", "item")
# MovieLens's "Toy Story (1995)": the release year in brackets at the end of a title.
TITLE_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")


def without_year(title: str) -> str:
    """``title`` without a trailing "(YYYY)"; unchanged if that is all it holds."""
    return TITLE_YEAR.sub("", title) or title


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of a prompt; ids[soft_start : soft_start + n_soft] are the soft prompt's slots."""

    ids: tuple[int, ...]
    soft_start: int = -1
    n_soft: int = 0


@dataclass(frozen=True)
class PromptSettings:
    """How a model's prompts are sized and its titles spelled.

    A fine-tuned model must be scored on the prompts it was trained on: finetune stores these in its
    prompt.json (:meth:`as_json`) and evaluate and recommend rebuild the prompts from it
    (:meth:`from_json`), so the two sides cannot list different fields.
    """

    history_items: int = 10
    max_prompt_tokens: int = 768
    max_title_chars: int = 80
    max_answer_chars: int | None = None
    title_years: bool = True

    def as_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, stored: Mapping[str, object]) -> PromptSettings:
        """The settings a prompt.json records; a field it lacks (a model saved before the field existed)
        takes its default, which is how that model was trained."""
        return cls(**{f.name: stored[f.name] for f in fields(cls) if f.name in stored})


class PromptBuilder:
    """Renders and encodes the three prompts for one dataset, teacher and backbone, sized and spelled as
    ``settings`` say (the defaults: how models saved before a setting existed were trained)."""

    def __init__(
        self,
        backbone: Backbone,
        titles: Sequence[str],
        *,
        domain: str,
        teacher: str,
        n_soft: int,
        settings: PromptSettings = PromptSettings(),
        max_answer_tokens: int = 32,
    ):
        self.tokenizer = backbone.tokenizer
        self.encoder_decoder = backbone.is_encoder_decoder
        self.eos_id = backbone.eos_id
        self.placeholder = backbone.pad_id
        self.sentinel_id = self.tokenizer.convert_tokens_to_ids(SENTINEL) if self.encoder_decoder else None
        self.titles = titles if settings.title_years else [without_year(t) for t in titles]
        self.past, self.present, self.noun = WORDING.get(domain, DEFAULT_WORDING)
        self.teacher = teacher
        self.n_soft = n_soft
        self.history_items = settings.history_items
        self.max_prompt_tokens = settings.max_prompt_tokens
        self.max_title_chars = settings.max_title_chars
        self.max_answer_chars = settings.max_answer_chars
        self.max_answer_tokens = max_answer_tokens
        self._answers: dict[int, tuple[int, ...]] = {}

    @classmethod
    def for_dataset(
        cls, backbone: Backbone, dataset, *, teacher: str, n_soft: int, settings: PromptSettings
    ) -> PromptBuilder:
        """The builder of a loaded dataset's titles and domain: the one way stages and serving make it."""
        return cls(
            backbone, dataset.titles, domain=dataset.domain, teacher=teacher, n_soft=n_soft, settings=settings
        )

    # -- wording ---------------------------------------------------------------------------------
    def _title(self, item: int, limit: int) -> str:
        title = self.titles[item]
        return title if len(title) <= limit else title[: limit - 1].rstrip() + "…"

    def _list(self, items: Sequence[int], limit: int) -> str:
        return ", ".join(self._title(int(i), limit) for i in items)

    def _slot(self, after: str = "") -> tuple[str, str]:
        """Text of the answer slot: (what ends the prompt, what follows the slot for T5)."""
        return (f" {SENTINEL}{after}", "") if self.encoder_decoder else ("", after)

    def ta_text(self, history: Sequence[int], candidates: Sequence[int], next_item: int, limit: int) -> str:
        """Temporal Analysis: one demonstration, then "which item was hidden" for the most recent item."""
        m, past, present, noun = self.teacher, self.past, self.present, self.noun
        h = [int(i) for i in history]
        rest = self._list(h[4:-1], limit)
        slot, _ = self._slot(".")
        also = f"{rest}, [item X]" if rest else "[item X]"
        return (
            f"Simulate {m}'s recommendation pattern to analyse the most recent {noun} in the user's history, "
            f"choosing from the candidates. {m}'s pattern is: {SOFT_MARKER}. "
            f"Candidates: {self._list(candidates, limit)}. "
            f"The user already {past} {self._list(h[:2], limit)}, [item M]. "
            f"The next {noun} they plan to {present} is {self._title(h[3], limit)}. "
            f"The most recent {noun} [item M] is {self._title(h[2], limit)}. "
            f"After that the user also {past} {also}. "
            f"The next {noun} they plan to {present} is {self._title(next_item, limit)}. "
            f"The most recent {noun} [item X] is:{slot}"
        )

    def rps_text(
        self, history: Sequence[int], candidates: Sequence[int], teacher_top: Sequence[int], limit: int
    ) -> str:
        """Recommendation Pattern Simulating: fill in the teacher's top-1 given its ranks 2-10."""
        m, present, noun = self.teacher, self.present, self.noun
        ranks = self._list(teacher_top[1:], limit)
        head = (
            f"Simulate {m}'s recommendation pattern to predict the next {noun}s the user may {present} from "
            f"the candidates based on their history. {m}'s pattern is: {SOFT_MARKER}. "
            f"History: {self._list(history, limit)}. Candidates: {self._list(candidates, limit)}. "
        )
        if self.encoder_decoder:
            return head + f"The next {noun}s (predicted by {m}) might be: {SENTINEL}, {ranks}."
        return (
            head
            + f"Following {noun}s (predicted by {m}): {ranks}. The next {noun}s (predicted by {m}) might be:"
        )

    def stage2_text(self, history: Sequence[int], candidates: Sequence[int], soft: bool, limit: int) -> str:
        """The fine-tuning and serving prompt; with ``soft=False`` the pattern clause is left out."""
        present, noun = self.present, self.noun
        task = f"predict the next {noun} the user may {present} from the candidates based on their history."
        intro = (
            f"Refer to {self.teacher}'s recommendation pattern to {task} {self.teacher}'s pattern is: {SOFT_MARKER}. "
            if soft
            else f"{task[0].upper()}{task[1:]} "
        )
        slot, _ = self._slot(".")
        return (
            f"{intro}History: {self._list(history, limit)}. Candidates: {self._list(candidates, limit)}. "
            f"The next {noun} the user will {present} might be:{slot}"
        )

    # -- encoding --------------------------------------------------------------------------------
    def encode(self, text: str, n_soft: int) -> EncodedPrompt:
        """Split at the marker and put ``n_soft`` placeholder ids there (none if the text has no marker)."""
        head, marker, tail = text.partition(SOFT_MARKER)
        if marker:
            # "...is: [SOFT]" would leave a token that is a lone space before the soft slots.
            head = head.rstrip()
        encode = self.tokenizer.encode
        ids = encode(head, add_special_tokens=False)
        soft_start = -1
        if marker and n_soft:
            soft_start = len(ids)
            ids += [self.placeholder] * n_soft
        elif marker:
            n_soft = 0
        if tail:
            ids += encode(tail, add_special_tokens=False)
        if self.encoder_decoder:
            ids.append(self.eos_id)
        return EncodedPrompt(tuple(ids), soft_start, n_soft if soft_start >= 0 else 0)

    def _bounded(self, render, history: Sequence[int], min_history: int, n_soft: int) -> EncodedPrompt:
        """Encode with the history cut to its last N items, shortened further until the prompt fits."""
        history = list(history)[-self.history_items :]
        limit = self.max_title_chars
        while True:
            prompt = self.encode(render(history, limit), n_soft)
            if len(prompt.ids) <= self.max_prompt_tokens:
                return prompt
            if len(history) > min_history:
                history = history[1:]
            elif limit > 12:
                limit //= 2
            else:
                log.warning(
                    "prompt of %d tokens exceeds max_prompt_tokens=%d",
                    len(prompt.ids),
                    self.max_prompt_tokens,
                )
                return prompt

    def ta(self, history: Sequence[int], candidates: Sequence[int], next_item: int) -> EncodedPrompt:
        """TA needs at least 5 history items (a 4-item demonstration and the hidden most recent one)."""
        return self._bounded(
            lambda h, lim: self.ta_text(h, candidates, next_item, lim), history, 5, self.n_soft
        )

    def rps(
        self, history: Sequence[int], candidates: Sequence[int], teacher_top: Sequence[int]
    ) -> EncodedPrompt:
        return self._bounded(
            lambda h, lim: self.rps_text(h, candidates, teacher_top, lim), history, 1, self.n_soft
        )

    def stage2(self, history: Sequence[int], candidates: Sequence[int], soft: bool = True) -> EncodedPrompt:
        n_soft = self.n_soft if soft else 0
        return self._bounded(lambda h, lim: self.stage2_text(h, candidates, soft, lim), history, 1, n_soft)

    def answer(self, item: int) -> tuple[int, ...]:
        """Token ids scored for ``item`` as the answer (title then eos; T5: sentinel first, not scored).

        With ``max_answer_chars`` (the stages pass their ``max_title_chars``) the title is cut as the
        prompt lists it, so the answer is a copy of a listed candidate: the tokens past the cut are ones
        the model cannot read anywhere, and on long product titles (Amazon Beauty: 67 characters on
        average) they doubled the scored tokens. ``None`` (models saved before the cut) scores the whole
        title.
        """
        cached = self._answers.get(item)
        if cached is None:
            title = self.titles[item]
            if self.max_answer_chars is not None:
                title = self._title(item, self.max_answer_chars)
            if self.encoder_decoder:
                body = self.tokenizer.encode(title, add_special_tokens=False)[: self.max_answer_tokens]
                cached = (self.sentinel_id, *body, self.eos_id)
            else:
                body = self.tokenizer.encode(" " + title, add_special_tokens=False)[: self.max_answer_tokens]
                cached = (*body, self.eos_id)
            self._answers[item] = cached
        return cached

    @property
    def answer_skip(self) -> int:
        """Leading answer tokens given, not scored (T5's sentinel)."""
        return 1 if self.encoder_decoder else 0
