"""Data prep: formats and validation, dedup, splits, contamination (into the gate), stats, CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from loragate.registry import InvalidInput, Registry
from loragate.settings import Settings
from loragate.trainer.contamination import check_prepared
from loragate.trainer.dataset import (
    ContaminationReport, DedupReport, Example, Manifest, Message, PreparedDataset, file_sha256, write_examples,
)
from loragate.trainer.dedup import deduplicate
from loragate.trainer.demo_task import QUEUES, SYSTEM, make_task
from loragate.trainer.formats import SourceRow, load_source, read_source
from loragate.trainer.prepare import prepare_dataset
from loragate.trainer.splits import allocate, detect_labels, split_examples
from loragate.trainer.stats import dataset_stats, percentile, token_stats

from .conftest import BASE_ID, run_cli

# A near duplicate pair (the second adds 13 characters to a 102-character text: about 0.88
# Jaccard on 5-grams) and a text that shares a phrase with them but is a different ticket.
TICKET = "My blender stopped working after the firmware update and now the display flashes red every few seconds."
NEAR_TICKET = TICKET + " Please help."
OTHER_TICKET = "My kettle stopped working after I moved house, and the lid no longer closes properly."


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows: dicts become JSON lines, str and bytes are written as they are (bad lines)."""
    with path.open("wb") as handle:
        for row in rows:
            raw = row if isinstance(row, bytes) else (row if isinstance(row, str) else json.dumps(row)).encode()
            handle.write(raw + b"\n")
    return path


def pc(prompt: str, completion: str) -> dict:
    return {"prompt": prompt, "completion": completion}


def user_example(text: str, completion: str = "ok") -> Example:
    return Example(prompt=[Message(role="user", content=text)], completion=completion)


def settings_for(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'r.db'}", user="tester")


# -- formats ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("row", "fmt", "prompt", "completion"), [
    (pc("Route: my card was charged twice", "billing"), "prompt_completion",
     [("user", "Route: my card was charged twice")], "billing"),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "5"}, {"role": "user", "content": "Sure?"},
                   {"role": "assistant", "content": "4"}]}, "messages",
     [("system", "Be brief."), ("user", "2+2?"), ("assistant", "5"), ("user", "Sure?")], "4"),
    ({"instruction": "Translate to French.", "input": "cat", "output": "chat"}, "alpaca",
     [("user", "Translate to French.\n\ncat")], "chat"),
    ({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca", [("user", "Say hi.")], "hi"),
    ({"instruction": "Say hi.", "output": "hi", "id": 7}, "alpaca", [("user", "Say hi.")], "hi"),  # extra field
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
     "prompt_completion", [("user", "q")], "a"),  # trl's conversational form, as prepare writes it
])
def test_each_format_is_detected_and_read(tmp_path, row, fmt, prompt, completion):
    path = write_jsonl(tmp_path / "data.jsonl", [row, row])
    for given in (None, fmt):
        source = load_source(path, given)
        assert source.format == fmt and [r.line for r in source.rows] == [1, 2] and not source.problems
        example = source.rows[0].example
        assert [(m.role, m.content) for m in example.prompt] == prompt and example.completion == completion


def test_format_is_detected_from_the_first_valid_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["{not json", "", {"instruction": "a", "output": "b"}])
    source = read_source(path)
    assert source.format == "alpaca" and [r.line for r in source.rows] == [3]
    assert [(p.line, p.reason.split(":")[0]) for p in source.problems] == [(1, "bad JSON")]


def test_unknown_or_undetectable_format_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "no known fields"}])
    with pytest.raises(InvalidInput, match="cannot detect the format"):
        load_source(path)
    with pytest.raises(InvalidInput, match="unknown format 'sharegpt'"):
        load_source(path, "sharegpt")


GOOD = {"prompt_completion": pc("q", "a"), "alpaca": {"instruction": "q", "output": "a"},
        "messages": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}}


def msgs(*pairs) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


