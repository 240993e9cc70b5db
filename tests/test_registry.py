"""Every registry operation, on SQLite and on PostgreSQL (the ``registry`` fixture runs on both)."""

import json

import pytest
from pydantic import ValidationError
from sqlalchemy import text

from loragate.registry import ArtifactCorrupt, Conflict, EvalInput, GateRefused, InvalidAdapter, InvalidInput, NotFound, OutputCheck, Registry
from loragate.registry.models import Licence

from .conftest import BASE_ID

SUITE, METRIC, DATA = "default", "exact_match", "d" * 64


def scores(value: float, data: str = DATA, suite: str = SUITE, **extra) -> EvalInput:
    return EvalInput(suite=suite, metrics={METRIC: value, **extra}, sample_count=50, eval_data_sha256=data)


def stored_state(registry: Registry) -> dict:
    """Everything a failed command must leave untouched (the audit log may grow)."""
    tables = ["adapter", "adapter_version", "eval_result", "alias", "alias_change", "contamination_check",
              "base_model", "licence"]
    with registry.engine.connect() as conn:
        counts = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in tables}
        aliases = sorted(map(tuple, conn.execute(text("SELECT adapter_name, name, version_id FROM alias")).all()))
    return {"counts": counts, "aliases": aliases}


@pytest.fixture
def ready(registry, adapter_factory):
    """sentiment@1 and @2, both trained on data that passed its contamination check, with a
    base baseline of 0.4 and a prompted baseline of 0.5."""
    registry.record_contamination_check("t" * 64, passed=True, method="exact-hash")
    for _ in range(2):
        registry.register("sentiment", adapter_factory(), base=BASE_ID, training_data_sha256="t" * 64)
    registry.add_eval(scores(0.4), base=BASE_ID, subject="base")
    registry.add_eval(scores(0.5), base=BASE_ID, subject="prompted_base")
    return registry


def test_register_numbers_versions_and_records_lineage(registry, adapter_factory):
    first = registry.register("sentiment", adapter_factory(r=4), base=BASE_ID, training_data_sha256="a" * 64,
                              training_config={"lr": 1e-4, "epochs": 3}, author="ana", notes="first")
    second = registry.register("sentiment", adapter_factory(r=8), base=BASE_ID, parent=first.ref)
    assert (first.ref, second.ref) == ("sentiment@1", "sentiment@2")
    assert first.r == 4 and first.lora_alpha == 8 and first.target_modules == ["q_proj", "v_proj"]
    assert first.training_config == {"lr": 1e-4, "epochs": 3} and first.author == "ana"
    assert second.parent == "sentiment@1" and second.author == "tester"
    assert first.licence == "apache-2.0"  # inherited from the base model
    assert len(first.artifact_sha256) == 64 and first.artifact_size > 100_000
    assert [v.ref for v in registry.list_versions()] == ["sentiment@1", "sentiment@2"]
    assert registry.get("sentiment@latest").version == 2


def test_registering_identical_files_twice_is_a_conflict(registry, adapter_factory):
    folder = adapter_factory()
    registry.register("sentiment", folder, base=BASE_ID)
    with pytest.raises(Conflict, match="already sentiment@1"):
        registry.register("sentiment", folder, base=BASE_ID)


def test_show_resolves_numbers_aliases_and_bare_names(ready):
    ready.set_alias("sentiment@1", "candidate")
    assert ready.get("sentiment@candidate").version == 1
    assert ready.get("sentiment@candidate").aliases == ["candidate"]
    with pytest.raises(NotFound, match="no alias 'production'"):
        ready.get("sentiment")
    ready.add_eval(scores(0.9), ref="sentiment@2")
    ready.promote("sentiment@2")
    assert ready.get("sentiment").version == 2
    with pytest.raises(NotFound, match="no version 7"):
        ready.get("sentiment@7")
    with pytest.raises(NotFound, match="no adapter named 'other'"):
        ready.get("other@1")
    with pytest.raises(InvalidInput):
        ready.get("bad name@1")


