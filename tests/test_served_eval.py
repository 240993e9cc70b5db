"""The served path scored in the install the README gives (`pip install -e '.[demo]'`): no
llama-cpp-python, whose absence each command here is run with (its import made to fail, as in a
venv without it). `train --served` on a JSON task and `eval --served` on a label task score the
version through the gateway's own llama.cpp engine code and record ``SUITE@served``, which the gate
reads; a real gateway then answers the same prompts with the same score. A missing extra is a
one-line error naming the pip install that adds it, before any work."""

from __future__ import annotations

import json
import random

import httpx
import pytest
import yaml

from loragate.registry import Registry, served_suite
from loragate.settings import Settings

from .conftest import BASE_ID, HUB_ID, run_cli
from .gateway_server import GatewayServer

pytestmark = pytest.mark.model
pytest.importorskip("xllamacpp")
pytest.importorskip("trl")


def without(tmp_path_factory, *modules: str) -> dict[str, str]:
    """Environment for a `loragate` process in which ``modules`` are not installed (imports fail,
    ``importlib.util.find_spec`` finds nothing), as in a venv without their extra."""
    folder = tmp_path_factory.mktemp("without")
    (folder / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules))
    return {"PYTHONPATH": str(folder)}


@pytest.fixture(scope="module")
def demo_install(tmp_path_factory) -> dict[str, str]:
    """What the `demo` extra leaves out of the `dev` install these tests run in."""
    return without(tmp_path_factory, "llama_cpp", "litellm")


@pytest.fixture(scope="module")
def home(tmp_path_factory, hf_base):
    home = tmp_path_factory.mktemp("served") / "home"
    Registry(Settings(home=home, user="tester")).add_base_model(BASE_ID, source=str(hf_base), hub_id=HUB_ID,
                                                                 folder=hf_base)
    return home


def json_task(path, n: int = 160, seed: int = 5) -> None:
    """Support tickets answered as JSON: the queue and whether an order number is mentioned."""
    from loragate.trainer.demo_task import QUEUES, make_ticket

    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(n):
            queue = rng.choice(QUEUES)
            ticket = make_ticket(queue, rng)
            answer = json.dumps({"queue": queue, "mentions_order": "#" in ticket or "order" in ticket.lower()})
            out.write(json.dumps({"messages": [
                {"role": "system", "content": "Answer with JSON: the ticket's queue and whether it mentions an order."},
                {"role": "user", "content": ticket}, {"role": "assistant", "content": answer}]}) + "\n")


def gateway_score(home, ref: str, data, report: dict) -> float:
    """The version's answers from a running gateway to the report's prompts, scored the same way."""
    from loragate.trainer.dataset import open_prepared
    from loragate.trainer.metrics import score_metric

    dataset = open_prepared(data)
    examples = dataset.split("test")[:report["examples"]]
    with GatewayServer(home) as gateway:
        answers = [httpx.post(f"{gateway.url}/v1/chat/completions", timeout=120, json={
            "model": ref, "messages": [m.model_dump() for m in e.prompt], "temperature": 0,
            "max_tokens": report["max_tokens"]}).json()["choices"][0]["message"]["content"] for e in examples]
    return score_metric(answers, [e.completion for e in examples], report["metric"],
                        labels=dataset.manifest.labels, schema=dataset.manifest.answer_schema)


