"""POS on real text: the shipped UD English EWT corpus, the two sentence rules, pool counts and refusals, configs."""

from __future__ import annotations

import fnmatch
import tomllib
from collections import Counter
from importlib import resources

import pytest
from conftest import ROOT, config
from tiny_lm import save_tiny_lm

from lcd.cli import main, make_cli
from lcd.data.text import ICLTextDataModule
from lcd.models.hf import CausalLMSpec
from lcd.tasks import BitwiseTask, POSTask, make_prompts
from lcd.tasks.text import pos as pos_module
from lcd.tasks.text.pos import CORPORA, POS_CONCEPTS, UPOS_TO_CONCEPT, shipped_corpus_path

CORPUS_DIR = "corpora/ud_english_ewt"
RULE_OPTION = "--data.init_args.task.init_args.sentence_rule"


def direct_counts() -> dict[str, Counter]:
    """Count the shipped file without lcd's reader: distinct texts with a word, per concept, with all six tags."""
    text = shipped_corpus_path("ud_english_ewt").read_text(encoding="utf-8")
    seen: set[str] = set()
    counts: dict[str, Counter] = {"own_tag": Counter(), "all_tags": Counter()}
    n_blocks = 0
    for block in text.strip().split("\n\n"):
        n_blocks += 1
        lines = block.splitlines()
        (sentence,) = [line[len("# text = ") :].strip() for line in lines if line.startswith("# text = ")]
        rows = [line.split("\t") for line in lines if line[:1].isdigit()]
        upos = [r[3] for r in rows if r[0].isdigit()]  # no ranges (3-4), no empty nodes (5.1)
        if sentence in seen or not set(upos) - {"PUNCT", "SYM"}:
            continue
        seen.add(sentence)
        concepts = {UPOS_TO_CONCEPT[u] for u in upos if u in UPOS_TO_CONCEPT}
        counts["own_tag"].update(concepts | {"Null"})
        if concepts == set(POS_CONCEPTS):
            counts["all_tags"].update([*POS_CONCEPTS, "Null"])
    counts["own_tag"]["_blocks"] = n_blocks
    return counts


@pytest.fixture(scope="module")
def tasks() -> dict[str, POSTask]:
    return {rule: POSTask(sentence_rule=rule) for rule in ("own_tag", "all_tags")}


def test_the_corpus_ships_in_the_package_with_its_license_and_attribution():
    root = resources.files("lcd.tasks.text").joinpath(CORPUS_DIR)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["LICENSE.txt", "README.md", "en_ewt-ud-dev.conllu"]
    assert "Attribution-ShareAlike 4.0 International" in root.joinpath("LICENSE.txt").read_text()
    readme = root.joinpath("README.md").read_text()
    assert "Leland" in readme and "Stanford" in readme and "LDC2012T13" in readme and "How lcd uses it" in readme
    assert CORPORA["ud_english_ewt"] == f"{CORPUS_DIR}/en_ewt-ud-dev.conllu"
    # a wheel (non-editable install) takes the files that package-data names for lcd.tasks.text
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert all(any(fnmatch.fnmatch(f"{CORPUS_DIR}/{n}", g) for g in globs["lcd.tasks.text"]) for n in names)


def test_pool_sizes_match_a_direct_count_of_the_file(tasks):
    direct = direct_counts()
    assert direct["own_tag"]["_blocks"] == 2001  # the README's sentence count
    for rule, task in tasks.items():
        sizes = task.pool_sizes()
        assert list(sizes) == [*POS_CONCEPTS, "Null"]
        for name, n in sizes.items():
            assert n["train"] + n["test"] == direct[rule][name], (rule, name)
        n_kept = direct[rule]["Null"]
        assert sizes["Null"]["test"] == round(0.2 * n_kept)  # the 80/20 split of the kept sentences
    assert tasks["all_tags"].pool_sizes()["Noun"] == tasks["all_tags"].pool_sizes()["Null"]  # one pool for all
    # the default rule gives every class of the shipped corpus 100 distinct test queries (the paper's n_per_concept)
    assert min(n["test"] for n in tasks["own_tag"].pool_sizes().values()) >= 100
    assert min(n["test"] for n in tasks["all_tags"].pool_sizes().values()) < 100
    assert POSTask().sentence_rule == "own_tag" and POSTask().pool_sizes() == tasks["own_tag"].pool_sizes()


def test_train_and_test_sentences_are_disjoint_and_pools_hold_their_tag(tasks):
    for rule, task in tasks.items():
        train, test = task.split_items("train"), task.split_items("test")
        assert not {s.text for s in train} & {s.text for s in test}
        assert len({s.text for s in train + test}) == len(train) + len(test)  # duplicates were dropped
        for split, items in (("train", train), ("test", test)):
            for c in range(len(POS_CONCEPTS)):
                pool = task.concept_items(split, c)
                assert pool == [s for s in items if c in s.tags], (rule, split, c)
            assert task.concept_items(split, task.null_id) == items and all(s.words for s in items)
            if rule == "all_tags":
                assert all(s.has_all_concepts for s in items)
    assert len(tasks["own_tag"].split_items("test")) > len(tasks["all_tags"].split_items("test"))