def test_diff_shows_config_and_metrics_side_by_side(registry, adapter_factory):
    registry.register("s", adapter_factory(r=4), base=BASE_ID, training_config={"lr": 1e-4})
    registry.register("s", adapter_factory(r=8), base=BASE_ID, training_config={"lr": 2e-4, "epochs": 2})
    registry.add_eval(scores(0.5), ref="s@1")
    registry.add_eval(scores(0.7, rouge_l=0.3), ref="s@2")
    rows = {row.field: row for row in registry.diff("s@1", "s@2")}
    assert (rows["r"].a, rows["r"].b, rows["r"].same) == (4, 8, False)
    assert rows["base_model"].same
    assert (rows["training_config.lr"].a, rows["training_config.lr"].b) == (1e-4, 2e-4)
    assert (rows["training_config.epochs"].a, rows["training_config.epochs"].b) == (None, 2)
    assert (rows["eval.default/exact_match"].a, rows["eval.default/exact_match"].b) == (0.5, 0.7)
    assert (rows["eval.default/rouge_l"].a, rows["eval.default/rouge_l"].b) == (None, 0.3)


def test_eval_add_for_versions_and_baselines(ready):
    added = ready.add_eval(EvalInput(suite="s", metrics={"loss": 1.2, "f1": 0.7}, sample_count=10,
                                     higher_is_better={"loss": False}), ref="sentiment@1")
    assert {(e.metric, e.higher_is_better) for e in added} == {("loss", False), ("f1", True)}
    assert {e.metric for e in ready.get("sentiment@1").evals} == {"loss", "f1"}
    assert set(ready.baselines(BASE_ID, SUITE, METRIC, DATA)) == {"base", "prompted_base"}
    with pytest.raises(InvalidInput):
        ready.add_eval(scores(0.1), ref="sentiment@1", base=BASE_ID)
    with pytest.raises(NotFound):
        ready.add_eval(scores(0.1), base="no-such-base", subject="base")
    with pytest.raises(ValueError, match="finite"):
        EvalInput(suite="s", metrics={"f1": float("nan")}, sample_count=1)


def test_aliases_set_move_and_remove(ready):
    ready.set_alias("sentiment@1", "candidate", reason="try it")
    ready.set_alias("sentiment@2", "candidate")
    assert ready.get("sentiment@candidate").version == 2
    ready.remove_alias("sentiment", "candidate")
    with pytest.raises(NotFound):
        ready.get("sentiment@candidate")
    history = [(c.alias, c.from_version, c.to_version, c.action) for c in ready.alias_history("sentiment")]
    assert history == [("candidate", None, 1, "alias.set"), ("candidate", 1, 2, "alias.set"),
                       ("candidate", 2, None, "alias.rm")]
    with pytest.raises(InvalidInput, match="guarded by the promotion gate"):
        ready.set_alias("sentiment@1", "production")
    with pytest.raises(InvalidInput, match="latest"):
        ready.set_alias("sentiment@1", "latest")
    with pytest.raises(InvalidInput):
        ready.set_alias("sentiment@1", "Bad Alias")


def test_promote_passes_the_gate(ready):
    ready.add_eval(scores(0.8), ref="sentiment@1")
    report = ready.promote("sentiment@1", reason="beats baselines")
    assert report.passed and report.reasons == []
    assert any("beats the prompted base model's 0.5" in c for c in report.checks)
    assert ready.get("sentiment").version == 1


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda r: None, "no score on the primary eval default/exact_match"),
        (lambda r: r.add_eval(scores(0.3), ref="sentiment@2"), "does not beat the base model's 0.4"),
        (lambda r: r.add_eval(scores(0.45), ref="sentiment@2"), "does not beat the prompted base model's 0.5"),
        (lambda r: r.add_eval(scores(0.9, data="e" * 64), ref="sentiment@2"), "no base-model baseline"),
        (lambda r: (r.add_eval(scores(0.7), ref="sentiment@2")), "worse than production sentiment@1's 0.8"),
    ],
)
def test_gate_refuses_on_scores(ready, setup, reason):
    ready.add_eval(scores(0.8), ref="sentiment@1")
    ready.promote("sentiment@1")
    setup(ready)
    before = stored_state(ready)
    with pytest.raises(GateRefused) as refused:
        ready.promote("sentiment@2")
    assert any(reason in r for r in refused.value.reasons), refused.value.reasons
    assert stored_state(ready) == before
    assert ready.get("sentiment").version == 1
    last = ready.audit_log(target="sentiment@production")[-1]
    assert (last.action, last.outcome) == ("promote", "refused")


