"""The human judge: pairs published as labeling tasks in a real feedback service on SQLite,
judged by simulated annotators over real gRPC, gold tasks mixed in; waited for, or collected later."""

from __future__ import annotations

from rlhf.eval.config import HumanJudgeConfig
from rlhf.eval.records import EvalItem
from rlhf.quality.judges import Judge, JudgeConfig
from services.eval.human import HumanJudge
from services.feedback.store import open_store
from tests.services.eval.helpers import annotators, gold_file
from tests.services.feedback.conftest import running_server

ITEMS = [
    EvalItem("Say hi.", "Hi.", "Hello there, it is so nice to meet you today."),
    EvalItem("Describe rain.", "Rain falls from clouds and makes everything wet.", "Wet."),
    EvalItem("Name a colour.", "Blue.", "Red."),
    EvalItem("Tell a story.", "", "Once upon a time."),
    EvalItem("Say bye.", "Goodbye.", "Goodbye and see you again soon, my friend."),
]


def test_pairs_go_out_as_tasks_and_come_back_as_the_annotators_majority(tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    cfg = HumanJudgeConfig(project="eval", annotations_per_item=3, gold_tasks=gold_file(tmp_path / "gold.jsonl"), gold_rate=0.4,
                           timeout_s=0.0, poll_s=0.05)
    expected = tuple(Judge(JudgeConfig(rule="concise")).compare(i.prompt, i.answer_a, i.answer_b) for i in ITEMS)
    assert expected == ("a", "b", "tie", "b", "a")
    with running_server(url) as server:
        store = open_store(url)
        try:
            judge = HumanJudge(cfg, store, "e1")
            first = judge.judge(ITEMS)  # nobody is labeling yet, and no time to wait
            assert first.verdicts == (None,) * len(ITEMS) and judge.missing(ITEMS) == 3 * len(ITEMS)
            published = judge.tasks(ITEMS)
            assert len(published.tasks) == len(ITEMS) + 2  # 40% gold
            assert {t.task_id for t in published.tasks if t.gold is not None} == {"eval-e1-g0000", "eval-e1-g0001"}
            # both orders are shown: the candidate that shows A is not always the first
            assert {published.a_candidate[t].endswith("-0") for t in published.item_tasks} == {True, False}
            assert judge.publish(ITEMS).tasks == published.tasks  # publishing again changes nothing
            with annotators(server.address, n=3):
                assert judge.wait(ITEMS, timeout_s=120) == 0
            result = judge.collect(ITEMS)  # what `hitl eval --collect` reads later
        finally:
            store.close()
    assert result.verdicts == expected
    assert result.details["gold_accuracy"] == {"sim-0": 1.0, "sim-1": 1.0, "sim-2": 1.0}
    assert result.details["judgements"] == 3 * len(ITEMS) and result.details["excluded_annotators"] == []
    assert result.item_details[0]["votes"] == {"a": 3}


def test_annotators_under_the_gold_accuracy_bar_are_left_out(tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    cfg = HumanJudgeConfig(project="eval", annotations_per_item=4, gold_tasks=gold_file(tmp_path / "gold.jsonl", 2), gold_rate=0.4,
                           min_gold_accuracy=0.9, timeout_s=120.0, poll_s=0.05)
    with running_server(url) as server:
        store = open_store(url)
        try:
            judge = HumanJudge(cfg, store, "e2")
            judge.publish(ITEMS)
            # two follow the concise rule; two prefer positive words, which the gold pairs do not
            # separate (a tie against a gold answer is wrong) and which ties most pairs here
            with annotators(server.address, n=2, rule="concise"), annotators(server.address, n=2, rule="positive", prefix="pos"):
                assert judge.wait(ITEMS) == 0
            result = judge.collect(ITEMS)
        finally:
            store.close()
    acc = result.details["gold_accuracy"]
    assert acc == {"sim-0": 1.0, "sim-1": 1.0, "pos-0": 0.0, "pos-1": 0.0}
    assert result.details["excluded_annotators"] == ["pos-0", "pos-1"]
    assert result.verdicts == ("a", "b", "tie", "b", "a")
