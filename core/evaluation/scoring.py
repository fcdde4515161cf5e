"""Answers compared as the VQA evaluation compares them, plus SQuAD's token F1 for partial credit.

Exact match alone calls "2 dogs" against "two dogs" wrong and gives a caption nothing for sharing
most of its words; the VQA normalisation removes the differences that are only spelling, and the
F1 over its words measures how much of the expected answer the model said.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter

# Marks that become a space inside a word ("black-and-white") and vanish next to a space.
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_THOUSANDS = re.compile(r"\d,\d")  # "1,000": the marks of such a text vanish, so the number stays one word
# A period vanishes unless a digit follows it ("3.5" stays), as the VQA evaluation's pattern behaves.
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {
    word: str(value) for value, word in enumerate("zero one two three four five six seven eight nine ten".split())
} | {"none": "0"}
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions whose spelling without apostrophes is no other word ("its", "well" and "were" are).
_WRITTEN_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't "
    "shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd "
    "where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't "
    "wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _without_apostrophes(word: str) -> set[str]:
    """Every spelling of ``word`` with one or more of its apostrophes left out."""
    parts = word.split("'")
    spellings = set()
    for joins in itertools.product(("'", ""), repeat=len(parts) - 1):
        spelling = parts[0] + "".join(join + part for join, part in zip(joins, parts[1:], strict=True))
        if spelling != word:
            spellings.add(spelling)
    return spellings


_CONTRACTIONS = {spelling: word for word in _WRITTEN_CONTRACTIONS for spelling in _without_apostrophes(word)}


def _punctuation(text: str) -> str:
    drop_all = _THOUSANDS.search(text) is not None
    for mark in _PUNCTUATION:
        gone = drop_all or f"{mark} " in text or f" {mark}" in text
        text = text.replace(mark, "" if gone else " ")
    return _PERIOD.sub("", text)


def normalize_answer(text: str) -> str:
    """The VQA evaluation's normalisation: punctuation handled, lowercase, number words as digits
    ("two" -> "2"), articles removed, contractions given their apostrophes, single spaces."""
    words = []
    for word in _punctuation(text).lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def exact_match(answered: str, expected: str) -> float:
    """1.0 where the two are the same answer once normalised, else 0.0."""
    return float(normalize_answer(answered) == normalize_answer(expected))


def token_f1(answered: str, expected: str) -> float:
    """SQuAD's F1 over the normalised words: the harmonic mean of the share of the answer's words
    that are expected and the share of the expected words it has. Where either has no words, 1.0
    only if both have none."""
    said, wanted = normalize_answer(answered).split(), normalize_answer(expected).split()
    if not said or not wanted:
        return float(said == wanted)
    shared = sum((Counter(said) & Counter(wanted)).values())
    if not shared:
        return 0.0
    precision, recall = shared / len(said), shared / len(wanted)
    return 2 * precision * recall / (precision + recall)