def _parse(text: str) -> tuple[list[tuple[str, str]], str]:
    blocks = text.split("\n\n")
    demos = [tuple(line.split(": ", 1)[1] for line in b.split("\n")) for b in blocks[:-1]]
    return demos, blocks[-1].split("\n")[0].split(": ", 1)[1]


@pytest.mark.parametrize("rule,n", [("own_tag", 100), ("all_tags", 50)])
def test_prompts_query_a_sentence_with_the_tag_and_answer_its_first_word(tasks, rule, n):
    task = tasks[rule]
    train = {s.text: s for s in task.split_items("train")}
    test = {s.text: s for s in task.split_items("test")}
    prompts = make_prompts(task, n_shots=4, n_per_concept=n, split="test", seed=0)
    assert Counter(p.concept for p in prompts) == dict.fromkeys(range(7), n)
    for c in range(7):
        assert len({p.query for p in prompts if p.concept == c}) == n  # distinct queries within a class
    for p in prompts:
        demos, query = _parse(p.text)
        sentence = test[query]
        assert {x for x, _ in demos} <= train.keys() and len(demos) == 4
        if p.concept == task.null_id:
            assert p.answer in sentence.words
            continue
        assert p.concept in sentence.tags
        assert p.answer == sentence.words[sentence.tags.index(p.concept)]  # the FIRST word with the tag
        for x, y in demos:
            assert p.concept in train[x].tags and y == train[x].words[train[x].tags.index(p.concept)]


def test_the_rules_agree_on_generated_sentences_and_bitwise_keeps_one_pool():
    own = POSTask(corpus="generated", n_sentences=200)
    every = POSTask(corpus="generated", n_sentences=200, sentence_rule="all_tags")
    assert own.pool_sizes() == every.pool_sizes() == dict.fromkeys(own.label_names, {"train": 160, "test": 40})
    assert [p.text for p in make_prompts(own, 2, 5)] == [p.text for p in make_prompts(every, 2, 5)]
    bitwise = BitwiseTask(n_test_pairs=100)
    assert bitwise.pool_sizes() == dict.fromkeys(bitwise.label_names, {"train": 924, "test": 100})


def test_building_the_task_logs_the_pool_table(monkeypatch):
    logged: list[str] = []
    monkeypatch.setattr(pos_module, "rank_zero_info", logged.append)
    task = POSTask(sentence_rule="all_tags")
    assert logged == [task.pool_table()]
    lines = logged[0].splitlines()
    assert "ud_english_ewt" in lines[0] and "all_tags" in lines[0] and lines[1].split() == ["class", "train", "test"]
    rows = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in lines[2:]}
    assert rows == {name: [n["train"], n["test"]] for name, n in task.pool_sizes().items()}


def test_too_few_sentences_are_refused_with_the_class_count_split_and_fix(tasks):
    sizes = tasks["all_tags"].pool_sizes()
    with pytest.raises(ValueError) as err:
        ICLTextDataModule(tasks["all_tags"], n_per_concept=100)
    assert str(err.value) == (
        f"POSTask: Noun has {sizes['Noun']['test']} test sentences, too few for 100 prompts with distinct "
        "queries: set the task's sentence_rule: own_tag (a prompt's sentences need only contain its own tag), "
        "ask for fewer prompts per concept (data n_per_concept) or fewer shots, or use a larger corpus "
        "(the task's conllu_path)."
    )
    ICLTextDataModule(tasks["all_tags"], n_per_concept=sizes["Noun"]["test"])  # exactly enough
    own = tasks["own_tag"].pool_sizes()
    n = own["Adjective"]["test"] + 1  # one more than the second-largest concept pool (Noun is the largest)
    first_short = next(name for name, s in own.items() if s["test"] < n)
    with pytest.raises(ValueError, match=f"^POSTask: {first_short} has {own[first_short]['test']} test sentences"):
        ICLTextDataModule(tasks["own_tag"], n_per_concept=n)
    with pytest.raises(ValueError, match=f"^POSTask: Null has {own['Null']['test']} test sentences"):
        tasks["own_tag"].check_pools(own["Null"]["test"] + 1, 4, concepts=[tasks["own_tag"].null_id])


def _toy_conllu(tmp_path, n_with_adverb: int, n_other: int = 30):
    rows = [("She", "PRON"), ("read", "VERB"), ("the", "DET"), ("old", "ADJ"), ("book", "NOUN"), ("in", "ADP"),
            ("town", "NOUN")]  # fmt: skip
    blocks = []
    for s in range(n_with_adverb + n_other):
        words = [(f"{w}{s}" if w == "town" else w, t) for w, t in rows] + (
            [("today", "ADV")] if s < n_with_adverb else []
        )
        blocks.append("\n".join(f"{i}\t{w}\t{w}\t{t}\t_\t_\t0\t_\t_\t_" for i, (w, t) in enumerate(words, 1)))
    path = tmp_path / "toy.conllu"
    path.write_text("\n\n".join(blocks) + "\n\n")
    return str(path)


