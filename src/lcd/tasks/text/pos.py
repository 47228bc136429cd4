"""Part-of-speech ICL (PAPER.md §4): answer the FIRST word of the sentence that has the hidden tag.

Concepts: Noun, Adjective, Verb, Adverb, Preposition, Pronoun, and Null, whose answer is a random
(non-punctuation) word of the sentence.

Sources (:class:`POSTask` ``corpus`` / ``conllu_path``):

- ``ud_english_ewt`` (default): the development split of UD English EWT v2.15 (2,001 sentences of web
  text with gold UPOS tags), shipped inside lcd under ``lcd/tasks/text/corpora/ud_english_ewt/`` with
  its license (CC BY-SA 4.0) and attribution, loaded with :mod:`importlib.resources`.
- ``conllu_path``: any CoNLL-U file (Universal Dependencies) instead, e.g. the EWT training split.
- ``generated``: :mod:`lcd.tasks.text.pos_grammar`, a small grammar whose tags are gold by construction
  (every sentence has all six tags).

Sentence rules (``sentence_rule``), after duplicates (same text) and sentences without a word are dropped:

- ``all_tags`` (the paper's): only sentences containing all six tags are kept; every class (Null
  included) draws from the same sentences.
- ``own_tag`` (default): every sentence is kept; a concept's prompts (demonstrations and query) use only
  sentences that contain its tag, Null prompts any sentence. For corpora of short sentences: only 263 of
  the 1,899 distinct EWT dev sentences (with a word) have all six tags, which leaves 53 test sentences
  per concept, too few for the paper's 100 prompts per concept with distinct queries; with ``own_tag``
  every concept has at least 149. Caveat: each class then draws from its own (overlapping) set of
  sentences, and these differ, e.g. in length (EWT dev train pools, mean words per sentence: Noun 12.3,
  Preposition 16.3, Null 11.5; 23.4 under ``all_tags``), so the sentences alone carry a little
  information about the class, which ``all_tags`` rules out.

The kept sentences are shuffled and split ``1 - test_fraction`` / ``test_fraction`` (80/20, seeded)
into train and test, so no sentence is in both; then each class's pool is the sentences of the split
that it may use. Queries come from the test pool, demonstrations from the train pool of the prompt's
class. :meth:`POSTask.pool_sizes` gives the pool sizes and building the task logs them. The shipped
corpus (seed 0; train / test sentences per class)::

    class          own_tag       all_tags
    Noun          1350 / 342    210 / 53
    Adjective      846 / 206    210 / 53
    Verb          1006 / 250    210 / 53
    Adverb         645 / 149    210 / 53
    Preposition    824 / 204    210 / 53
    Pronoun        860 / 218    210 / 53
    Null          1519 / 380    210 / 53

UPOS is mapped to the six concepts by :data:`UPOS_TO_CONCEPT`: NOUN and PROPN -> Noun (Penn
Treebank's NN* tags include proper nouns), ADJ -> Adjective, VERB -> Verb (AUX, i.e. auxiliaries and
copulas, is *not* a Verb: UD separates them and "is"/"has" would otherwise be the first verb of most
sentences), ADV -> Adverb, ADP -> Preposition, PRON -> Pronoun (UD tags possessives such as "his" PRON
too). Every other UPOS has no concept. Multiword-token ranges (``3-4``) and empty nodes (``5.1``) are
skipped. ``upos_map`` replaces the mapping; e.g. to count auxiliaries as verbs, in a task YAML::

    data:
      init_args:
        task:
          init_args:
            upos_map: {NOUN: Noun, PROPN: Noun, ADJ: Adjective, VERB: Verb, AUX: Verb, ADV: Adverb,
                       ADP: Preposition, PRON: Pronoun}
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from lightning.pytorch.utilities import rank_zero_info

from lcd.tasks.text.pos_grammar import generate_sentence
from lcd.tasks.text.prompts import Split, TextICLTask

__all__ = ["CORPORA", "POS_CONCEPTS", "UPOS_TO_CONCEPT", "POSSentence", "POSTask", "read_conllu"]

CORPORA: dict[str, str] = {"ud_english_ewt": "corpora/ud_english_ewt/en_ewt-ud-dev.conllu"}
"""Corpora shipped with lcd: name -> file, relative to the :mod:`lcd.tasks.text` package."""

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


def shipped_corpus_path(name: str) -> resources.abc.Traversable:
    """The file of a corpus shipped with lcd (see :data:`CORPORA`), inside the installed package."""
    return resources.files("lcd.tasks.text").joinpath(CORPORA[name])


SentenceRule = Literal["own_tag", "all_tags"]
_N_GENERATED = 1000  # generated sentences when n_sentences is None
_MIN_SENTENCES = 20


class POSTask(TextICLTask):
    """First word with a hidden part of speech, in sentences of a real treebank (default) or generated ones.

    The corpus is read, filtered, split and counted when the task is built, so a missing or malformed
    file or a corpus too small fails before any model loads; the pool sizes are logged (one table) and
    returned by :meth:`pool_sizes`. See the module docstring for the sources, the sentence rules, the
    UPOS mapping and the counts of the shipped corpus.

    Within a class, evaluation queries are distinct sentences: :class:`~lcd.data.ICLTextDataModule` refuses
    (before any model loads) an ``n_per_concept`` above a class's test pool, naming the class, its count and
    the fix (e.g. ``all_tags`` on the shipped corpus allows at most 53 prompts per concept); a prompt also
    needs more train sentences of its class than shots. Training prompts may reuse a query sentence with
    other demonstrations.

    Args:
        corpus: ``ud_english_ewt``: the shipped UD English EWT dev split; ``generated``: lcd's
            gold-tagged grammar (:mod:`lcd.tasks.text.pos_grammar`).
        conllu_path: Any CoNLL-U file (UTF-8) to read instead of the shipped corpus.
        sentence_rule: ``own_tag``: a concept's prompts use the sentences containing its tag (Null: any
            sentence); ``all_tags``: only sentences with all six tags, for every class (the paper's rule).
        n_sentences: Keep this many of the eligible sentences (a seeded random subset); ``None`` keeps
            every corpus sentence, or generates 1000.
        test_fraction: Share of the kept sentences in the test split (the paper's 0.2).
        upos_map: UPOS -> concept name, for CoNLL-U input (default :data:`UPOS_TO_CONCEPT`).
        seed: Seed of generation, of the subset and of the split.

    Raises:
        ValueError: a setting out of range, or fewer than 20 eligible sentences.
        FileNotFoundError: ``conllu_path`` does not exist.

    """

    def __init__(
        self,
        corpus: Literal["ud_english_ewt", "generated"] = "ud_english_ewt",
        conllu_path: str | None = None,
        sentence_rule: SentenceRule = "own_tag",
        n_sentences: int | None = None,
        test_fraction: float = 0.2,
        upos_map: dict[str, str] | None = None,
        seed: int = 0,
    ) -> None:
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
        if n_sentences is not None and n_sentences < _MIN_SENTENCES:
            raise ValueError(f"n_sentences must be >= {_MIN_SENTENCES} (or None: the whole corpus), got {n_sentences}.")
        if sentence_rule not in ("own_tag", "all_tags"):
            raise ValueError(f"sentence_rule must be 'own_tag' or 'all_tags', got {sentence_rule!r}.")
        if corpus not in ("generated", *CORPORA):
            raise ValueError(f"corpus must be one of {['generated', *CORPORA]}, got {corpus!r}.")
        if upos_map is not None and not set(upos_map.values()) <= set(POS_CONCEPTS):
            raise ValueError(f"upos_map values must be among {POS_CONCEPTS}, got {sorted(set(upos_map.values()))}.")
        if corpus == "generated" and conllu_path is not None:
            raise ValueError(
                "corpus: generated and a conllu_path were both given: drop conllu_path to use generated sentences, "
                "or set corpus: ud_english_ewt (the default) to read the CoNLL-U file."
            )
        if corpus == "generated" and upos_map is not None:
            raise ValueError("upos_map maps CoNLL-U tags and has no effect on corpus: generated: drop it.")
        self.corpus, self.conllu_path, self.sentence_rule = corpus, conllu_path, sentence_rule
        self.n_sentences, self.test_fraction, self.upos_map, self.seed = n_sentences, test_fraction, upos_map, seed
        sentences = self._read()
        n_distinct = len(sentences)
        if sentence_rule == "all_tags":
            sentences = [s for s in sentences if s.has_all_concepts]
        if len(sentences) < _MIN_SENTENCES:
            which = f"with all six tags ({', '.join(POS_CONCEPTS)})" if sentence_rule == "all_tags" else "with a word"
            fix = " or sentence_rule: own_tag" if sentence_rule == "all_tags" else ""
            raise ValueError(
                f"{self.source} has only {len(sentences)} distinct sentences {which}; need {_MIN_SENTENCES}: "
                f"pass a larger corpus{fix}."
            )
        if corpus != "generated" or conllu_path is not None:  # a subset of a corpus (generated ones are already)
            random.Random(f"pos-corpus/{seed}").shuffle(sentences)
            sentences = sentences[:n_sentences] if n_sentences is not None else sentences
        random.Random(f"pos-split/{seed}").shuffle(sentences)
        n_test = max(1, round(test_fraction * len(sentences)))
        self._splits: dict[str, list[POSSentence]] = {"test": sentences[:n_test], "train": sentences[n_test:]}
        self._pools = {  # split -> class id -> the split's sentences that class may use (Null: all of them)
            split: [[s for s in items if c in s.tags] for c in range(len(POS_CONCEPTS))] + [items]
            for split, items in self._splits.items()
        }
        self._n_distinct = n_distinct
        rank_zero_info(self.pool_table())

    @property
    def source(self) -> str:
        """Where the sentences come from, for messages: a file, the shipped corpus or the grammar."""
        if self.conllu_path is not None:
            return str(self.conllu_path)
        return "the generated sentences" if self.corpus == "generated" else f"the shipped corpus {self.corpus}"

    def _read(self) -> list[POSSentence]:
        """Distinct sentences with at least one word, in corpus (or generation) order."""
        if self.conllu_path is None and self.corpus == "generated":
            return generated_sentences(self.n_sentences or _N_GENERATED, self.seed)
        if self.conllu_path is not None:
            read = read_conllu(self.conllu_path, self.upos_map)
        else:
            with resources.as_file(shipped_corpus_path(self.corpus)) as path:
                read = read_conllu(path, self.upos_map)
        unique: dict[str, POSSentence] = {}
        for s in read:
            if s.words:
                unique.setdefault(s.text, s)
        return list(unique.values())

    @property
    def concept_names(self) -> list[str]:
        """Noun, Adjective, Verb, Adverb, Preposition, Pronoun."""
        return list(POS_CONCEPTS)

    @property
    def concept_descriptions(self) -> list[str]:
        """E.g. ``"the first noun of the sentence"``."""
        return [f"the first {name.lower()} of the sentence" for name in POS_CONCEPTS]

    @property
    def input_noun(self) -> str:
        """``"sentences"``."""
        return "sentences"

    @property
    def too_few_advice(self) -> str:
        """Fewer prompts or shots, a larger corpus, or (under ``all_tags``) the ``own_tag`` rule."""
        rule = (
            "set the task's sentence_rule: own_tag (a prompt's sentences need only contain its own tag), "
            if self.sentence_rule == "all_tags"
            else ""
        )
        return (
            f"{rule}ask for fewer prompts per concept (data n_per_concept) or fewer shots, "
            "or use a larger corpus (the task's conllu_path)"
        )

    def split_items(self, split: Split) -> list[POSSentence]:
        """Every kept sentence of the split (the Null pool)."""
        return self._splits[split]

    def concept_items(self, split: Split, concept: int) -> Sequence[POSSentence]:
        """The split's sentences with ``concept``'s tag (all of them for Null, and under ``all_tags``)."""
        return self._pools[split][concept]

    def pool_table(self) -> str:
        """The pool sizes as the short table logged when the task is built."""
        sizes = self.pool_sizes()
        n_train, n_test = len(self._splits["train"]), len(self._splits["test"])
        rule = {
            "own_tag": "own_tag: a concept's prompts use the sentences with its tag, Null any",
            "all_tags": "all_tags: only sentences with all six tags",
        }[self.sentence_rule]
        lines = [
            f"POS sentences from {self.source} ({self._n_distinct} distinct with a word; sentence_rule {rule}; "
            f"kept {n_train} train / {n_test} test): sentences each class can use "
            "(demonstrations from train, queries from test)",
            f"  {'class':<12} {'train':>6} {'test':>6}",
        ]
        lines += [f"  {name:<12} {n['train']:>6} {n['test']:>6}" for name, n in sizes.items()]
        return "\n".join(lines)

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
