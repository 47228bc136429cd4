"""Natural ICL tasks: correct answers, all six tags, disjoint splits, Null semantics, the template, batching."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest
import torch
from tiny_lm import byte_tokenizer

from lcd.data.text import ICLTextDataModule, encode_prompts
from lcd.tasks import BitwiseTask, POSTask, PromptTemplate, make_prompts
from lcd.tasks.text.pos import POS_CONCEPTS, read_conllu
from lcd.tasks.text.pos_grammar import LEXICON, generate_sentence

# --- bitwise -----------------------------------------------------------------------------------------


def test_bitwise_answers_match_python_operators():
    task = BitwiseTask()
    assert task.answer((0b01101, 0b10110), task.concept_names.index("AND")) == "00100"
    ops = {
        "AND": lambda a, b: a & b,
        "NAND": lambda a, b: 31 - (a & b),
        "OR": lambda a, b: a | b,
        "NOR": lambda a, b: 31 - (a | b),
        "XOR": lambda a, b: a ^ b,
        "XNOR": lambda a, b: 31 - (a ^ b),
    }
    for a in range(32):
        for b in range(0, 32, 3):
            for c, name in enumerate(task.concept_names):
                out = task.answer((a, b), c)
                assert len(out) == 5 and int(out, 2) == ops[name](a, b)
    assert task.format_input((5, 31)) == "00101 11111"


def test_bitwise_splits_are_disjoint_seeded_and_complete():
    task = BitwiseTask(n_test_pairs=100, seed=3)
    train, test = set(task.split_items("train")), set(task.split_items("test"))
    assert len(test) == 100 and len(train) == 1024 - 100 and not train & test
    assert task.split_items("test") == BitwiseTask(n_test_pairs=100, seed=3).split_items("test")
    assert task.split_items("test") != BitwiseTask(n_test_pairs=100, seed=4).split_items("test")


def test_bitwise_rejects_bad_settings():
    with pytest.raises(ValueError, match="operations"):
        BitwiseTask(operations=["AND", "ADD"])
    with pytest.raises(ValueError, match="n_test_pairs"):
        BitwiseTask(n_test_pairs=2000)


# --- POS ---------------------------------------------------------------------------------------------


def test_lexicon_categories_are_disjoint():
    seen: dict[str, str] = {}
    for tag, words in LEXICON.items():
        for w in words:
            assert w not in seen, f"{w} is both {seen[w]} and {tag}"
            seen[w] = tag


def test_pos_sentences_have_all_tags_and_first_word_answers():
    task = POSTask(corpus="generated", n_sentences=300)
    for s in task.split_items("train") + task.split_items("test"):
        assert s.has_all_concepts and len(s.words) == len(s.tags)
        for c in range(6):
            answer = task.answer(s, c)
            assert answer == s.words[s.tags.index(c)] and answer in s.text


def test_grammar_tags_are_the_lexicon_categories():
    upos = {w.lower(): ("PRON" if cat.startswith("PRON") else cat) for cat, ws in LEXICON.items() for w in ws}
    upos.update({"the": "DET", "a": "DET", "an": "DET", "this": "DET", "every": "DET", "and": "CCONJ"})
    rng = random.Random(0)
    for _ in range(300):
        for word, tag in generate_sentence(rng):
            assert tag == "PUNCT" if word in ",." else upos[word.lower()] == tag


def test_first_word_of_each_tag_sits_at_many_positions():
    task = POSTask(corpus="generated", n_sentences=500)
    positions = defaultdict(set)
    for s in task.split_items("train"):
        for c in range(6):
            positions[POS_CONCEPTS[c]].add(s.tags.index(c))
    for name, pos in positions.items():
        assert len(pos) >= 8, f"{name} first occurs only at {sorted(pos)}"


def test_pos_split_is_80_20_disjoint_and_seeded():
    task = POSTask(corpus="generated", n_sentences=500, seed=1)
    train, test = task.split_items("train"), task.split_items("test")
    assert (len(train), len(test)) == (400, 100)
    assert not {s.text for s in train} & {s.text for s in test}
    assert [s.text for s in test] == [
        s.text for s in POSTask(corpus="generated", n_sentences=500, seed=1).split_items("test")
    ]


CONLLU = """# text = She quickly read the old book in Paris.
1\tShe\tshe\tPRON\t_\t_\t3\tnsubj\t_\t_
2\tquickly\tquickly\tADV\t_\t_\t3\tadvmod\t_\t_
3\tread\tread\tVERB\t_\t_\t0\troot\t_\t_
4\tthe\tthe\tDET\t_\t_\t6\tdet\t_\t_
5\told\told\tADJ\t_\t_\t6\tamod\t_\t_
6\tbook\tbook\tNOUN\t_\t_\t3\tobj\t_\t_
7\tin\tin\tADP\t_\t_\t8\tcase\t_\t_
8\tParis\tParis\tPROPN\t_\t_\t3\tobl\t_\tSpaceAfter=No
9\t.\t.\tPUNCT\t_\t_\t3\tpunct\t_\t_