def test_too_few_demonstrations_are_refused(tmp_path):
    task = POSTask(conllu_path=_toy_conllu(tmp_path, n_with_adverb=6))
    assert task.pool_sizes()["Adverb"]["train"] + task.pool_sizes()["Adverb"]["test"] == 6
    n_train = task.pool_sizes()["Adverb"]["train"]
    adverb = POS_CONCEPTS.index("Adverb")
    with pytest.raises(ValueError, match=f"Adverb has {n_train} train sentences, too few for {n_train}-shot prompts"):
        make_prompts(task, n_train, 1, split="train", concepts=[adverb])
    with pytest.raises(ValueError, match=f"Adverb has {n_train} train sentences"):
        ICLTextDataModule(task, eval_shots=[1], train_shots=n_train, n_per_concept=1, eval_split="train")
    make_prompts(task, n_train - 1, 1, split="train")  # one fewer shot works


def test_the_upos_map_override_changes_answers(tmp_path):
    aux_verb = {**UPOS_TO_CONCEPT, "AUX": "Verb"}
    default, override = POSTask(), POSTask(upos_map=aux_verb)
    verb = POS_CONCEPTS.index("Verb")
    assert override.pool_sizes()["Verb"]["test"] > default.pool_sizes()["Verb"]["test"]
    by_text = {s.text: s for s in default.split_items("test")}
    changed = [s for s in override.concept_items("test", verb) if by_text[s.text].first(verb) != s.first(verb)]
    assert changed  # sentences whose first verb is now an auxiliary ("is", "have")
    s = changed[0]
    assert override.answer(s, verb) != (by_text[s.text].first(verb) or "")
    # the YAML example of the module docstring parses and reaches the task
    fragment = tmp_path / "aux.yaml"
    fragment.write_text(pos_module.__doc__.split("in a task YAML::", 1)[1].replace("\n    ", "\n"))
    cli = make_cli([*_configs("configs/llm/tasks/pos.yaml", tmp_path), "--config", str(fragment)], run=False)
    assert cli.datamodule.task.upos_map == aux_verb


def _configs(task_yaml: str, run_dir) -> list[str]:
    yamls = config("configs/llm/probe.yaml", "configs/llm/models/gemma3_270m.yaml", task_yaml, "configs/llm/debug.yaml")
    return [*yamls, f"--trainer.default_root_dir={run_dir}"]


def test_the_ready_configs_instantiate_through_the_cli_without_a_path(tasks, tmp_path):
    cli = make_cli([*_configs("configs/llm/tasks/pos.yaml", tmp_path)], run=False)
    task = cli.datamodule.task
    assert isinstance(task, POSTask) and task.conllu_path is None and task.corpus == "ud_english_ewt"
    assert task.pool_sizes() == tasks["own_tag"].pool_sizes()
    cli = make_cli([*_configs("configs/llm/tasks/pos.yaml", tmp_path), f"{RULE_OPTION}=all_tags"], run=False)
    assert cli.datamodule.task.pool_sizes() == tasks["all_tags"].pool_sizes()
    cli = make_cli([*_configs("configs/llm/tasks/pos_generated.yaml", tmp_path)], run=False)
    assert cli.datamodule.task.corpus == "generated"
    assert cli.datamodule.task.split_items("test") == POSTask(corpus="generated").split_items("test")


def test_the_paper_rule_with_100_prompts_stops_before_the_model_loads(tasks, tmp_path, capsys, monkeypatch):
    def load(self):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(CausalLMSpec, "load", load)
    args = ["validate", *_configs("configs/llm/tasks/pos.yaml", tmp_path), f"{RULE_OPTION}=all_tags"]
    args += ["--data.init_args.n_per_concept=100"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    n_test = tasks["all_tags"].pool_sizes()["Noun"]["test"]
    assert line.startswith(f"lcd: error: POSTask: Noun has {n_test} test sentences, too few for 100 prompts")


def test_conflicting_sources_are_refused():
    with pytest.raises(ValueError, match="corpus: generated and a conllu_path"):
        POSTask(corpus="generated", conllu_path="x.conllu")
    with pytest.raises(ValueError, match="sentence_rule must be"):
        POSTask(sentence_rule="some_tags")


def test_the_ready_config_probes_the_shipped_corpus_end_to_end(tmp_path):
    model_dir = save_tiny_lm(tmp_path / "model", "llama")
    args = ["validate", *_configs("configs/llm/tasks/pos.yaml", tmp_path / "run")]
    main([*args, f"--model.init_args.lm.name={model_dir}"])
    (path,) = (tmp_path / "run").glob("csv/version_*/metrics.csv")
    header = path.read_text().splitlines()[0].split(",")
    for name in [*POS_CONCEPTS, "Null"]:
        assert "probe/shots_04/cd/concept_" + name in header
    assert "probe/shots_01/acc/concept_Adverb" in header