def test_train_served_on_a_json_task_records_what_the_gateway_answers(home, demo_install, tmp_path):
    json_task(tmp_path / "orders.jsonl")
    run_cli(home, "data", "prepare", str(tmp_path / "orders.jsonl"), "--out", str(tmp_path / "prepared"),
            env=demo_install)
    config = tmp_path / "orders.yaml"
    config.write_text(yaml.safe_dump({"name": "orders", "base": BASE_ID, "data": str(tmp_path / "prepared"),
                                      "max_steps": 4, "batch_size": 4, "eval_steps": 2, "max_seq_length": 128,
                                      "eval_limit": 4, "learning_rate": 1e-3}))
    out = json.loads(run_cli(home, "train", str(config), "--served", "--eval-limit", "6", "--json",
                             env=demo_install).stdout)
    served_reports = out["served"]
    first = served_reports[0]
    adapter, served = first["rows"]
    # The adapter's score is the one the eval just recorded on the same six examples, not recomputed.
    assert adapter["backend"] == "transformers (recorded eval)" and first["examples"] == 6
    assert adapter["score"] == out["eval"]["scores"]["adapter"][first["metric"]]
    assert first["metric"] == "field_f1"
    assert served["served"] and served["backend"] == "llama.cpp" and served["artifact"].startswith("gguf-lora f16 on ")
    assert served["tokens_per_s"] > 0 and served["load_s"] > 0
    last = served_reports[-1]["rows"][-1]
    registry = Registry(Settings(home=home))
    recorded = registry.get("orders@1").score(served_suite("default"), "field_f1")
    assert recorded.value == last["score"] and recorded.sample_count == 6
    gate = registry.check_gate("orders@1")
    assert any("served path" in line for line in gate.reasons + gate.checks), gate
    # What users get: the running gateway's answers to the same prompts score the same.
    assert gateway_score(home, "orders@1", tmp_path / "prepared", served_reports[-1]) == last["score"]


def test_eval_served_on_a_label_task(home, demo_install, tmp_path):
    from loragate.trainer.demo_task import write_task

    write_task(tmp_path / "tickets.jsonl", n=160, seed=2)
    run_cli(home, "data", "prepare", str(tmp_path / "tickets.jsonl"), "--out", str(tmp_path / "prepared"))
    config = tmp_path / "tickets.yaml"
    config.write_text(yaml.safe_dump({"name": "tickets", "base": BASE_ID, "data": str(tmp_path / "prepared"),
                                      "max_steps": 2, "batch_size": 4, "eval_steps": 2, "max_seq_length": 128}))
    run_cli(home, "train", str(config), "--no-eval", "--json", env=demo_install)
    out = json.loads(run_cli(home, "eval", "tickets@1", "--served", "--keep-base", "--data",
                             str(tmp_path / "prepared"), "--limit", "5", "--json", env=demo_install).stdout)
    [report] = out["served"]
    adapter, served = report["rows"]
    assert adapter["backend"] == "transformers" and report["metric"] == "macro_f1"  # nothing recorded to reuse
    assert served["served"] and served["backend"] == "llama.cpp"
    recorded = Registry(Settings(home=home)).get("tickets@1").score(served_suite("default"), "macro_f1")
    assert recorded.value == served["score"] and recorded.sample_count == 5
    assert served["quality_loss_points"] == pytest.approx((adapter["score"] - served["score"]) * 100)
    assert gateway_score(home, "tickets@1", tmp_path / "prepared", report) == served["score"]


@pytest.mark.parametrize(("hidden", "args", "extra"), [
    ("llama_cpp", ["quantize", "gguf", "x@1", "--type", "q4_k_m"], "quantize"),
    ("llama_cpp", ["quantize", "compare", "x@1", "--data", ".", "--type", "q4_k_m"], "quantize"),
    ("xllamacpp", ["gateway", "serve"], "llamacpp"),
    ("xllamacpp", ["eval", "x@1", "--served", "--data", "."], "llamacpp"),
    ("xllamacpp", ["demo"], "llamacpp"),
    ("torch", ["train", "missing.yaml"], "train"),
    ("peft", ["quantize", "merge", "x@1"], "train"),
    ("transformers", ["eval", "x@1", "--data", "."], "train"),
    ("datasketch", ["data", "prepare", "missing.jsonl", "--out", "o"], "train"),
    ("datasketch", ["data", "make-task", "out.jsonl"], "train"),
])
def test_a_missing_extra_is_one_line_naming_the_install(home, tmp_path_factory, hidden, args, extra):
    done = run_cli(home, *args, expect=2, env=without(tmp_path_factory, hidden))
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert f"({hidden} not installed): " in done.stderr and done.stderr.endswith(f"pip install 'loragate[{extra}]'\n")
    assert ("CMAKE_ARGS=-DGGML_NATIVE=OFF pip install" in done.stderr) == (extra == "quantize")  # a portable build
