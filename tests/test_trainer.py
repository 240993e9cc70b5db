"""trainer: metrics on hand-checked answers, config errors, a real LoRA fit on CPU on the bundled
ticket task (registered with its lineage and cost), an interrupted run resumed from its
checkpoint, and eval against the base and prompted base with a judge behind a real gateway."""

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from loragate.registry import InvalidInput, NotFound, Registry
from loragate.settings import Settings
from loragate.trainer.config import TrainConfig
from loragate.trainer.metrics import classification, exact_match, json_valid, rouge_l, score_all, score_metric, token_f1

from .conftest import BASE_ID, HUB_ID, peft_adapter, run_cli

# --- metrics --------------------------------------------------------------------------------


def test_exact_match_normalises_case_space_and_edge_punctuation():
    assert exact_match(["Billing.", "  account ", "technical"], ["billing", "Account", "shipping"]) == pytest.approx(2 / 3)


def test_token_f1_is_squad_overlap():
    # 3 shared tokens: precision 3/3, recall 3/4 -> F1 6/7.
    assert token_f1(["the cat sat"], ["the cat sat down"]) == pytest.approx(6 / 7)
    assert token_f1(["dog"], ["the cat"]) == 0.0
    assert token_f1([""], [""]) == 1.0


def test_rouge_l_rewards_the_longest_common_subsequence():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    partial = rouge_l(["the cat lay on a mat"], ["the cat sat on the mat"])
    assert 0.4 < partial < 0.9


