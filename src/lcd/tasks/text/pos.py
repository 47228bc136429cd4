"""Part-of-speech ICL (PAPER.md §4): answer the FIRST word of the sentence that has the hidden tag.

Concepts: Noun, Adjective, Verb, Adverb, Preposition, Pronoun. Only sentences containing all six are
kept; Null answers a random (non-punctuation) word of the sentence. Sentences are split 80/20 into
train and test (seeded; duplicates removed first, so no sentence is in both).

Two sources:
- ``generated`` (default, offline): :mod:`lcd.tasks.text.pos_grammar`, whose tags are gold by construction.
- a CoNLL-U file (Universal Dependencies) via ``conllu_path``. UPOS is mapped to the six concepts by
  :data:`UPOS_TO_CONCEPT`: NOUN and PROPN -> Noun (Penn Treebank's NN* tags include proper nouns),
  ADJ -> Adjective, VERB -> Verb (AUX, i.e. auxiliaries and copulas, is *not* a Verb: UD separates
  them and "is"/"has" would otherwise be the first verb of most sentences), ADV -> Adverb,
  ADP -> Preposition, PRON -> Pronoun (UD tags possessives such as "his" PRON too). Every other UPOS
  has no concept. Multiword-token ranges (``3-4``) and empty nodes (``5.1``) are skipped. Pass
  ``upos_map`` to change the mapping.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from lcd.tasks.text.pos_grammar import generate_sentence
from lcd.tasks.text.prompts import Split, TextICLTask

__all__ = ["POS_CONCEPTS", "UPOS_TO_CONCEPT", "POSSentence", "POSTask", "read_conllu"]

POS_CONCEPTS = ["Noun", "Adjective", "Verb", "Adverb", "Preposition", "Pronoun"]
UPOS_TO_CONCEPT: dict[str, str] = {
    "NOUN": "Noun",
    "PROPN": "Noun",
    "ADJ": "Adjective",
    "VERB": "Verb",
    "ADV": "Adverb",
    "ADP": "Preposition",
    "PRON": "Pronoun",
}
_PUNCT = {"PUNCT", "SYM"}


@dataclass(frozen=True)
class POSSentence:
    """A sentence with its words and their concept ids.

    Attributes:
        text: The sentence as shown in prompts.
        words: Its words (punctuation excluded), in order.
        tags: Concept id of each word (index into :data:`POS_CONCEPTS`), -1 for none.

    """

    text: str
    words: tuple[str, ...]
    tags: tuple[int, ...]

    def first(self, concept: int) -> str | None:
        """The first word with ``concept``, or ``None``."""
        return next((w for w, t in zip(self.words, self.tags, strict=True) if t == concept), None)

    @property
    def has_all_concepts(self) -> bool:
        """Whether every one of the six concepts occurs."""
        return set(range(len(POS_CONCEPTS))) <= set(self.tags)


def _sentence(tokens: list[tuple[str, str, bool]], upos_map: dict[str, str], text: str | None = None) -> POSSentence:
    """Build from (form, UPOS, space_after) tokens."""
    ids = {name: i for i, name in enumerate(POS_CONCEPTS)}
    words = [(form, ids.get(upos_map.get(upos, ""), -1)) for form, upos, _ in tokens if upos not in _PUNCT]
    if text is None:
        text = "".join(form + (" " if space else "") for form, _, space in tokens).strip()
    return POSSentence(text, tuple(w for w, _ in words), tuple(t for _, t in words))


_CONLLU_OPTION = "--data.init_args.task.init_args.conllu_path"


def _conllu_lines(path: Path) -> list[str]:
    """The file's lines, decoded as UTF-8 (a leading byte-order mark is dropped).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: at the first byte that is not UTF-8, with its line and column.

    """
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise FileNotFoundError(
            f"CoNLL-U file {path}{where} not found: point {_CONLLU_OPTION} at a .conllu file "
            "(e.g. Universal Dependencies' en_ewt-ud-train.conllu)."
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1  # 1-based, in bytes
        raise ValueError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column}); convert the file "
            f"to UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > {path.with_suffix('.utf8.conllu')}"
        ) from None
    return text.splitlines()


def read_conllu(path: str | Path, upos_map: dict[str, str] | None = None) -> list[POSSentence]:
    """Read every sentence of a CoNLL-U file (UTF-8, with or without a BOM), tags mapped by ``upos_map``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not UTF-8 or a token line does not have the 10 CoNLL-U columns
            (the message starts with ``<file>:<line>:``).

    """
    path = Path(path)
    lines = _conllu_lines(path)
    upos_map = UPOS_TO_CONCEPT if upos_map is None else upos_map
    sentences: list[POSSentence] = []
    tokens: list[tuple[str, str, bool]] = []
    text: str | None = None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            if tokens:
                sentences.append(_sentence(tokens, upos_map, text))
            tokens, text = [], None
        elif line.startswith("#"):
            if line.startswith("# text ="):
                text = line.split("=", 1)[1].strip()
        else:
            cols = line.split("\t")
            if len(cols) != 10:
                hint = " (spaces instead of tabs?)" if len(cols) < 10 and len(line.split()) >= 10 else ""
                raise ValueError(f"{path}:{lineno}: expected 10 tab-separated CoNLL-U columns, got {len(cols)}{hint}.")
            if "-" in cols[0] or "." in cols[0]:  # multiword-token range or empty node
                continue
            tokens.append((cols[1], cols[3], "SpaceAfter=No" not in cols[9]))
    if tokens:
        sentences.append(_sentence(tokens, upos_map, text))
    return sentences


def _render(tagged: tuple[tuple[str, str], ...]) -> str:
    out = ""
    for word, tag in tagged:
        out += word if tag == "PUNCT" or not out else " " + word
    return out


def generated_sentences(n: int, seed: int, max_words: int = 20) -> list[POSSentence]:
    """``n`` distinct grammar sentences with all six concepts and at most ``max_words`` words (seeded)."""
    rng = random.Random(f"pos-grammar/{seed}")
    seen: dict[str, POSSentence] = {}
    for _ in range(100 * n):
        tagged = generate_sentence(rng)
        s = _sentence([(w, t, True) for w, t in tagged], UPOS_TO_CONCEPT, _render(tagged))
        if s.has_all_concepts and len(s.words) <= max_words and s.text not in seen:
            seen[s.text] = s
            if len(seen) == n:
                return list(seen.values())
    raise RuntimeError(f"the grammar produced only {len(seen)} distinct sentences with all six tags.")


class POSTask(TextICLTask):
    """First word with a hidden part of speech; generated sentences by default, or a CoNLL-U corpus.

    Args:
        conllu_path: A CoNLL-U file (UTF-8) to read instead of generating sentences. It is read and checked
            when the task is built, so a missing or malformed file fails before any model loads.
        n_sentences: Sentences to use (generated, or the first ones kept from the corpus after the
            all-six filter and shuffling); ``None`` keeps every corpus sentence.
        test_fraction: Share of sentences in the test split (the paper's 0.2).
        upos_map: UPOS -> concept name, for CoNLL-U input (default :data:`UPOS_TO_CONCEPT`).
        seed: Seed of generation, shuffling and the split.

    """

    def __init__(
        self,
        conllu_path: str | None = None,
        n_sentences: int | None = 1000,
        test_fraction: float = 0.2,
        upos_map: dict[str, str] | None = None,
        seed: int = 0,
    ) -> None:
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
        if n_sentences is not None and n_sentences < 20:
            raise ValueError(f"n_sentences must be >= 20 (or None for a whole corpus), got {n_sentences}.")
        if upos_map is not None and not set(upos_map.values()) <= set(POS_CONCEPTS):
            raise ValueError(f"upos_map values must be among {POS_CONCEPTS}, got {sorted(set(upos_map.values()))}.")
        if conllu_path is None and n_sentences is None:
            raise ValueError("generated sentences need n_sentences.")
        self.conllu_path, self.n_sentences, self.test_fraction = conllu_path, n_sentences, test_fraction
        self.upos_map, self.seed = upos_map, seed
        self._splits: dict[str, list[POSSentence]] | None = None
        self._corpus: list[POSSentence] | None = None
        if conllu_path is not None:  # read and check the corpus now: before a model is loaded for it
            unique = {s.text: s for s in read_conllu(conllu_path, self.upos_map) if s.has_all_concepts}
            self._corpus = list(unique.values())
            if len(self._corpus) < 20:
                raise ValueError(
                    f"{conllu_path} has only {len(self._corpus)} distinct sentences with all six tags "
                    f"({', '.join(POS_CONCEPTS)}); need 20: pass a larger corpus."
                )

    @property
    def concept_names(self) -> list[str]:
        """Noun, Adjective, Verb, Adverb, Preposition, Pronoun."""
        return list(POS_CONCEPTS)

    @property
    def concept_descriptions(self) -> list[str]:
        """E.g. ``"the first noun of the sentence"``."""
        return [f"the first {name.lower()} of the sentence" for name in POS_CONCEPTS]

    def _load(self) -> dict[str, list[POSSentence]]:
        if self.conllu_path is None:
            sentences = generated_sentences(self.n_sentences, self.seed)
        else:
            sentences = list(self._corpus)
            random.Random(f"pos-corpus/{self.seed}").shuffle(sentences)
            sentences = sentences[: self.n_sentences] if self.n_sentences is not None else sentences
        random.Random(f"pos-split/{self.seed}").shuffle(sentences)
        n_test = max(1, round(self.test_fraction * len(sentences)))
        return {"test": sentences[:n_test], "train": sentences[n_test:]}

    def split_items(self, split: Split) -> list[POSSentence]:
        """Sentences of the split (loaded or generated on first use)."""
        if self._splits is None:
            self._splits = self._load()
        return self._splits[split]

    def format_input(self, item: POSSentence) -> str:
        """The sentence."""
        return item.text

    def answer(self, item: POSSentence, concept: int) -> str:
        """The first word tagged ``concept``."""
        word = item.first(concept)
        if word is None:
            raise ValueError(f"sentence {item.text!r} has no {POS_CONCEPTS[concept]}.")
        return word

    def null_answer(self, item: POSSentence, rng: random.Random) -> str:
        """A uniformly random word of the sentence."""
        return rng.choice(item.words)
