"""Annotator quality in a real round of the loop (Ray, Serve, gRPC, DeepSpeed on a tiny model):
k annotators per task, rule-made gold pairs mixed in, quality tables in the round report."""

import json
from collections import defaultdict

import pytest

from tests.actors.test_loop import tiny_run_config


@pytest.mark.slow
def test_a_round_has_k_annotators_per_task_gold_tasks_and_quality_tables(ray_session, tmp_path):
    from actors.coordinator import Coordinator
    from services.feedback.store import open_store

    cfg = tiny_run_config(tmp_path, rounds=1, annotations_per_task=2, min_feedback_per_round=16, ppo_iterations_per_round=1,
                          quality={"gold_rate": 0.25, "min_gold": 1, "simulated_gold_margin": 0.5})
    [report] = Coordinator(cfg).run()

    store = open_store(cfg.feedback.service.store)
    try:
        tasks = list(store.iter_tasks(["loop"]))
        judged = defaultdict(list)
        for stored in store.iter_after(0, ["loop"]):
            judged[stored.record.task_id].append(stored.record.annotator_id)
        gold = store.gold_answers(["loop"])
    finally:
        store.close()
    assert len(tasks) == 8 and {t.annotations_wanted for t in tasks} == {2}
    assert {task_id: sorted(who) for task_id, who in judged.items()} == {t.task_id: ["a1", "a2"] for t in tasks}
    assert 1 <= len(gold) <= 2 and set(gold) <= {t.task_id for t in tasks}
    assert report.quality["gold_tasks_published"] == len(gold)

    for table in ("round", "overall"):
        rows = {row["annotator"]: row for row in report.quality[table]["annotators"]}
        assert set(rows) == {"a1", "a2"} and rows["a1"]["judgements"] == 8
        assert rows["a1"]["gold_answered"] == len(gold) and rows["a1"]["gold_accuracy"] == 1.0  # a1 follows the rule exactly
        assert "preference" in report.quality[table]["alpha"]
    saved = json.loads((tmp_path / "run" / "report.json").read_text())["rounds"][0]["quality"]
    assert saved["overall"] == report.quality["overall"] and saved["paused"] == []