def test_gate_tolerance_and_loss_direction(registry, adapter_factory):
    registry.record_contamination_check("t" * 64, passed=True, method="exact-hash")
    for _ in range(2):
        registry.register("s", adapter_factory(), base=BASE_ID, training_data_sha256="t" * 64)
    loss = {"higher_is_better": {METRIC: False}}
    registry.add_eval(EvalInput(suite=SUITE, metrics={METRIC: 2.0}, sample_count=9, eval_data_sha256=DATA, **loss),
                      base=BASE_ID, subject="base")
    registry.add_eval(EvalInput(suite=SUITE, metrics={METRIC: 1.0}, sample_count=9, eval_data_sha256=DATA, **loss),
                      ref="s@1")
    registry.promote("s@1")
    # 1.005 is worse (a loss) but within the default tolerance of 0.01.
    registry.add_eval(EvalInput(suite=SUITE, metrics={METRIC: 1.005}, sample_count=9, eval_data_sha256=DATA, **loss),
                      ref="s@2")
    assert registry.promote("s@2").passed


def test_gate_refuses_when_production_was_scored_on_other_data(ready):
    ready.add_eval(scores(0.8), ref="sentiment@1")
    ready.promote("sentiment@1")
    ready.add_eval(scores(0.9, data="e" * 64), ref="sentiment@2")
    ready.add_eval(scores(0.1, data="e" * 64), base=BASE_ID, subject="base")
    with pytest.raises(GateRefused, match="other eval data"):
        ready.promote("sentiment@2")


def test_gate_refuses_on_licence(registry, adapter_factory):
    registry.record_contamination_check("t" * 64, passed=True, method="exact-hash")
    registry.add_eval(scores(0.1), base=BASE_ID, subject="base")
    registry.register("nc", adapter_factory(), base=BASE_ID, licence="cc-by-nc-4.0", training_data_sha256="t" * 64)
    registry.register("llama", adapter_factory(), base=BASE_ID, licence="llama3", training_data_sha256="t" * 64)
    for ref in ("nc@1", "llama@1"):
        registry.add_eval(scores(0.9), ref=ref)
    with pytest.raises(GateRefused, match="does not allow commercial use"):
        registry.promote("nc@1")
    assert registry.promote("nc@1", commercial=False).passed
    with pytest.raises(GateRefused, match="caps use at 700,000,000 monthly active users"):
        registry.promote("llama@1", mau=800_000_000)
    assert registry.promote("llama@1", mau=1_000_000).passed


def test_a_restrictive_base_licence_binds_its_adapters(settings, base_folder, adapter_factory):
    registry = Registry(settings)
    registry.add_base_model("research-base", source="x", licence="cc-by-nc-4.0", folder=base_folder)
    registry.record_contamination_check("t" * 64, passed=True, method="exact-hash")
    registry.add_eval(scores(0.1), base="research-base", subject="base")
    # The adapter claims Apache-2.0, but the base it derives from is non-commercial.
    registry.register("a", adapter_factory(base="x"), base="research-base", licence="apache-2.0",
                      training_data_sha256="t" * 64)
    registry.add_eval(scores(0.9), ref="a@1")
    with pytest.raises(GateRefused, match="cc-by-nc-4.0 does not allow commercial use"):
        registry.promote("a@1")


@pytest.mark.parametrize(
    ("data_hash", "check", "reason"),
    [
        (None, None, "no training-data sha256"),
        ("u" * 64, None, "no contamination check"),
        ("u" * 64, False, "contamination check failed"),
    ],
)
def test_gate_refuses_on_contamination(registry, adapter_factory, data_hash, check, reason):
    registry.add_eval(scores(0.1), base=BASE_ID, subject="base")
    if check is not None:
        registry.record_contamination_check(data_hash, passed=check, method="minhash", details={"overlap": 3})
    registry.register("s", adapter_factory(), base=BASE_ID, training_data_sha256=data_hash)
    registry.add_eval(scores(0.9), ref="s@1")
    with pytest.raises(GateRefused, match=reason):
        registry.promote("s@1")


def test_force_needs_a_reason_and_is_audited(ready):
    with pytest.raises(InvalidInput, match="--force needs --reason"):
        ready.promote("sentiment@2", force=True)
    report = ready.promote("sentiment@2", force=True, reason="hotfix for incident 42")
    assert not report.passed and ready.get("sentiment").version == 2
    event = ready.audit_log(target="sentiment@production")[-1]
    assert event.action == "promote.forced" and "incident 42" in event.reason and "no score" in event.reason


def test_ungated_alias_moves_and_the_gate_only_reports(ready):
    report = ready.promote("sentiment@2", to="candidate")
    assert not report.passed and "no score" in report.reasons[0]
    assert ready.get("sentiment@candidate").version == 2
    assert ready.audit_log(target="sentiment@candidate")[-1].action == "promote"