1\tIt\tit\tPRON\t_\t_\t2\tnsubj\t_\t_
2-3\twon't\t_\t_\t_\t_\t_\t_\t_\t_
2\two\twill\tAUX\t_\t_\t5\taux\t_\t_
3\tn't\tnot\tPART\t_\t_\t5\tadvmod\t_\t_
3.1\tgo\tgo\tVERB\t_\t_\t_\t_\t_\t_
4\tParis\tParis\tPROPN\t_\t_\t5\tnsubj\t_\tSpaceAfter=No
5\trains\train\tVERB\t_\t_\t0\troot\t_\tSpaceAfter=No
6\t.\t.\tPUNCT\t_\t_\t5\tpunct\t_\t_

"""


def test_conllu_reader_maps_upos_and_skips_ranges_and_empty_nodes(tmp_path):
    path = tmp_path / "toy.conllu"
    path.write_text(CONLLU)
    first, second = read_conllu(path)
    assert first.text == "She quickly read the old book in Paris."
    assert first.has_all_concepts
    assert [first.first(c) for c in range(6)] == ["book", "old", "read", "quickly", "in", "She"]
    assert second.words == ("It", "wo", "n't", "Paris", "rains")  # no range token, no empty node
    assert second.first(POS_CONCEPTS.index("Verb")) == "rains"  # AUX "wo" is not a Verb
    assert second.first(0) == "Paris"  # PROPN -> Noun
    assert second.text == "It wo n't Parisrains."  # rebuilt from forms honouring SpaceAfter=No


def test_conllu_task_filters_and_fails_clearly(tmp_path):
    path = tmp_path / "toy.conllu"
    path.write_text(CONLLU)
    with pytest.raises(ValueError, match="only 1 distinct sentences with all six tags"):
        POSTask(conllu_path=str(path), sentence_rule="all_tags")
    with pytest.raises(ValueError, match="only 2 distinct sentences with a word"):
        POSTask(conllu_path=str(path))
    with pytest.raises(FileNotFoundError, match="not found"):
        POSTask(conllu_path=str(tmp_path / "missing.conllu"))
    bad = tmp_path / "bad.conllu"
    bad.write_text("1\tShe\tPRON\n")
    with pytest.raises(ValueError, match="10 tab-separated"):
        read_conllu(bad)


# --- prompts -----------------------------------------------------------------------------------------


def test_template_is_exact():
    text = PromptTemplate().build([("01101 10110", "00100")], "11100 00111")
    assert text == "Input: 01101 10110\nOutput: 00100\n\nInput: 11100 00111\nOutput:"
    named = PromptTemplate().build([], "x", description="bitwise AND of the two numbers")
    assert named == "Task: bitwise AND of the two numbers\n\nInput: x\nOutput:"


def test_template_separator_must_end_the_answer_line():
    with pytest.raises(ValueError, match="separator must start with"):
        PromptTemplate(separator=" | ")  # answers would never end in a line break: generation could not stop


def _parse(text: str) -> tuple[list[tuple[str, str]], str]:
    blocks = text.split("\n\n")
    demos = [tuple(line.split(": ", 1)[1] for line in b.split("\n")) for b in blocks[:-1]]
    return demos, blocks[-1].split("\n")[0].split(": ", 1)[1]


@pytest.mark.parametrize("task", [BitwiseTask(), POSTask(corpus="generated", n_sentences=200)], ids=["bitwise", "pos"])
def test_demos_and_query_share_the_concept(task):
    items = {task.format_input(x): x for x in task.split_items("train") + task.split_items("test")}
    test_inputs = {task.format_input(x) for x in task.split_items("test")}
    prompts = make_prompts(task, n_shots=4, n_per_concept=10, split="test", seed=0)
    assert Counter(p.concept for p in prompts) == dict.fromkeys(range(task.n_concepts + 1), 10)
    for p in prompts:
        demos, query = _parse(p.text)
        assert len(demos) == 4 and query == p.query and query in test_inputs
        assert p.target == " " + p.answer + "\n" and p.text.endswith("Output:")
        assert not {x for x, _ in demos} & test_inputs and len({x for x, _ in demos} | {query}) == 5
        if p.concept < task.n_concepts:
            assert all(task.answer(items[x], p.concept) == y for x, y in demos)
            assert p.answer == task.answer(items[query], p.concept)


def test_null_prompts_are_built_the_same_way_without_a_concept():
    task = BitwiseTask()
    items = {task.format_input(x): x for x in task.split_items("train")}
    null = make_prompts(task, 4, 50, concepts=[task.null_id])
    consistent = 0
    for p in null:
        demos, _ = _parse(p.text)
        assert all(len(y) == 5 and set(y) <= {"0", "1"} for _, y in demos)
        consistent += any(all(task.answer(items[x], c) == y for x, y in demos) for c in range(6))
    assert consistent <= 2  # random answers almost never follow one operation on 4 demos
    pos = POSTask(corpus="generated", n_sentences=200)
    for p in make_prompts(pos, 2, 20, concepts=[pos.null_id]):
        demos, query = _parse(p.text)
        assert p.answer in query.replace(".", " ").replace(",", " ").split()
        assert all(y in x.replace(".", " ").replace(",", " ").split() for x, y in demos)


def test_prompts_are_seeded_and_share_queries_across_shot_counts():
    task = BitwiseTask()
    one, ten = make_prompts(task, 1, 5, seed=7), make_prompts(task, 10, 5, seed=7)
    assert [p.query for p in one] == [p.query for p in ten]
    assert [p.text for p in one] == [p.text for p in make_prompts(task, 1, 5, seed=7)]
    assert [p.text for p in one] != [p.text for p in make_prompts(task, 1, 5, seed=8)]
    with pytest.raises(ValueError, match="out of range"):
        make_prompts(task, 1, 5, concepts=[9])


# --- tokenized batches ---------------------------------------------------------------------------------


def test_encode_prompts_left_pads_and_masks_labels_to_the_answer():
    tok = byte_tokenizer()
    prompts = make_prompts(POSTask(corpus="generated", n_sentences=100), 1, 2, concepts=[0, 5])
    batch = encode_prompts(tok, prompts, with_answers=True)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert (mask[:, -1] == 1).all() and (ids[mask == 0] == tok.pad_token_id).all()
    for i, p in enumerate(prompts):
        kept = labels[i][labels[i] != -100]
        assert tok.decode(kept) == p.answer + "\n"  # the loss sees the answer and the line break ending it...
        q = batch["query_position"][i]
        # ...and the byte tokenizer's bare leading space token moved to the prompt, sequence unchanged
        assert tok.decode(ids[i, : q + 1][mask[i, : q + 1] == 1], skip_special_tokens=True) == p.text + " "
        assert tok.decode(ids[i][mask[i] == 1], skip_special_tokens=True) == p.text + p.target
        assert (labels[i, : q + 1] == -100).all()
        assert batch["first_answer_id"][i] == kept[0]  # what the query predicts: the first label token
    plain = encode_prompts(tok, prompts)
    assert torch.equal(plain["first_answer_id"], batch["first_answer_id"])
    assert "labels" not in plain and (plain["query_position"] == plain["input_ids"].shape[1] - 1).all()
    assert torch.equal(batch["concept"], torch.tensor([0, 0, 5, 5]))
    with pytest.raises(ValueError, match="max_length"):
        encode_prompts(tok, prompts, max_length=10)


def test_datamodule_serves_eval_train_and_probe_batches():
    dm = ICLTextDataModule(BitwiseTask(), eval_shots=[1, 4], n_per_concept=3, n_train=12, batch_size=4)
    with pytest.raises(RuntimeError, match="tokenizer"):
        dm.val_dataloader()
    dm.set_tokenizer(byte_tokenizer())
    loaders = dm.val_dataloader()
    assert [next(iter(dl))["n_shots"] for dl in loaders] == [1, 4]
    assert sum(len(b["answers"]) for b in loaders[0]) == 3 * 7
    train = list(dm.train_dataloader())
    assert sum(len(b["answers"]) for b in train) == 12 and all("labels" in b for b in train)
    assert all((b["concept"] < 6).all() for b in train)  # no Null in training
    probe = next(iter(dm.probe_dataloader(2)))
    assert "labels" in probe and dm.concept_names[-1] == "Null" and len(dm.concept_names) == 7


def test_answer_tokens_stay_put_when_the_answer_starts_with_content():
    tok = byte_tokenizer()
    prompts = make_prompts(BitwiseTask(), 1, 1, concepts=[0], template=PromptTemplate(answer_prefix=""))
    batch = encode_prompts(tok, prompts, with_answers=True)
    q = int(batch["query_position"][0])
    assert tok.decode(batch["input_ids"][0, q]) == ":"  # the prompt still ends at "Output:"
    assert tok.decode(batch["labels"][0, q + 1 :]) == prompts[0].answer + "\n"
    assert batch["first_answer_id"][0] == batch["labels"][0, q + 1]