@pytest.mark.parametrize(("fmt", "bad", "reason"), [
    ("prompt_completion", '{"prompt": "q", ',
     "bad JSON: Expecting property name enclosed in double quotes at column 17"),
    ("prompt_completion", b'{"prompt": "\xff", "completion": "a"}', "not UTF-8 text"),
    ("prompt_completion", "[1, 2]", "expected a JSON object, got list"),
    ("prompt_completion", {"prompt": "q"}, "missing field 'completion'"),
    ("prompt_completion", pc("   ", "a"), "field 'prompt' is empty"),
    ("prompt_completion", {"prompt": 3, "completion": "a"}, "field 'prompt' must be a string, got number"),
    ("prompt_completion", {"prompt": "q", "completion": None}, "field 'completion' must be a string, got null"),
    ("prompt_completion", GOOD["alpaca"], "mixed formats: this line is alpaca, the file is prompt_completion"),
    ("alpaca", {"instruction": "q"}, "missing field 'output'"),
    ("alpaca", {"instruction": "q", "input": ["x"], "output": "a"}, "field 'input' must be a string, got list"),
    ("alpaca", {"instruction": "", "output": "a"}, "field 'instruction' is empty"),
    ("alpaca", GOOD["messages"], "mixed formats: this line is messages, the file is alpaca"),
    ("messages", {"messages": "hi"}, "field 'messages' must be a list of messages, got string"),
    ("messages", {"messages": []}, "field 'messages' is empty"),
    ("messages", {"messages": ["hi"]}, "messages[1] must be an object with role and content, got string"),
    ("messages", msgs(("user", "q"), ("tool", "x"), ("assistant", "a")),
     "messages[2] has unknown role 'tool' (expected system, user or assistant)"),
    ("messages", msgs(("user", "q"), ("assistant", "")), "field 'messages[2].content' is empty"),
    ("messages", {"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "a"}]},
     "field 'messages[1].content' must be a string, got number"),
    ("messages", msgs(("user", "q")), "messages must end with an assistant message (the completion)"),
    ("messages", msgs(("assistant", "a")), "messages need a user message before the assistant's answer"),
    ("messages", msgs(("user", "q"), ("system", "s"), ("assistant", "a")),
     "field 'messages': a system message may only come first"),
    ("messages", msgs(("user", "q"), ("assistant", "a"), ("assistant", "b")),
     "field 'messages' must end with a user message before the completion"),
    ("messages", GOOD["prompt_completion"], "mixed formats: this line is prompt_completion, the file is messages"),
])
def test_each_validation_error_is_reported_by_line_number(tmp_path, fmt, bad, reason):
    # Line 2 is blank: line numbers count every line of the file, as an editor shows them.
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD[fmt], "", bad, GOOD[fmt]])
    source = read_source(path)
    assert source.format == fmt and [r.line for r in source.rows] == [1, 4]
    assert [(p.line, p.reason) for p in source.problems] == [(3, reason)]
    with pytest.raises(InvalidInput, match="1 invalid line.* \\(fix them or pass --skip-invalid\\): line 3: "):
        load_source(path)
    assert [r.line for r in load_source(path, skip_invalid=True).rows] == [1, 4]


def test_refusal_lists_the_first_twenty_problems_and_the_total(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD["prompt_completion"]] + [{"prompt": "q"}] * 25)
    with pytest.raises(InvalidInput) as refused:
        load_source(path)
    message = str(refused.value)
    assert "25 invalid line(s)" in message and message.endswith("line 21: missing field 'completion'; and 5 more")
    assert "line 2: missing field" in message and "line 22:" not in message


def test_skip_invalid_prepares_and_records_the_skipped_lines(tmp_path):
    rows = [pc(f"question number {i} about topic {i * 7}", "a") for i in range(30)]
    rows[4], rows[9] = "{oops", {"prompt": "q"}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(InvalidInput, match="2 invalid line"):
        prepare_dataset(path, tmp_path / "out", record=False, settings=settings_for(tmp_path))
    assert not (tmp_path / "out").exists()
    result = prepare_dataset(path, tmp_path / "out", skip_invalid=True, record=False, settings=settings_for(tmp_path))
    assert result.manifest.invalid_skipped == [5, 10] and [p.line for p in result.skipped] == [5, 10]
    assert sum(s.count for s in result.manifest.splits.values()) == 28


# -- dedup ------------------------------------------------------------------------------------