def test_rollback_walks_back_through_history(ready, adapter_factory):
    ready.register("sentiment", adapter_factory(), base=BASE_ID, training_data_sha256="t" * 64)
    for version, value in ((1, 0.7), (2, 0.8), (3, 0.9)):
        ready.add_eval(scores(value), ref=f"sentiment@{version}")
        ready.promote(f"sentiment@{version}")
    assert ready.rollback("sentiment", reason="latency").version == 2
    assert ready.rollback("sentiment").version == 1
    with pytest.raises(Conflict, match="no earlier version"):
        ready.rollback("sentiment")
    ready.promote("sentiment@3")
    assert ready.rollback("sentiment").version == 1
    with pytest.raises(NotFound):
        ready.rollback("sentiment", alias="staging")


def test_export_writes_verified_files_and_the_record(ready, tmp_path):
    out = ready.export("sentiment@1", tmp_path / "export")
    record = json.loads((out / "loragate-version.json").read_text())
    assert record["version"] == 1 and record["artifact_sha256"] == ready.get("sentiment@1").artifact_sha256
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()


def test_corrupt_artifact_is_never_served(ready):
    path = ready.artifact_path("sentiment@1") / "adapter_model.safetensors"
    path.chmod(0o644)
    with path.open("r+b") as handle:
        handle.seek(-1, 2)
        handle.write(b"\x01")
    from loragate.registry import ArtifactCorrupt

    with pytest.raises(ArtifactCorrupt, match="fails its sha256"):
        ready.artifact_path("sentiment@1")


def test_gc_removes_only_unreferenced_artifacts(ready, tmp_path):
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "x.bin").write_bytes(b"x" * 1000)
    digest = ready.store.put(orphan).sha256
    assert ready.gc(grace_s=3600).removed == []  # too fresh: maybe a register in flight
    dry = ready.gc(dry_run=True, grace_s=0)
    assert dry.removed == [digest] and digest in ready.store.digests()
    report = ready.gc(grace_s=0)
    assert report.removed == [digest] and report.freed_bytes == 1000 and report.kept == 2
    assert digest not in ready.store.digests()
    ready.artifact_path("sentiment@1")
    ready.artifact_path("sentiment@2")


def test_audit_log_records_who_what_before_and_after(ready):
    ready.add_eval(scores(0.8), ref="sentiment@1")
    ready.promote("sentiment@1", reason="ship it")
    actions = [e.action for e in ready.audit_log()]
    assert actions[:2] == ["base.add", "contamination.record"]
    assert actions.count("register") == 2 and "eval.add" in actions
    promote = ready.audit_log(target="sentiment@production")[-1]
    assert (promote.actor, promote.before, promote.after, promote.reason) == (
        "tester", {"version": None}, {"version": 1}, "ship it")


def test_licences_presets_and_custom(registry):
    ids = {li.id for li in registry.licences()}
    assert {"apache-2.0", "mit", "llama3", "gemma", "cc-by-nc-4.0"} <= ids
    llama = next(li for li in registry.licences() if li.id == "llama3")
    assert llama.mau_cap == 700_000_000 and llama.commercial_use and llama.acceptable_use
    registry.add_licence(Licence(id="acme-internal", name="ACME", commercial_use=True, mau_cap=1000))
    with pytest.raises(Conflict):
        registry.add_licence(Licence(id="mit", name="again", commercial_use=True))


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda f, tmp: tmp / "does-not-exist", InvalidAdapter),
        (lambda f, tmp: _corrupt(f(), b"\x00garbage"), InvalidAdapter),
        (lambda f, tmp: f(hidden=2048), InvalidAdapter),
        (lambda f, tmp: f(base="meta-llama/Llama-3.2-1B"), InvalidAdapter),
    ],
)
def test_failed_register_changes_nothing(ready, adapter_factory, tmp_path, make, error):
    before, digests = stored_state(ready), ready.store.digests()
    with pytest.raises(error):
        ready.register("sentiment", make(adapter_factory, tmp_path), base=BASE_ID)
    assert stored_state(ready) == before and ready.store.digests() == digests


def test_unknown_base_licence_or_parent_changes_nothing(ready, adapter_factory):
    before = stored_state(ready)
    with pytest.raises(NotFound, match="no base model"):
        ready.register("sentiment", adapter_factory(), base="unknown-base")
    with pytest.raises(NotFound, match="no licence"):
        ready.register("sentiment", adapter_factory(), base=BASE_ID, licence="wtfpl")
    with pytest.raises(NotFound, match="no version 9"):
        ready.register("sentiment", adapter_factory(), base=BASE_ID, parent="sentiment@9")
    with pytest.raises(NotFound):
        ready.promote("sentiment@9")
    assert stored_state(ready) == before


