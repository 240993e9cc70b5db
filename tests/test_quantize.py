"""quantize: a real peft adapter on the offline SmolLM2 base, merged, exported to GGUF at F16,
Q8_0 and Q4_K_M with llama.cpp's tools, loaded in llama-cpp-python and compared with the
unquantized adapter's logits."""

import json
from pathlib import Path

import numpy as np
import pytest

from loragate.quantize.gguf_export import export_gguf, gguf_path
from loragate.quantize.merge import merge_version, merged_folder
from loragate.quantize.llama_cpp_tools import ConverterError, OutOfSpace
from loragate.registry import InvalidInput, NotFound, Registry
from loragate.settings import Settings

from .conftest import BASE_ID, HUB_ID, peft_adapter, run_cli, write_prepared

pytestmark = pytest.mark.model
llama_cpp = pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "Translate 'good morning' to Spanish.",
           "List three prime numbers.", "Who wrote Hamlet?", "Explain photosynthesis in one sentence.",
           "What is 12 times 7?", "Name a colour of the sky.", "Give me a synonym for happy.",
           "What day comes after Monday?"]
# Measured on this base with a random-initialised r=8 adapter on every linear layer (see the
# closing note of the quantize issue): the tolerances sit below what each type reached.
TOLERANCE = {  # type: (top-1 agreement, top-5 containment, worst cosine of the logits)
    "f16": (1.0, 1.0, 0.9999),
    "q8_0": (0.8, 1.0, 0.999),
    "q4_k_m": (0.6, 0.8, 0.995),
}


@pytest.fixture(scope="module")
def home(tmp_path_factory, hf_base):
    home = tmp_path_factory.mktemp("quantize") / "home"
    registry = Registry(Settings(home=home, user="tester"))
    registry.add_base_model(BASE_ID, source=str(hf_base), hub_id=HUB_ID, folder=hf_base)
    folder = peft_adapter(hf_base, tmp_path_factory.mktemp("adapter") / "a", TARGETS, seed=5)
    registry.register("qa", folder, base=BASE_ID)
    return home


@pytest.fixture(scope="module")
def registry(home):
    return Registry(Settings(home=home, user="tester"))


@pytest.fixture(scope="module")
def prompt_ids(hf_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_base)
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference_logits(registry, hf_base, prompt_ids):
    """The unquantized adapter: the base in fp32 with the peft LoRA applied, not merged."""
    import peft
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32),
                                           registry.artifact_path("qa@1"))
    return _hf_logits(model, prompt_ids)


def _hf_logits(model, prompt_ids):
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0, -1].numpy() for ids in prompt_ids]


def _gguf_logits(path, prompt_ids):
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False)
    try:
        found = []
        for ids in prompt_ids:
            llm.reset()
            llm.eval(ids)
            found.append(np.array(llm.scores[len(ids) - 1]))
        return found
    finally:
        llm.close()


def _agreement(reference, found):
    top1 = np.mean([r.argmax() == f.argmax() for r, f in zip(reference, found)])
    top5 = np.mean([r.argmax() in np.argsort(f)[-5:] for r, f in zip(reference, found)])
    cosine = min(float(r @ f / np.linalg.norm(r) / np.linalg.norm(f)) for r, f in zip(reference, found))
    mean_abs = float(np.mean([np.abs(r - f).mean() for r, f in zip(reference, found)]))
    return top1, top5, cosine, mean_abs


def test_merge_matches_the_adapter_and_is_registered(registry, hf_base, prompt_ids, reference_logits):
    from transformers import AutoModelForCausalLM

    artifact = merge_version(registry, "qa@1")
    assert (artifact.kind, artifact.type) == ("merged", "safetensors")
    folder = merged_folder(registry, "qa@1")
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    # Saved at the base's own precision (bf16), so the merged weights are rounded once.
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert not any(k.startswith("base_model") or "lora" in k for k in _safetensors_keys(folder))
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    top1, top5, cosine, _ = _agreement(reference_logits, _hf_logits(merged, prompt_ids))
    assert top1 == 1.0 and cosine > 0.9999


def _safetensors_keys(folder):
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "np") as handle:
        return list(handle.keys())


@pytest.mark.parametrize("out_type", ["f16", "q8_0", "q4_k_m"])
def test_each_gguf_loads_and_agrees_with_the_unquantized_adapter(registry, prompt_ids, reference_logits, out_type):
    from gguf import GGUFReader

    artifact = export_gguf(registry, "qa@1", out_type)
    path = gguf_path(registry, "qa@1", out_type)
    assert (artifact.kind, artifact.type) == ("gguf", out_type) and artifact.size == path.stat().st_size
    file_type = GGUFReader(path).fields["general.file_type"].contents()
    assert file_type == {"f16": 1, "q8_0": 7, "q4_k_m": 15}[out_type]
    top1, top5, cosine, _ = _agreement(reference_logits, _gguf_logits(path, prompt_ids))
    min_top1, min_top5, min_cosine = TOLERANCE[out_type]
    assert top1 >= min_top1 and top5 >= min_top5 and cosine >= min_cosine, (out_type, top1, top5, cosine)