def test_classification_macro_scores_by_hand():
    # a: TP 1, predicted 2, expected 2 -> P .5 R .5; b: TP 1, predicted 1, expected 2 -> P 1 R .5.
    scores = classification(["a", "a", "b", "x"], ["a", "b", "b", "a"], ["a", "b"])
    assert scores["accuracy"] == 0.5
    assert scores["macro_precision"] == pytest.approx(0.75)
    assert scores["macro_recall"] == pytest.approx(0.5)
    assert scores["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_score_all_picks_the_metrics_that_suit_the_task():
    assert set(score_all(["a"], ["a"], ["a", "b"])) == {"exact_match", "accuracy", "macro_precision",
                                                       "macro_recall", "macro_f1"}
    free_text = score_all(['{"a": 1}', "{oops", "[1]"], ['{"a": 1}', '{"b": 2}', "[2]"])
    assert set(free_text) == {"exact_match", "token_f1", "rouge_l", "json_valid", "record_match", "field_precision",
                              "field_recall", "field_f1"}
    assert free_text["json_valid"] == pytest.approx(2 / 3) == json_valid(['{"a": 1}', "{oops", "[1]"])
    with pytest.raises(InvalidInput, match="metric 'bleu' does not apply"):
        score_metric(["a"], ["a"], "bleu")


# --- config ---------------------------------------------------------------------------------


def test_config_errors_are_one_clear_message(tmp_path):
    with pytest.raises(InvalidInput, match="no training config at"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(InvalidInput, match="is not valid YAML"):
        TrainConfig.from_yaml(bad)
    bad.write_text(yaml.safe_dump({"name": "t", "base": "b", "data": "d", "lora": {"rank": 8}, "epochs": 0}))
    with pytest.raises(InvalidInput) as error:
        TrainConfig.from_yaml(bad)
    assert "lora.rank: Extra inputs are not permitted" in str(error.value)
    assert "epochs: Input should be greater than 0" in str(error.value)


def test_relative_data_is_read_from_the_configs_folder_and_overrides_apply(tmp_path):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base": "b", "data": "../prepared", "max_steps": 10}))
    config = TrainConfig.from_yaml(path, max_steps=3)
    assert config.data == (tmp_path / "prepared").resolve() and config.max_steps == 3
    assert config.fingerprint("abc") == TrainConfig.from_yaml(path, max_steps=3).fingerprint("abc")
    assert config.fingerprint("abc") != config.fingerprint("abd")


# --- a real fit on CPU ----------------------------------------------------------------------

model = pytest.mark.model
torch = pytest.importorskip("torch")
pytest.importorskip("trl")


@pytest.fixture(scope="module")
def home(tmp_path_factory, hf_base):
    home = tmp_path_factory.mktemp("trainer") / "home"
    registry = Registry(Settings(home=home, user="tester"))
    registry.add_base_model(BASE_ID, source=str(hf_base), hub_id=HUB_ID, folder=hf_base)
    return home


@pytest.fixture(scope="module")
def registry(home):
    return Registry(Settings(home=home, user="tester"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, registry):
    from loragate.trainer.demo_task import write_task
    from loragate.trainer.prepare import prepare_dataset

    folder = tmp_path_factory.mktemp("tickets")
    write_task(folder / "tickets.jsonl", n=240, seed=3)
    return prepare_dataset(folder / "tickets.jsonl", folder / "prepared", registry=registry).folder


def write_config(folder, prepared, **fields):
    config = {"name": "tickets", "base": BASE_ID, "data": str(prepared), "max_steps": 4, "batch_size": 4,
              "eval_steps": 2, "max_seq_length": 128, "eval_limit": 8, "learning_rate": 1e-3, **fields}
    path = folder / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, registry, prepared):
    from loragate.trainer.train import train

    path = write_config(tmp_path_factory.mktemp("config"), prepared)
    return train(registry, TrainConfig.from_yaml(path), progress="none")


@model
def test_training_registers_a_version_with_lineage_and_cost(registry, prepared, trained):
    from loragate.trainer.dataset import open_prepared

    manifest = open_prepared(prepared).manifest
    info = registry.get(trained.version.ref)
    assert info.ref == "tickets@1" and info.base_model == BASE_ID and info.parent is None
    assert info.training_data_sha256 == manifest.training_data_sha256
    # The gateway will check every served answer against the task's labels.
    assert info.output_check.labels == manifest.labels and len(manifest.labels) > 2
    run = info.training_config
    assert run["steps"] == 4 and run["config"]["lora"]["r"] == 16 and run["device"].startswith("cpu")
    assert run["tokens_seen"] > 0 and run["tokens_per_s"] > 0 and run["wall_s"] > 0
    assert run["cost_usd"] == pytest.approx(run["wall_s"] / 3600 * 0.10, rel=0.01) and run["gpu_hours"] == 0
    assert run["best_checkpoint"] in ("checkpoint-2", "checkpoint-4") and run["best_eval_loss"] > 0
    # The loss curve travels with the version, for the console to draw: validation at steps 2 and 4.
    assert [p["step"] for p in run["loss_history"] if "eval_loss" in p] == [2, 4]
    assert min(p["eval_loss"] for p in run["loss_history"] if "eval_loss" in p) == run["best_eval_loss"]
    assert run["test_data_sha256"] == open_prepared(prepared).sha256("test")
    # The artifact is a peft adapter naming its base portably; the run keeps its curve and record.
    adapter_config = json.loads((registry.artifact_path(info.ref) / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == HUB_ID and adapter_config["r"] == 16
    assert trained.loss_curve.stat().st_size > 1000
    assert json.loads((trained.run_dir / "run.json").read_text())["steps"] == 4
    assert not (trained.run_dir / "checkpoints").exists()  # only kept while a run can be resumed
    # The gate sees the contamination check of the training data.
    assert "contamination" in " ".join(registry.check_gate(info.ref, to="production").checks)


@model
def test_gpu_only_settings_are_refused_on_cpu_before_any_work(registry, prepared, tmp_path):
    from loragate.trainer.train import train

    before = len(registry.list_versions("tickets"))
    for fields, message in (({"quantization": "4bit"}, "QLoRA\\) needs a CUDA GPU"),
                            ({"precision": "bf16"}, "precision bf16 needs a GPU")):
        config = TrainConfig.from_yaml(write_config(tmp_path, prepared, name="gpu-only", **fields))
        with pytest.raises(InvalidInput, match=message):
            train(registry, config, progress="none")
    assert len(registry.list_versions("tickets")) == before


@model
def test_a_killed_run_resumes_from_its_checkpoint(home, registry, prepared, tmp_path):
    """SIGKILL after the first checkpoint: nothing is registered; running again without a flag
    is refused; --resume continues from the checkpoint and registers the version."""
    config = write_config(tmp_path, prepared, name="resumable")
    run_root = home / "runs" / "resumable"
    process = subprocess.Popen(["loragate", "train", str(config), "--no-eval", "--json"],
                               env={**os.environ, "LORAGATE_HOME": str(home)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(run_root.glob("*/checkpoints/checkpoint-2/trainer_state.json")):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    with pytest.raises(NotFound, match="no adapter named"):
        registry.list_versions("resumable")

    refused = run_cli(home, "train", str(config), "--no-eval", expect=2)
    assert "pass --resume to continue it or --restart to start over" in " ".join(refused.stderr.split())
    resumed = run_cli(home, "train", str(config), "--no-eval", "--resume", "--json")
    run = json.loads(resumed.stdout)["train"]["run"]  # stdout stays the result; progress is on stderr
    # Not a terminal: plain progress lines, not a bar that never draws.
    progress = [line for line in resumed.stderr.splitlines() if line.startswith(("training:", "step "))]
    assert progress[0] == "training: 4 steps, from step 2", resumed.stderr[-2000:]
    assert progress[-1].startswith("step 4/4 loss ") and " val " in progress[-1] and " eta " in progress[-1]
    assert run["resumed_from"].endswith("checkpoint-2") and run["steps"] == 4
    assert registry.get("resumable@1").training_config["resumed_from"] == run["resumed_from"]
    assert run_cli(home, "train", str(config), "--no-eval", "--resume", expect=2).stderr.startswith(
        "error: nothing to resume")


@model
def test_eval_scores_three_subjects_stores_them_and_asks_the_gate(registry, prepared, trained):
    from loragate.trainer.evaluate import evaluate_version

    report = evaluate_version(registry, trained.version.ref, prepared, limit=6, shots=2)
    assert set(report.scores) == {"base", "prompted_base", "adapter", "majority", "classical"}
    assert report.examples == 6 and report.metric == "macro_f1"
    assert len(set(report.predictions["majority"])) == 1 and set(report.cost_per_1k_usd) == {"adapter", "classical"}
    saved = [json.loads(line) for line in Path(report.predictions_file).read_text().splitlines()]
    assert [row["adapter"] for row in saved] == report.predictions["adapter"] and len(saved) == 6
    assert saved[0]["reference"] == _test(prepared)[0].completion
    shown = run_cli(registry.settings.home, "registry", "show", trained.version.ref).stdout
    assert report.predictions_file in shown.replace("\n", "")  # linked from the version
    assert all(len(answers) == 6 for answers in report.predictions.values())
    assert set(report.scores["adapter"]) >= {"exact_match", "accuracy", "macro_f1"}
    for subject, values in report.scores.items():  # the stored scores are the predictions' scores
        assert values["exact_match"] == pytest.approx(
            exact_match(report.predictions[subject], [e.completion for e in _test(prepared)[:6]]), abs=1e-6)
    stored = registry.get(trained.version.ref).score(report.suite, report.metric)
    assert stored.value == report.scores["adapter"][report.metric]
    assert stored.eval_data_sha256 == report.eval_data_sha256
    assert report.beat_prompted_base == (report.scores["adapter"][report.metric]
                                         > report.scores["prompted_base"][report.metric])
    gate = registry.check_gate(trained.version.ref, to="production")
    assert report.promotable == gate.passed
    if not report.beat_prompted_base:
        assert not report.promotable and any("prompted base model" in r for r in report.gate_reasons)


def _test(prepared):
    from loragate.trainer.dataset import open_prepared

    return open_prepared(prepared).split("test")


@model
def test_a_label_task_gates_on_macro_f1_and_must_beat_the_majority_label(registry, prepared, trained):
    """The verdict is the gate's. A label task gates on macro F1 (set when it was trained): on skewed
    labels the majority label's accuracy is high and its macro F1 low. Below the majority label is
    not promotable; a classical classifier as good as the adapter does not refuse, but is said."""
    from loragate.trainer.dataset import open_prepared
    from loragate.trainer.evaluate import _report

    assert registry.primary_eval("tickets") == ("default", "macro_f1")
    info = registry.get(trained.version.ref)
    answers = {subject: ["x"] for subject in ("base", "prompted_base", "majority", "classical", "adapter")}

    def report(adapter: float, classical: float):
        return _report(registry, info, open_prepared(prepared), {
            "base": {"macro_f1": 0.1, "exact_match": 0.2}, "prompted_base": {"macro_f1": 0.2, "exact_match": 0.7},
            "majority": {"macro_f1": 0.3, "exact_match": 0.8}, "classical": {"macro_f1": classical, "exact_match": 0.7},
            "adapter": {"macro_f1": adapter, "exact_match": 0.75}}, answers, shots=3, record=True, cost={})

    below = report(0.25, classical=0.2)  # beats the base models, not the majority label
    assert below.beat_prompted_base and below.beat_majority is False and not below.promotable
    assert any("does not beat the majority-label baseline's 0.3" in r for r in below.gate_reasons)
    even = report(0.5, classical=0.55)
    assert even.promotable and even.beat_classical is False, even.gate_reasons
    assert any("classical classifier (TF-IDF + logistic regression) scores 0.550" in n for n in even.gate_notes)
    above = report(0.6, classical=0.4)
    assert above.promotable and above.beat_classical and not any("classical" in n for n in above.gate_notes)


def test_the_cheapest_baselines_on_a_skewed_label_task():
    """80% of the reviews are positive: answering "positive" always scores 0.8 accuracy and a low
    macro F1; a TF-IDF classifier learns the words and beats it on macro F1."""
    from loragate.trainer.baselines import classical_classifier, majority_label
    from loragate.trainer.dataset import Example, Message
    from loragate.trainer.metrics import score_all

    rng = random.Random(4)
    words = {"positive": ["great", "love", "works", "perfect"], "negative": ["broken", "awful", "refund", "late"],
             "mixed": ["but", "although", "okay", "however"]}
    filler = ["the", "blender", "order", "it", "was", "my", "box", "arrived", "today", "and"]

    def examples(n: int) -> list[Example]:
        labels = rng.choices(list(words), weights=[80, 14, 6], k=n)
        return [Example(prompt=[Message(role="user", content=" ".join(rng.sample(filler, 6) + rng.sample(words[y], 2)))],
                        completion=y) for y in labels]

    train, test = examples(400), examples(200)
    references = [e.completion for e in test]
    labels = sorted(words)
    majority = majority_label(train, test)
    assert set(majority.predictions) == {"positive"}
    always = score_all(majority.predictions, references, labels)
    assert always["accuracy"] == pytest.approx(references.count("positive") / len(references))
    assert always["macro_f1"] < 0.35
    classical = classical_classifier(train, test)
    learned = score_all(classical.predictions, references, labels)
    assert learned["macro_f1"] > 0.9 > always["macro_f1"] and classical.seconds_per_answer < 0.01


@model
def test_pairwise_judge_through_the_gateway(home, registry, prepared, trained, hf_base, tmp_path):
    """A second version judged against its parent by the base model served by a real gateway."""
    from loragate.trainer.evaluate import evaluate_version
    from loragate.trainer.judge import JudgeTarget

    from .gateway_server import GatewayServer

    pytest.importorskip("xllamacpp")
    folder = peft_adapter(hf_base, tmp_path / "v2", ["q_proj", "v_proj"], seed=9)
    second = registry.register("tickets", folder, base=BASE_ID, parent=trained.version.ref)
    gateway = GatewayServer(home).start()
    try:
        target = JudgeTarget(base_url=f"{gateway.url}/v1", model=BASE_ID)
        report = evaluate_version(registry, second.ref, prepared, limit=3, shots=1, judge=target)
    finally:
        gateway.stop()
    judge = report.judge
    assert judge.new == second.ref and judge.old == trained.version.ref and len(judge.verdicts) == 3
    assert judge.wins + judge.losses + judge.ties == 3
    assert 0 <= judge.win_rate <= 1
    stored = registry.get(second.ref).score(f"judge-vs-{trained.version.ref}", "win_rate")
    assert stored.value == judge.win_rate
    # Two judge calls per pair went through the gateway's metering.
    usage = json.loads(run_cli(home, "cost", "report", "--json").stdout)
    assert sum(row["requests"] for row in usage) >= 6


def test_a_version_without_parent_cannot_be_judged(registry, prepared, trained):
    from loragate.trainer.evaluate import evaluate_version
    from loragate.trainer.judge import JudgeTarget

    with pytest.raises(InvalidInput, match="has no previous version to judge against"):
        evaluate_version(registry, trained.version.ref, prepared, limit=1,
                         judge=JudgeTarget(base_url="http://127.0.0.1:9/v1", model="none"))


ADDRESS_SCHEMA = {"type": "object", "required": ["street", "city"], "additionalProperties": False,
                  "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                 "unit": {"type": "object", "properties": {"number": {"type": "integer"}}}}}


def test_schema_validity_is_scored_when_the_data_declares_a_schema():
    from loragate.trainer.json_fields import answer_problems

    reference = '{"street": "1 Main St", "city": "Springfield"}'
    predictions = [reference, '{"city": "Springfield", "street": "1 Main St", "unit": {"number": 4}}',
                   '{"street": "1 Main St"}',  # misses a required key
                   '{"street": "1 Main St", "city": "X", "unit": {"number": "four"}}',  # wrong type, nested
                   '{"street": "1 Main St", "city": "X", "zip": "01101"}',  # a key the schema does not allow
                   "Springfield"]
    scores = score_all(predictions, [reference] * 6, schema=ADDRESS_SCHEMA)
    assert scores["schema_valid"] == pytest.approx(2 / 6, abs=1e-6) and scores["json_valid"] == pytest.approx(5 / 6, abs=1e-6)
    assert "schema_valid" not in score_all(predictions, [reference] * 6)
    problems = answer_problems(predictions, ADDRESS_SCHEMA)
    assert problems[3].startswith("unit/number: 'four' is not of type 'integer'")
    assert problems[5].startswith("not JSON")


def test_json_answers_are_scored_by_field_not_by_string():
    from loragate.trainer.json_fields import field_accuracy

    reference = ('{"street": "1 Main St", "city": "Springfield", "zip": "01101", '
                 '"unit": {"type": "apt", "number": 4}, "tags": ["a", "b"]}')  # 7 (path, value) pairs
    predictions = [
        # Reordered keys and list, extra spaces, 4.0 for 4: the same record.
        '{"tags": ["b", "a"], "unit": {"number": 4.0, "type": "apt"}, "zip": "01101", "city": "Springfield", '
        '"street": "1  Main St"}',
        # A wrong city and a missing tag: 5 of its 6 pairs right.
        '{"street": "1 Main St", "city": "Shelbyville", "zip": "01101", "unit": {"type": "apt", "number": 4}, '
        '"tags": ["a"]}',
        # Everything right and an extra key: 7 of 8.
        '{"street": "1 Main St", "city": "Springfield", "zip": "01101", "unit": {"type": "apt", "number": 4}, '
        '"tags": ["a", "b"], "country": "US"}',
        "not json",  # no pairs: costs recall only
    ]
    references = [reference] * 4
    scores = score_all(predictions, references)
    precision, recall = 19 / 21, 19 / 28
    assert scores["exact_match"] == 0 and scores["record_match"] == 0.25 and scores["json_valid"] == 0.75
    assert scores["field_precision"] == pytest.approx(precision, abs=1e-6)
    assert scores["field_recall"] == pytest.approx(recall, abs=1e-6)
    assert scores["field_f1"] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-6)
    assert field_accuracy(predictions, references) == {"city": 0.5, "street": 0.75, "tags[]": 0.5,
                                                      "unit.number": 0.75, "unit.type": 0.75, "zip": 0.75}
