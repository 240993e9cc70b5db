"""Several processes writing at once (CLI calls, gateway replicas): no lost update, full audit."""

import multiprocessing as mp

import pytest

from loragate.registry import EvalInput, Registry
from loragate.settings import Settings

from .conftest import BASE_ID, make_adapter

ROUNDS = 4
_spawn = mp.get_context("spawn")


def _promote_worker(home: str, url: str, ref: str, barrier, results) -> None:
    registry = Registry(Settings(home=home, database_url=url, user=f"proc-{ref}"))
    barrier.wait()
    try:
        registry.promote(ref, reason="race")
        results.put((ref, "ok"))
    except Exception as exc:  # reported to the parent, which fails the test with it
        results.put((ref, repr(exc)))


def _register_worker(home: str, url: str, folders: list[str], barrier, results) -> None:
    registry = Registry(Settings(home=home, database_url=url))
    barrier.wait()
    for folder in folders:
        try:
            results.put(registry.register("raced", folder, base=BASE_ID).version)
        except Exception as exc:
            results.put(repr(exc))


def _run(target, argument_sets, results_per_process):
    barrier, results = _spawn.Barrier(len(argument_sets)), _spawn.Queue()
    processes = [_spawn.Process(target=target, args=(*args, barrier, results)) for args in argument_sets]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in range(len(processes) * results_per_process)]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    return outcomes


@pytest.fixture
def three_good_versions(registry, adapter_factory):
    registry.record_contamination_check("t" * 64, passed=True, method="exact-hash")
    registry.add_eval(EvalInput(suite="default", metrics={"exact_match": 0.1}, sample_count=9,
                                eval_data_sha256="d" * 64), base=BASE_ID, subject="base")
    for _ in range(3):
        info = registry.register("race", adapter_factory(), base=BASE_ID, training_data_sha256="t" * 64)
        registry.add_eval(EvalInput(suite="default", metrics={"exact_match": 0.9}, sample_count=9,
                                    eval_data_sha256="d" * 64), ref=info.ref)
    return registry


def test_two_processes_promoting_at_once_leave_one_consistent_alias(three_good_versions, settings):
    registry = three_good_versions
    for _ in range(ROUNDS):
        outcomes = _run(_promote_worker, [(str(settings.home), settings.resolved_database_url, ref)
                                          for ref in ("race@2", "race@3")], 1)
        assert sorted(outcomes) == [("race@2", "ok"), ("race@3", "ok")], outcomes
        changes = registry.alias_history("race", "production")
        first, second = changes[-2:]
        # Serialised: the second move saw the first one's result (no lost update).
        assert second.from_version == first.to_version
        assert registry.get("race").version == second.to_version
    promotes = [e for e in registry.audit_log(target="race@production") if e.action == "promote"]
    assert len(promotes) == 2 * ROUNDS
    assert {e.actor for e in promotes} == {"proc-race@2", "proc-race@3"}


def test_concurrent_registers_get_distinct_version_numbers(registry, settings, tmp_path):
    folders = [[str(make_adapter(tmp_path / f"p{p}-{i}", seed=10 * p + i)) for i in range(3)] for p in range(2)]
    outcomes = _run(_register_worker, [(str(settings.home), settings.resolved_database_url, f) for f in folders], 3)
    assert sorted(outcomes) == [1, 2, 3, 4, 5, 6], outcomes
    assert [v.version for v in registry.list_versions("raced")] == [1, 2, 3, 4, 5, 6]