def test_lower_precision_loses_more_and_is_smaller(registry, prompt_ids, reference_logits):
    sizes, errors = {}, {}
    for out_type in ("f16", "q8_0", "q4_k_m"):
        path = gguf_path(registry, "qa@1", out_type)  # exported by the test above, or now
        sizes[out_type] = path.stat().st_size
        errors[out_type] = _agreement(reference_logits, _gguf_logits(path, prompt_ids))[3]
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_k_m"]
    assert errors["f16"] < errors["q8_0"] < errors["q4_k_m"]


def test_cli_merges_and_exports_with_one_line_errors(home):
    done = run_cli(home, "quantize", "gguf", "qa@1", "--type", "q8_0", "--type", "q4_k_m")
    assert "gguf q8_0" in done.stdout and "gguf q4_k_m" in done.stdout
    assert "merged safetensors" in run_cli(home, "quantize", "merge", "qa@1").stdout
    bad = run_cli(home, "quantize", "gguf", "qa@1", "--type", "q3", expect=2)
    assert bad.stderr.startswith("error: GGUF type must be one of") and "Traceback" not in bad.stderr
    missing = run_cli(home, "quantize", "merge", "qa@9", expect=2)
    assert missing.stderr == "error: adapter 'qa' has no version 9\n"


def _artifacts(registry):
    return sorted((a.kind, a.type, a.sha256) for a in registry.derived_artifacts("qa@1"))


def test_a_missing_base_model_folder_is_a_clear_error(tmp_path, hf_base, registry):
    import shutil

    other = Registry(Settings(home=tmp_path / "home"))
    other.add_base_model(BASE_ID, source=str(tmp_path / "gone"), hub_id=HUB_ID, folder=hf_base)
    adapter = Path(shutil.copytree(registry.artifact_path("qa@1"), tmp_path / "adapter"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").chmod(0o644)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": HUB_ID}))
    other.register("qa", adapter, base=BASE_ID)
    with pytest.raises(NotFound, match="not a local Hugging Face model folder"):
        merge_version(other, "qa@1")
    assert other.derived_artifacts("qa@1") == []


def test_an_unsupported_architecture_is_refused_before_any_work(tmp_path, hf_base, registry, monkeypatch):
    from loragate.quantize import gguf_export

    monkeypatch.setattr(gguf_export, "supported_architectures", lambda tools: frozenset({"MambaForCausalLM"}))
    before = _artifacts(registry)
    with pytest.raises(ConverterError, match="does not support the architecture LlamaForCausalLM"):
        export_gguf(registry, "qa@1", "f16")
    assert _artifacts(registry) == before
    with pytest.raises(InvalidInput, match="GGUF type must be one of"):
        export_gguf(registry, "qa@1", "q3")


def test_a_full_disk_leaves_nothing_registered_or_behind(registry, monkeypatch):
    from loragate.quantize import scratch

    before = _artifacts(registry)
    monkeypatch.setattr(scratch.shutil, "disk_usage", lambda path: type("U", (), {"free": 10 << 20})())
    with pytest.raises(OutOfSpace, match="needs about .* MiB free"):
        export_gguf(registry, "qa@1", "bf16")
    monkeypatch.undo()

    # The disk fills while llama.cpp's converter writes: the error says so, the scratch
    # folder goes, nothing is registered.
    import subprocess

    from loragate.quantize import llama_cpp_tools

    real_run = subprocess.run

    def converter_hits_a_full_disk(command, **kwargs):
        if "--outfile" not in command:
            return real_run(command, **kwargs)
        return subprocess.CompletedProcess(command, 1, "", "OSError: [Errno 28] No space left on device\n")

    monkeypatch.setattr(llama_cpp_tools.subprocess, "run", converter_hits_a_full_disk)
    with pytest.raises(OutOfSpace, match="disk filled up"):
        export_gguf(registry, "qa@1", "bf16")
    assert _artifacts(registry) == before
    assert list((registry.settings.home / "tmp").iterdir()) == []


def _agrees(predictions, references, metric):
    """The answer starts with the adapter's first six tokens (compare may generate longer)."""
    return sum(p.startswith(r) for p, r in zip(predictions, references)) / len(references)


