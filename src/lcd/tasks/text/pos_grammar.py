"""A small English grammar whose part-of-speech tags are gold by construction (lcd's offline POS source).

Every lexicon word has exactly one part of speech in any sentence the grammar can build (no
"run"/"fast"-style ambiguity), so the tag of each word is known without a tagger. Tags use Universal
Dependencies UPOS names (NOUN, ADJ, VERB, ADV, ADP, PRON, DET, CCONJ, PUNCT).

Grammar (``?`` optional, ``*`` repeated; choices are random)::

    sentence := opener? clause ("and" clause)? closer? "."
    clause   := subject adverb? verb object pp? adverb?
    subject  := PRON_subject | np
    object   := np | PRON_object
    np       := DET ADJ* NOUN            (0-2 adjectives)
    pp       := ADP (np | PRON_object)
    opener   := ADV "," | pp ","
    closer   := pp

so each tag can first occur at many positions (a pronoun can open the sentence, end a prepositional
phrase or start the second clause; an adverb can open it, precede or follow the verb).
"""

from __future__ import annotations

import random

__all__ = ["LEXICON", "TaggedSentence", "generate_sentence"]

TaggedSentence = tuple[tuple[str, str], ...]  # ((word, UPOS), ...), punctuation as its own entries

LEXICON: dict[str, tuple[str, ...]] = {
    "NOUN": tuple(
        "teacher farmer doctor painter sailor baker student river garden village mountain kitchen window "
        "letter basket bridge forest castle harbor island lantern blanket bottle carpet engine candle pocket "
        "ladder meadow tunnel wagon violin parrot rabbit turtle donkey pencil orchard museum cottage".split()
    ),
    "ADJ": tuple(
        "tall quiet green ancient careful bright heavy narrow gentle yellow clever humble dusty wooden "
        "brave tiny famous hungry lonely curious polite rusty sleepy noisy golden fragile elegant purple".split()
    ),
    "VERB": tuple(
        "painted carried visited opened found watched cleaned followed repaired noticed admired pushed "
        "borrowed described guarded chased greeted delivered examined lifted questioned rescued sketched".split()
    ),
    "ADV": tuple(
        "quickly slowly quietly carefully happily eagerly gently suddenly calmly proudly nervously "
        "patiently secretly boldly warmly briefly finally bravely".split()
    ),
    "ADP": tuple("near under behind beside across through toward beyond above against with from into without".split()),
    "PRON_SUBJ": tuple("she he they we I someone everyone nobody".split()),
    "PRON_OBJ": tuple("him her them us me".split()),
}
_DETS = ("the", "a", "this", "every")


def _det(rng: random.Random, next_word: str) -> str:
    det = rng.choice(_DETS)
    return "an" if det == "a" and next_word[0] in "aeiou" else det


def _np(rng: random.Random) -> list[tuple[str, str]]:
    adjs = [(w, "ADJ") for w in rng.sample(LEXICON["ADJ"], rng.choice((0, 0, 1, 1, 2)))]
    noun = rng.choice(LEXICON["NOUN"])
    first = adjs[0][0] if adjs else noun
    return [(_det(rng, first), "DET"), *adjs, (noun, "NOUN")]


def _pron(kind: str, rng: random.Random) -> list[tuple[str, str]]:
    return [(rng.choice(LEXICON[kind]), "PRON")]


def _pp(rng: random.Random) -> list[tuple[str, str]]:
    obj = _pron("PRON_OBJ", rng) if rng.random() < 0.35 else _np(rng)
    return [(rng.choice(LEXICON["ADP"]), "ADP"), *obj]


def _clause(rng: random.Random, adverb_used: bool) -> tuple[list[tuple[str, str]], bool]:
    words = _pron("PRON_SUBJ", rng) if rng.random() < 0.4 else _np(rng)
    adv_slot = rng.choice(("none", "pre", "post")) if not adverb_used else "none"
    if adv_slot == "pre":
        words.append((rng.choice(LEXICON["ADV"]), "ADV"))
    words.append((rng.choice(LEXICON["VERB"]), "VERB"))
    words += _pron("PRON_OBJ", rng) if rng.random() < 0.3 else _np(rng)
    if rng.random() < 0.5:
        words += _pp(rng)
    if adv_slot == "post":
        words.append((rng.choice(LEXICON["ADV"]), "ADV"))
    return words, adverb_used or adv_slot != "none"


def generate_sentence(rng: random.Random) -> TaggedSentence:
    """One random sentence with its gold UPOS tags (it may lack some tags; callers filter)."""
    words: list[tuple[str, str]] = []
    opener = rng.choice(("none", "none", "adverb", "pp"))
    if opener == "adverb":
        words += [(rng.choice(LEXICON["ADV"]), "ADV"), (",", "PUNCT")]
    elif opener == "pp":
        words += [*_pp(rng), (",", "PUNCT")]
    clause, adverb_used = _clause(rng, opener == "adverb")
    words += clause
    if rng.random() < 0.45:
        clause, adverb_used = _clause(rng, adverb_used)
        words += [("and", "CCONJ"), *clause]
    if rng.random() < 0.3:
        words += _pp(rng)
    words.append((".", "PUNCT"))
    first, tag = words[0]
    if first != "I":
        words[0] = (first[0].upper() + first[1:], tag)
    return tuple(words)