def _corrupt(folder, payload):
    (folder / "adapter_model.safetensors").write_bytes(payload)
    return folder


def test_reopening_keeps_everything(ready, settings):
    ready.add_eval(scores(0.8), ref="sentiment@1")
    ready.promote("sentiment@1")
    again = Registry(settings)
    assert again.get("sentiment").version == 1
    assert [v.ref for v in again.list_versions("sentiment")] == ["sentiment@1", "sentiment@2"]


def test_a_version_declares_its_output_check(ready):
    assert ready.get("sentiment@1").output_check is None
    info = ready.set_output_check("sentiment@1", OutputCheck(labels=["positive", "negative"]), reason="eval labels")
    assert info.output_check.passes(" Positive.") and not info.output_check.passes("neutral")
    assert Registry(ready.settings).get("sentiment@1").output_check == OutputCheck(labels=["positive", "negative"])
    event = ready.audit_log(target="sentiment@1")[-1]
    assert (event.action, event.before, event.after["output_check"]["labels"]) == (
        "output-check.set", {"output_check": None}, ["positive", "negative"])
    assert ready.set_output_check("sentiment@1", None).output_check is None
    with pytest.raises(ValidationError):
        OutputCheck(labels=["yes", "Yes!"])  # the same label once normalized
    with pytest.raises(ValidationError):
        OutputCheck()
    with pytest.raises(NotFound):
        ready.set_output_check("sentiment@9", OutputCheck(json_output=True))


def test_a_base_records_the_gguf_it_is_served_from_and_notices_a_changed_file(ready, tmp_path):
    assert ready.serving_gguf(BASE_ID) is None
    gguf = tmp_path / "base.q8_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    ready.set_serving_gguf(BASE_ID, gguf, out_type="q8_0", reason="Q4 loses 3 points")
    gguf.write_bytes(b"GGUF" + bytes(99) + b"y")  # the store holds its own copy: the source may change
    served = Registry(ready.settings).serving_gguf(BASE_ID)
    assert served.name == "base.q8_0.gguf" and served.read_bytes() == b"GGUF" + bytes(100)
    event = ready.audit_log(target=BASE_ID)[-1]
    assert (event.action, event.after["serving_gguf"]["type"], event.reason) == ("base.serving-gguf", "q8_0",
                                                                                 "Q4 loses 3 points")
    served.chmod(0o644)
    served.write_bytes(b"GGUF" + bytes(99) + b"x")  # the stored copy changed behind the registry's back
    with pytest.raises(ArtifactCorrupt, match="serving GGUF"):
        ready.serving_gguf(BASE_ID)
    assert ready.set_serving_gguf(BASE_ID, None).serving_gguf is None and ready.serving_gguf(BASE_ID) is None
    with pytest.raises(NotFound):
        ready.set_serving_gguf("no-such-base", gguf)


def test_a_served_path_below_the_ceiling_is_refused_by_the_gate(ready):
    """Scores as `eval --served` records them: the loss is read on the primary score's eval data."""
    ready.add_eval(scores(0.63), ref="sentiment@1")
    assert ready.check_gate("sentiment@1").passed
    served = scores(0.6, suite="default@served", quality_loss_points=3.0)
    ready.add_eval(served, ref="sentiment@1")
    report = ready.check_gate("sentiment@1")
    assert any(r.startswith("the served path scores 0.6 on default/exact_match, 3.0 points below") for r in report.reasons)
    ready.add_eval(scores(0.6, data="e" * 64, suite="default@served", quality_loss_points=3.0), ref="sentiment@1")
    assert not any("served path" in r for r in ready.check_gate("sentiment@1").reasons)  # other data: not comparable
    ready.add_eval(scores(0.62, suite="default@served", quality_loss_points=1.0), ref="sentiment@1")
    assert ready.check_gate("sentiment@1").passed


def test_the_migrations_build_exactly_the_tables_the_models_declare(registry):
    """A column added to a model without a migration (or the reverse) fails here, on both databases."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    import loragate.gateway.models  # noqa: F401  (its tables are part of the one metadata)

    with registry.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert [d for d in differences if d[0] not in ("modify_nullable", "modify_default")] == []