def rows_of(texts: list[str], completion: str = "technical") -> list[SourceRow]:
    return [SourceRow(i, user_example(text, completion)) for i, text in enumerate(texts, 1)]


def test_exact_duplicates_are_removed_after_normalising_case_and_space():
    rows = rows_of([TICKET, "  " + TICKET.upper().replace(" ", " \n "), OTHER_TICKET])
    kept, removed = deduplicate(rows, threshold=0.8, num_perm=128)
    assert [r.line for r in kept] == [1, 3]
    assert [(r.kept_line, r.removed_line, r.kind) for r in removed] == [(1, 2, "exact")]


def test_near_duplicates_are_caught_by_minhash_and_different_texts_kept():
    rows = rows_of([TICKET, OTHER_TICKET, NEAR_TICKET])
    kept, removed = deduplicate(rows, threshold=0.8, num_perm=128)
    assert [r.line for r in kept] == [1, 2]
    assert [(r.kept_line, r.removed_line, r.kind) for r in removed] == [(1, 3, "near")]
    assert 0.85 < removed[0].similarity < 0.9
    # The same prompt with another completion is a near duplicate (similarity 1), not kept twice.
    _, conflicting = deduplicate(rows_of([TICKET]) + [SourceRow(9, user_example(TICKET, "billing"))],
                                 threshold=0.8, num_perm=128)
    assert [(r.removed_line, r.kind, r.similarity) for r in conflicting] == [(9, "near", 1.0)]


def test_the_near_duplicate_threshold_is_configurable(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [pc(t, "x") for t in (TICKET, NEAR_TICKET)]
                       + [pc(f"unrelated question {i} on {i * 13} apples", "y") for i in range(20)])
    loose = prepare_dataset(path, tmp_path / "loose", record=False, settings=settings_for(tmp_path))
    strict = prepare_dataset(path, tmp_path / "strict", near_threshold=0.95, record=False,
                             settings=settings_for(tmp_path))
    assert loose.manifest.dedup.model_dump() == {"exact_removed": 0, "near_removed": 1, "held_out_removed": 0,
                                                 "threshold": 0.8,
                                                 "examples": [(1, 2)]}
    assert strict.manifest.dedup.near_removed == 0 and strict.manifest.dedup.threshold == 0.95


# -- splits -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("completions", "labels"), [
    (["b", "a", "b", "a", "a"], ["a", "b"]),
    ([" yes", "yes ", "no", "no"], ["no", "yes"]),
    (["a", "a", "b"], None),  # "b" appears once
    (["a", "a"], None),  # one value is no classification
    ([f"l{i}" for i in range(51)] * 2, None),  # more than 50 values
    (["x" * 41] * 2 + ["y"] * 2, None),  # a 41-character completion is text, not a label
    (["two\nlines"] * 2 + ["y"] * 2, None),
])
def test_label_rule(completions, labels):
    assert detect_labels(completions) == labels


def test_allocation_gives_the_largest_remainders_the_extra_examples():
    assert allocate([25] * 5, 0.1) == [3, 3, 3, 2, 2]  # 12.5 rounds to 13; ties go to the first groups
    assert allocate([7, 3], 0.5) == [4, 1]  # 3.5 + 1.5 = 5: the remainders tie, the first group wins
    assert allocate([10, 10], 0.0) == [0, 0]


def labelled(n_per_label: dict[str, int]) -> list[Example]:
    return [user_example(f"{label} ticket {i}", label) for label, n in n_per_label.items() for i in range(n)]


def test_stratified_split_keeps_each_labels_share():
    examples = labelled({"a": 50, "b": 50, "c": 50, "d": 50})
    parts = split_examples(examples, labels=["a", "b", "c", "d"], validation_fraction=0.1, test_fraction=0.2, seed=0)
    counts = {name: Counter(e.completion for e in part) for name, part in parts.items()}
    assert counts == {"train": dict.fromkeys("abcd", 35), "validation": dict.fromkeys("abcd", 5),
                      "test": dict.fromkeys("abcd", 10)}
    # A rare label keeps at least one example in train.
    rare = split_examples(labelled({"a": 40, "b": 2}), labels=["a", "b"], validation_fraction=0.4,
                          test_fraction=0.4, seed=0)
    assert Counter(e.completion for e in rare["train"])["b"] == 1