@pytest.fixture(scope="module")
def self_labelled(tmp_path_factory, registry, hf_base, prompt_ids):
    """A prepared dataset whose answers are the unquantized adapter's own greedy outputs, so the
    adapter scores 1.0 and every other artifact's score is its agreement with the adapter."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loragate.trainer.dataset import Example

    tokenizer = AutoTokenizer.from_pretrained(hf_base)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32),
                                           registry.artifact_path("qa@1"))
    examples = []
    for prompt, ids in zip(PROMPTS, prompt_ids):
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
        examples.append(Example(prompt=[{"role": "user", "content": prompt}],
                                completion=tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)))
    return write_prepared(tmp_path_factory.mktemp("self-labelled"), examples)


def test_compare_scores_every_artifact_against_the_adapter(registry, self_labelled):
    from loragate.quantize.compare import compare_version

    report = compare_version(registry, "qa@1", self_labelled, score=_agrees, ceiling=2.0)
    rows = {row.artifact: row for row in report.rows}
    assert list(rows)[:5] == ["adapter", "merged", "gguf f16", "gguf q8_0", "gguf q4_k_m"]
    assert list(rows)[5].startswith("gguf-lora f16 on ")
    assert rows["adapter"].score == 1.0 and rows["adapter"].quality_loss_points == 0
    # bf16 merged weights and F16 keep the adapter's greedy answers; each row's loss is its gap.
    assert rows["merged"].score >= 0.9 and rows["gguf f16"].score >= 0.9
    for row in report.rows:
        assert row.quality_loss_points == pytest.approx((1.0 - row.score) * 100)
        assert row.fit == (row.quality_loss_points <= 2.0)
        assert row.size_bytes > 0 and row.load_s > 0 and row.tokens_per_s > 0
    assert rows["gguf q4_k_m"].size_bytes < rows["gguf q8_0"].size_bytes < rows["gguf f16"].size_bytes
    # Recorded in the registry against the version, on the test split's hash.
    recorded = registry.get("qa@1").score("default@gguf-q4_k_m", "exact_match")
    assert recorded.value == rows["gguf q4_k_m"].score and recorded.eval_data_sha256 == report.eval_data_sha256


def test_the_gate_holds_what_the_gateway_serves_to_the_quality_ceiling(registry, self_labelled):
    """`eval --served` on the shipped Q4_1 base loses more than the ceiling: the gate refuses and
    names the served score; picking the base by measured loss serves it at a precision that passes."""
    from loragate.quantize.served import pick_base_by_loss, score_served
    from loragate.registry import EvalInput, served_suite

    [shipped] = score_served(registry, "qa@1", self_labelled, pick_base=False, score=_agrees)
    adapter, served = shipped.rows
    assert [adapter.artifact, served.served] == ["adapter", True] and served.artifact.endswith("Q4_1.gguf")
    # The adapter's primary score on the same data (the trainer's eval records it in real use).
    registry.add_eval(EvalInput(suite="default", metrics={"exact_match": adapter.score}, sample_count=shipped.examples,
                                eval_data_sha256=shipped.eval_data_sha256), ref="qa@1")
    recorded = registry.get("qa@1").score(served_suite("default"), "quality_loss_points")
    assert recorded.value == served.quality_loss_points > 2.0, shipped.rows  # 10 points: 9 of 10 agree
    refused = registry.check_gate("qa@1")
    reason = next(r for r in refused.reasons if r.startswith("the served path"))
    assert f"scores {served.score:.4g} on default/exact_match, {served.quality_loss_points:.1f} points below" in reason
    assert "higher-precision base" in reason

    tried = [shipped, *pick_base_by_loss(registry, "qa@1", self_labelled, shipped, score=_agrees)]
    assert tried[-1].rows[1].fit, [r.rows[1] for r in tried]
    assert all(not r.rows[1].fit for r in tried[:-1])  # stopped at the first base within the ceiling
    assert all(r.rows[0] == adapter for r in tried)  # the adapter scored once
    chosen = registry.base_models()[0].serving_gguf
    assert tried[-1].rows[1].artifact.endswith(f".{chosen['type']}.gguf") and chosen["type"] in ("q8_0", "f16")
    assert registry.audit_log(target=BASE_ID)[-1].action == "base.serving-gguf"
    passed = registry.check_gate("qa@1")
    assert not any(r.startswith("the served path") for r in passed.reasons)
    assert any(c.startswith(f"served path {tried[-1].rows[1].score:.4g}") for c in passed.checks)


def test_base_gguf_and_eval_served_from_the_cli(home, self_labelled):
    """`quantize base-gguf` records what the llama.cpp backend serves; `eval --served` scores it."""
    run_cli(home, "quantize", "base-gguf", BASE_ID, "--type", "f16", "--reason", "cli")
    bases = json.loads(run_cli(home, "registry", "base", "list", "--json").stdout)
    serving = bases[0]["serving_gguf"]
    assert serving["type"] == "f16" and serving["file"].endswith(".f16.gguf") and len(serving["artifact"]) == 64
    assert "SmolLM2-135M-Instruct.f16.gguf" in run_cli(home, "registry", "show", "qa@1").stdout
    out = json.loads(run_cli(home, "eval", "qa@1", "--served", "--keep-base", "--data", str(self_labelled),
                             "--limit", "3", "--json").stdout)
    [report] = out["served"]
    adapter, served = report["rows"]
    assert served["served"] and served["artifact"].endswith(".f16.gguf") and report["examples"] == 3
    assert served["quality_loss_points"] == pytest.approx((adapter["score"] - served["score"]) * 100)
    assert isinstance(out["gate"]["passed"], bool)