def test_split_is_seeded_and_deterministic():
    examples = [user_example(f"free text number {i}", f"answer {i}") for i in range(50)]

    def split(seed):
        return split_examples(examples, labels=None, validation_fraction=0.1, test_fraction=0.1, seed=seed)

    assert split(3) == split(3) and split(3)["test"] != split(4)["test"]
    assert [len(p) for p in split(3).values()] == [40, 5, 5]
    assert sorted(e.completion for p in split(3).values() for e in p) == sorted(e.completion for e in examples)
    with pytest.raises(InvalidInput, match="leave nothing to train on"):
        split_examples(examples, labels=None, validation_fraction=0.5, test_fraction=0.5, seed=0)


def test_prepare_writes_the_same_files_for_the_same_seed(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", make_task(200, seed=1))
    first, second, other = (prepare_dataset(path, tmp_path / name, seed=seed, record=False,
                                            settings=settings_for(tmp_path))
                            for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert first.manifest.splits == second.manifest.splits
    assert first.manifest.splits["test"].sha256 != other.manifest.splits["test"].sha256
    dataset = PreparedDataset(tmp_path / "a")  # hashes checked on open
    assert dataset.manifest.labels == sorted(QUEUES) and dataset.manifest.format == "messages"
    assert dataset.split("test")[0].prompt[0].content == SYSTEM


def test_a_declared_answer_schema_is_checked_on_the_data_and_kept_in_the_manifest(tmp_path):
    schema = {"type": "object", "required": ["queue"], "properties": {"queue": {"enum": list(QUEUES)}}}
    rows = [{"prompt": f"ticket {i} about {q}", "completion": json.dumps({"queue": q})}
            for i, q in enumerate(QUEUES * 8)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    schema_file = tmp_path / "answer.schema.json"
    schema_file.write_text(json.dumps(schema))
    prepared = prepare_dataset(path, tmp_path / "ok", record=False, settings=settings_for(tmp_path),
                               answer_schema=schema_file)
    assert PreparedDataset(tmp_path / "ok").manifest.answer_schema == schema == prepared.manifest.answer_schema
    bad = write_jsonl(tmp_path / "bad.jsonl", [*rows, {"prompt": "ticket x", "completion": '{"queue": "sales"}'}])
    with pytest.raises(InvalidInput, match=r"1 answer\(s\) do not follow .*queue: 'sales' is not one of"):
        prepare_dataset(bad, tmp_path / "bad", record=False, settings=settings_for(tmp_path), answer_schema=schema_file)
    schema_file.write_text(json.dumps({"type": "objekt"}))
    with pytest.raises(InvalidInput, match="not a valid JSON schema"):
        prepare_dataset(path, tmp_path / "worse", record=False, settings=settings_for(tmp_path),
                        answer_schema=schema_file)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "worse").exists()  # refused before writing


def test_prepare_refuses_a_folder_with_other_files(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", make_task(100))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInput, match="holds other files"):
        prepare_dataset(path, tmp_path / "busy", record=False, settings=settings_for(tmp_path))


# -- contamination --------------------------------------------------------------------------------

def hand_prepared(folder: Path, train: list[Example], test: list[Example]) -> Manifest:
    """A prepared folder written directly, bypassing dedup: how contamination gets in."""
    folder.mkdir()
    splits = {name: write_examples(folder / f"{name}.jsonl", part)
              for name, part in (("train", train), ("validation", []), ("test", test))}
    manifest = Manifest(source="by hand", source_sha256="0" * 64, format="prompt_completion", seed=0,
                        dedup=DedupReport(threshold=0.8), splits=splits, labels=None,
                        contamination=ContaminationReport(passed=True, method="none", threshold=0.8,
                                                          exact_overlaps=0, near_overlaps=0))
    (folder / "manifest.json").write_text(manifest.model_dump_json())
    return manifest


def gate_for(registry, adapter_factory, data_sha256: str):
    registry.register("tickets", adapter_factory(), base=BASE_ID, training_data_sha256=data_sha256)
    return registry.check_gate("tickets@latest")


def test_prepared_data_passes_and_the_gate_sees_the_check(registry, adapter_factory, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", make_task(300))
    result = prepare_dataset(path, tmp_path / "prepared", registry=registry)
    assert result.manifest.contamination.passed
    assert result.manifest.contamination.method == "exact+minhash(t=0.8)"
    report = gate_for(registry, adapter_factory, result.manifest.training_data_sha256)
    assert "contamination check passed (exact+minhash(t=0.8))" in report.checks
    assert not any("contamination" in reason for reason in report.reasons)


def test_contamination_is_found_and_the_gate_refuses(registry, adapter_factory, tmp_path):
    train = [user_example(t) for t in (TICKET, OTHER_TICKET, "Where is my parcel? It has been ten days now.")]
    test = [user_example(TICKET.lower()), user_example(NEAR_TICKET),
            user_example("How do I change the email address on my profile?")]
    manifest = hand_prepared(tmp_path / "leaky", train, test)
    report = check_prepared(tmp_path / "leaky", registry=registry)
    assert not report.passed and (report.exact_overlaps, report.near_overlaps) == (1, 1)
    assert report.examples[0] == "test line 1 = train line 1 (exact)"
    assert report.examples[1].startswith("test line 2 ~ train line 1 (jaccard 0.8")
    gate = gate_for(registry, adapter_factory, manifest.training_data_sha256)
    assert any("contamination check failed" in reason and "'exact_overlaps': 1" in reason for reason in gate.reasons)
    # Clean data recorded later passes: the gate reads the latest check.
    clean = hand_prepared(tmp_path / "clean", train, test[2:])
    assert check_prepared(tmp_path / "clean", registry=registry).passed
    checks = gate_for(registry, adapter_factory, clean.training_data_sha256).checks
    assert "contamination check passed (exact+minhash(t=0.8))" in checks


def test_check_against_a_users_own_test_file(tmp_path):
    settings = settings_for(tmp_path)
    path = write_jsonl(tmp_path / "t.jsonl", make_task(200))
    prepare_dataset(path, tmp_path / "prepared", settings=settings)
    seen = PreparedDataset(tmp_path / "prepared").split("train")[5]
    theirs = write_jsonl(tmp_path / "theirs.jsonl", [
        {"instruction": "A question nobody in the ticket data has asked, about tea.", "output": "billing"},
        {"instruction": seen.user_text + " Thanks!", "output": seen.completion}])
    report = check_prepared(tmp_path / "prepared", against=theirs, settings=settings)
    assert not report.passed and report.near_overlaps == 1
    assert report.examples[0].startswith("theirs.jsonl line 2 ~ train line 6 (jaccard ")


# -- stats ------------------------------------------------------------------------------------------

def test_stats_counts_labels_and_output_format(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [pc("a", "yes"), pc("b", "no"), "{bad", pc("c", "yes"),
                                              pc("d", "no"), pc("e", "yes")])
    stats = dataset_stats(path)
    assert stats.counts == {"all": 5} and stats.invalid_lines == 1 and stats.labels == ["no", "yes"]
    assert stats.label_counts == {"all": {"no": 2, "yes": 3}}
    assert (stats.output_format, stats.format_share, stats.tokens) == ("label", 1.0, None)
    json_file = write_jsonl(tmp_path / "j.jsonl", [pc("a", '{"x": 1}'), pc("b", '[1, 2]'), pc("c", "{broken"),
                                                   pc("d", "plain words")])
    assert (dataset_stats(json_file).output_format, dataset_stats(json_file).format_share) == ("json", 0.5)
    text = write_jsonl(tmp_path / "x.jsonl", [pc("a", "one answer"), pc("b", "another answer")])
    assert (dataset_stats(text).output_format, dataset_stats(text).format_share) == ("text", None)


def test_percentiles_are_nearest_rank_and_outliers_do_not_set_the_length():
    assert [percentile(list(range(1, 11)), p) for p in (50, 90, 99, 100)] == [5, 9, 10, 10]
    stats = token_stats([100] * 99 + [1000])
    assert (stats.p50, stats.p99, stats.max) == (100, 100, 1000)
    assert (stats.recommended_max_seq_length, stats.truncated_at_recommended) == (128, 1)
    covered = token_stats([60] * 99 + [100])  # p99 60 -> 64, but one more block of 64 covers the max
    assert (covered.recommended_max_seq_length, covered.truncated_at_recommended) == (128, 0)


def test_token_lengths_use_the_base_models_chat_template(tmp_path, hf_base):
    # SmolLM2's template wraps each turn as <|im_start|>ROLE\nCONTENT<|im_end|>\n: 5 tokens plus
    # the content for system and user, 6 for assistant (the word is two tokens); "hi" and "ok" are
    # one token each. So system+user+assistant is 6+6+7 = 19 tokens and each further user/assistant
    # pair adds 13.
    def conversation(extra_pairs: int) -> dict:
        more = [("user", "hi"), ("assistant", "ok")] * extra_pairs
        return msgs(("system", "hi"), ("user", "hi"), ("assistant", "ok"), *more)

    path = write_jsonl(tmp_path / "t.jsonl", [conversation(k) for k in (0, 0, 0, 0, 0, 1, 1, 2, 3, 9)])
    stats = dataset_stats(path, base_model=hf_base, max_seq_length=64)
    # Lengths 19 x5, 32, 32, 45, 58, 136; nearest rank: p50 the 5th, p90 the 9th, p99 the 10th.
    assert stats.tokens.model_dump() == {"p50": 19, "p90": 58, "p99": 136, "max": 136,
                                         "recommended_max_seq_length": 192, "truncated_at_recommended": 0,
                                         "max_seq_length": 64, "truncated_at_max_seq_length": 1}
    assert stats.warnings == ["1 example(s) are longer than max_seq_length 64 and would be truncated, "
                              "completion first"]
    # The CLI takes the registered base id as well as the folder, as every other command does.
    home = tmp_path / "home"
    Registry(Settings(home=home)).add_base_model(BASE_ID, source=str(hf_base), folder=hf_base)
    by_id = json.loads(run_cli(home, "data", "stats", str(path), "--base-model", BASE_ID, "--json").stdout)
    assert by_id["tokens"]["p99"] == 136


# -- the bundled task ------------------------------------------------------------------------------------

def test_make_task_is_deterministic_balanced_and_has_planted_duplicates(tmp_path):
    rows = make_task(1000, seed=0)
    assert rows == make_task(1000, seed=0) and rows != make_task(1000, seed=1)
    labels = Counter(row["messages"][-1]["content"] for row in rows)
    assert set(labels) == set(QUEUES) and all(196 <= n <= 216 for n in labels.values())
    result = prepare_dataset(write_jsonl(tmp_path / "t.jsonl", rows), tmp_path / "p", record=False,
                             settings=settings_for(tmp_path))
    dedup = result.manifest.dedup
    # 10 exact and 10 near copies planted, plus a few natural ones. A planted exact copy counts as
    # near when its original already went as a near duplicate of an earlier ticket.
    assert dedup.exact_removed >= 5 and dedup.near_removed >= 10
    assert 20 <= dedup.exact_removed + dedup.near_removed < 60
    assert result.manifest.contamination.passed


# -- the command line ---------------------------------------------------------------------------------

def test_cli_user_errors_are_one_line_and_exit_2(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD["messages"], msgs(("user", "q"), ("tool", "x"))])
    done = run_cli(tmp_path / "home", "data", "prepare", str(path), "--out", str(tmp_path / "out"), expect=2)
    # rich wraps a long message at the terminal's width (COLUMNS=200 here); unwrapped it is one line.
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert "1 invalid line(s) in messages format (fix them or pass --skip-invalid): line 2: messages[2] has " \
           "unknown role 'tool' (expected system, user or assistant)" in " ".join(done.stderr.split())
    done = run_cli(tmp_path / "home", "data", "stats", str(path), "--format", "csv", expect=2)
    assert done.stderr == "error: unknown format 'csv'; expected one of prompt_completion, messages, alpaca\n"
    (tmp_path / "empty").mkdir()
    done = run_cli(tmp_path / "home", "data", "check-contamination", str(tmp_path / "empty"), expect=2)
    assert done.stderr.startswith("error: ") and "is not a prepared dataset" in done.stderr


def test_cli_make_task_prepare_stats_and_check(tmp_path):
    home, data, out = tmp_path / "home", tmp_path / "tickets.jsonl", tmp_path / "prepared"
    made = json.loads(run_cli(home, "data", "make-task", str(data), "--n", "300", "--seed", "2", "--json").stdout)
    assert made["examples"] == 300 and made["format"] == "messages"
    prepared = json.loads(run_cli(home, "data", "prepare", str(data), "--out", str(out), "--json").stdout)
    manifest = prepared["manifest"]
    assert manifest["contamination"]["passed"] and manifest["labels"] == sorted(QUEUES)
    kept = sum(s["count"] for s in manifest["splits"].values())
    assert kept + len(prepared["removed"]) == 300
    assert set(prepared["removed"][0]) == {"kept_line", "removed_line", "kind", "similarity"}
    stats = json.loads(run_cli(home, "data", "stats", str(out), "--json").stdout)
    assert stats["counts"] == {name: s["count"] for name, s in manifest["splits"].items()}
    leaked = write_jsonl(tmp_path / "leaked.jsonl", (out / "train.jsonl").read_text().splitlines()[:2])
    done = run_cli(home, "data", "check-contamination", str(out), "--against", str(leaked), expect=1)
    assert "contamination check FAILED" in done.stdout and "leaked.jsonl line 1 = train line 1 (exact)" in done.stdout


def test_a_given_test_set_is_kept_as_given_and_train_rows_that_repeat_it_leave_train(tmp_path):
    """The data came split: its test set stays exactly as given (so scores compare with anyone's
    on it); train rows repeating one of its prompts, exactly or nearly, are dropped from train."""
    rows = [pc(f"Ticket {n}: the {thing} on order {n} arrived {state}.", label)
            for n, (thing, state, label) in enumerate(
                [(t, s, lab) for t, s, lab in [("kettle", "broken", "returns"), ("invoice", "twice", "billing"),
                                               ("parcel", "late", "shipping")]] * 40)]
    train = write_jsonl(tmp_path / "train.jsonl", [pc(TICKET, "returns"), pc(OTHER_TICKET, "returns"), *rows])
    test = write_jsonl(tmp_path / "test.jsonl", [
        {"instruction": NEAR_TICKET, "output": "returns"},  # near the first train row: another format, too
        {"instruction": "Where is the parcel I ordered in May?", "output": "shipping"},
        {"instruction": "Where is the parcel I ordered in May?", "output": "shipping"},  # given twice: kept twice
        {"instruction": OTHER_TICKET.upper(), "output": "returns"}])  # the second train row, shouted
    validation = write_jsonl(tmp_path / "validation.jsonl", [pc("Why was I charged twice?", "billing")])
    result = prepare_dataset(train, tmp_path / "prepared", test=test, validation=validation, record=False,
                             settings=settings_for(tmp_path))
    m = result.manifest
    prepared = PreparedDataset(tmp_path / "prepared")
    assert [e.user_text for e in prepared.split("test")] == [NEAR_TICKET, "Where is the parcel I ordered in May?",
                                                             "Where is the parcel I ordered in May?",
                                                             OTHER_TICKET.upper()]
    assert [e.user_text for e in prepared.split("validation")] == ["Why was I charged twice?"]
    assert {(r.kept_line, r.removed_line, r.kind) for r in result.removed} == {(1, 1, "in_test"), (4, 2, "in_test")}
    assert m.dedup.held_out_removed == 2 and m.splits["train"].count == 120
    assert TICKET not in {e.user_text for e in prepared.split("train")}
    assert m.given["test"].count == 4 and m.given["test"].source_sha256 == file_sha256(test)
    assert m.given["validation"].source_sha256 == file_sha256(validation) and "validation" in m.given
    assert m.contamination.passed and m.labels == ["billing", "returns", "shipping"]
    # Only a test set given: validation is split off train as usual.
    only_test = prepare_dataset(train, tmp_path / "only-test", test=test, record=False,
                                settings=settings_for(tmp_path)).manifest
    assert only_test.splits["validation"].count == 12 and only_test.splits["test"].count == 4

