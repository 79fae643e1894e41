"""Import and export round trips against real stores (SQLite and PostgreSQL),
and the `hitl feedback import/export` commands run as a user runs them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hitl.feedback.v1 import feedback_pb2 as pb
from services.feedback.formats import FormatError, export_lines, get_long, import_file, put_long
from services.feedback.store import open_store
from tests.services.feedback.conftest import fresh_store_url, make_task, preference
from tests.services.feedback.test_cli import hitl

DATA = Path(__file__).parent / "data"
HH = DATA / "hh_rlhf_sample.jsonl"
UF = DATA / "ultrafeedback_sample.jsonl"


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_hh_rlhf_round_trip(store):
    report = import_file(store, "hh-rlhf", HH, project="imp", annotator_id="anthropic")
    assert report.summary() == {"lines": 5, "tasks_created": 5, "tasks_existing": 0, "records_accepted": 5, "records_duplicate": 0, "errors": 0}
    assert list(export_lines(store, "hh-rlhf", ["imp"])) == lines(HH)

    # what the store holds: a dialogue prompt, two candidates, a preference for the chosen one
    first = next(store.iter_after(0)).record
    task = store.get_task(first.task_id)
    assert task.prompt == "\n\nHuman: What is the capital of France?"
    assert [(c.candidate_id, c.text) for c in task.candidates] == [("c0", "Paris."), ("c1", "Lyon, I think.")]
    assert first.annotator_id == "anthropic" and first.preference.choice == pb.Preference.CHOICE_A
    multi = store.get_task(list(store.iter_after(0))[1].record.task_id)
    assert multi.prompt.endswith("\n\nHuman: How long to knead?") and multi.candidates[1].text == "Forever."

    # importing again stores nothing new; the duplicate line of the file stays two tasks
    again = import_file(store, "hh-rlhf", HH, project="imp", annotator_id="anthropic")
    assert (again.tasks_created, again.tasks_existing, again.records_accepted, again.records_duplicate) == (0, 5, 0, 5)
    assert store.stats().total_records == 5


def test_hh_rlhf_export_of_native_records(store):
    store.add_tasks([make_task("t1", n=3)])
    store.write_batch([
        preference("r1", choice=pb.Preference.CHOICE_B),
        pb.FeedbackRecord(feedback_id="r2", project="demo", task_id="t1", annotator_id="bob",
                          ranking=pb.Ranking(entries=[pb.Ranking.Entry(candidate_id="c2", rank=1), pb.Ranking.Entry(candidate_id="c0", rank=2), pb.Ranking.Entry(candidate_id="c1", rank=2)])),
    ])
    rows = [json.loads(l) for l in export_lines(store, "hh-rlhf", None)]
    head = "\n\nHuman: prompt of t1\n\nAssistant: "
    assert rows == [
        {"chosen": head + "answer 1 to t1", "rejected": head + "answer 0 to t1"},
        {"chosen": head + "answer 2 to t1", "rejected": head + "answer 0 to t1"},
        {"chosen": head + "answer 2 to t1", "rejected": head + "answer 1 to t1"},
    ]


def test_ultrafeedback_round_trip(store):
    report = import_file(store, "ultrafeedback", UF, project="uf")
    assert report.errors == [] and report.tasks_created == 2
    # row 1: four aspects -> four records; row 2: helpfulness only (honesty is all N/A)
    assert report.records_accepted == 5
    assert list(export_lines(store, "ultrafeedback", ["uf"])) == lines(UF)

    records = [s.record for s in store.iter_after(0)]
    task = store.get_task(records[0].task_id)
    assert [c.text[:12] for c in task.candidates] == ["Crimson leav", "Leaves fall ", "Autumn is a ", "Golden light"]
    assert [(s.aspect, s.min, s.max) for s in task.rating_scales] == [(a, 1.0, 5.0) for a in ("instruction_following", "honesty", "truthfulness", "helpfulness")]
    honesty = next(r for r in records if r.metadata["aspect"] == "honesty")
    # N/A ratings are skipped; "4.0" is the number 4 (its spelling is kept in metadata)
    assert [(e.candidate_id, e.value) for e in honesty.ratings.entries] == [("c0", 5.0), ("c3", 4.0)]
    assert honesty.metadata["rationale.c1"] == "Not applicable to poems."
    helpfulness = next(r for r in records if r.metadata["aspect"] == "helpfulness" and r.task_id == task.task_id)
    assert get_long(helpfulness.metadata, "rationale.c1") == "The response is thorough. " * 300
    assert all(len(v.encode()) <= 4096 for v in helpfulness.metadata.values())

    again = import_file(store, "ultrafeedback", UF, project="uf")
    assert (again.tasks_created, again.records_accepted, again.records_duplicate) == (0, 0, 5)


def test_ultrafeedback_export_of_native_ratings(store):
    store.add_tasks([make_task("t1", scales=[("helpfulness", 1, 5)])])
    store.write_batch([pb.FeedbackRecord(
        feedback_id="r1", project="demo", task_id="t1", annotator_id="alice", metadata={"rationale.c1": "short"},
        ratings=pb.Ratings(entries=[pb.Ratings.Entry(candidate_id="c1", aspect="helpfulness", value=3.5)]))])
    (row,) = [json.loads(l) for l in export_lines(store, "ultrafeedback", None)]
    assert row == {"instruction": "prompt of t1", "completions": [
        {"model": "policy-v3", "response": "answer 0 to t1", "annotations": {}},
        {"model": "policy-v3", "response": "answer 1 to t1", "annotations": {"helpfulness": {"Rating": "3.5", "Rationale": "short"}}}]}


def test_import_validates_like_the_service(tmp_path, store):
    bad = tmp_path / "bad.jsonl"
    row = json.loads(lines(UF)[1])
    row["completions"][0]["annotations"]["helpfulness"]["Rating"] = "7"  # outside 1..5
    bad.write_text(json.dumps(row) + "\n" + lines(UF)[0] + "\n")
    report = import_file(store, "ultrafeedback", bad, project="uf")
    assert len(report.errors) == 1 and re.search(r"bad.jsonl:1: record .*: ratings.entries\[0\].value: 7.0 is outside", report.errors[0])
    assert report.records_accepted == 4  # the other line is imported
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: yo"}) + "\n")
    with pytest.raises(FormatError, match=r"hh.jsonl:1: chosen: has no"):
        import_file(store, "hh-rlhf", hh)


def test_put_long_splits_on_character_boundaries():
    meta: dict[str, str] = {}
    text = "é" * 5000  # 10000 bytes
    put_long(meta, "k", text)
    assert len(meta) == 3 and all(len(v.encode()) <= 4096 for v in meta.values())
    assert get_long(meta, "k") == text


def _populate(store) -> None:
    store.add_tasks([make_task("t1", n=3, wanted=2, scales=[("helpfulness", 1, 7)]), make_task("t2", project="other")])
    rich = preference("r1", confidence=0.75, lead_time_seconds=12.5, metadata={"ui": "web", "z": "1", "a": "2"}, guidelines_version="v3")
    rich.client_time.FromJsonString("2026-11-01T10:00:00.123Z")
    rich.preference.strength = 0.5
    store.write_batch([
        rich,
        pb.FeedbackRecord(feedback_id="r2", project="demo", task_id="t1", annotator_id="bob",
                          ranking=pb.Ranking(entries=[pb.Ranking.Entry(candidate_id=c, rank=r) for c, r in (("c0", 2), ("c1", 1), ("c2", 3))])),
        pb.FeedbackRecord(feedback_id="r3", project="demo", task_id="t1", annotator_id="carol",
                          ratings=pb.Ratings(entries=[pb.Ratings.Entry(candidate_id="c2", aspect="helpfulness", value=6.5)])),
        pb.FeedbackRecord(feedback_id="r4", project="demo", task_id="t1", annotator_id="dave",
                          correction=pb.Correction(candidate_id="c1", corrected_text="better ✓", note="typo")),
        pb.FeedbackRecord(feedback_id="r5", project="other", task_id="t2", annotator_id="erin", flag=pb.Flag(kind=pb.Flag.KIND_OTHER, note="odd")),
    ])


STORE_FIELDS = re.compile(r'^\{"seq": \d+, "received_at": [0-9.e+]+, ')


def test_raw_jsonl_round_trip(store, tmp_path, store_url):
    """export -> import into an empty store -> export: identical but for seq and received_at."""
    _populate(store)
    tasks_1 = list(export_lines(store, "tasks-jsonl", None))
    records_1 = list(export_lines(store, "jsonl", None))
    (tmp_path / "tasks.jsonl").write_text("\n".join(tasks_1) + "\n")
    (tmp_path / "records.jsonl").write_text("\n".join(records_1) + "\n")
    backend = "postgres" if store_url.startswith("postgres") else "sqlite"
    (tmp_path / "copy").mkdir()
    with fresh_store_url(backend, tmp_path / "copy") as url:
        copy = open_store(url)
        try:
            assert import_file(copy, "tasks-jsonl", tmp_path / "tasks.jsonl").tasks_created == 2
            report = import_file(copy, "jsonl", tmp_path / "records.jsonl")
            assert (report.records_accepted, report.errors) == (5, [])
            assert list(export_lines(copy, "tasks-jsonl", None)) == tasks_1
            records_2 = list(export_lines(copy, "jsonl", None))
            assert [STORE_FIELDS.sub("{", l) for l in records_2] == [STORE_FIELDS.sub("{", l) for l in records_1]
            assert all(STORE_FIELDS.match(l) for l in records_1 + records_2)
            assert copy.stats().by_annotator == store.stats().by_annotator
            assert copy.stats().open_tasks == store.stats().open_tasks == 0
            # a second import changes nothing
            assert import_file(copy, "jsonl", tmp_path / "records.jsonl").records_duplicate == 5
        finally:
            copy.close()


@pytest.mark.slow
def test_cli_import_export(tmp_path):
    db = f"sqlite:///{tmp_path / 'a.db'}"
    out = hitl("feedback", "import", "--format", "hh-rlhf", str(HH), "--store", db, "--project", "imp", "--annotator-id", "anthropic")
    assert json.loads(out.stdout)["records_accepted"] == 5
    assert hitl("feedback", "export", "--format", "hh-rlhf", "--store", db).stdout.splitlines() == lines(HH)
    hitl("feedback", "import", "--format", "ultrafeedback", str(UF), "--store", db, "--project", "uf")
    hitl("feedback", "export", "--format", "ultrafeedback", "--store", db, "--project", "uf", "-o", str(tmp_path / "uf.jsonl"))
    assert lines(tmp_path / "uf.jsonl") == lines(UF)

    # raw records and tasks into an empty store, and out again
    hitl("feedback", "export", "--format", "jsonl", "--store", db, "-o", str(tmp_path / "records.jsonl"))
    hitl("feedback", "export", "--format", "tasks-jsonl", "--store", db, "-o", str(tmp_path / "tasks.jsonl"))
    db2 = f"sqlite:///{tmp_path / 'b.db'}"
    out = hitl("feedback", "import", "--format", "jsonl", str(tmp_path / "records.jsonl"), "--tasks", str(tmp_path / "tasks.jsonl"), "--store", db2)
    assert json.loads(out.stdout) == {"lines": 17, "tasks_created": 7, "tasks_existing": 0, "records_accepted": 10, "records_duplicate": 0, "errors": 0}
    hitl("feedback", "export", "--format", "tasks-jsonl", "--store", db2, "-o", str(tmp_path / "tasks2.jsonl"))
    assert lines(tmp_path / "tasks2.jsonl") == lines(tmp_path / "tasks.jsonl")
    hitl("feedback", "export", "--format", "jsonl", "--store", db2, "-o", str(tmp_path / "records2.jsonl"))
    strip = lambda p: [STORE_FIELDS.sub("{", l) for l in lines(p)]  # noqa: E731
    assert strip(tmp_path / "records2.jsonl") == strip(tmp_path / "records.jsonl")
    assert hitl("feedback", "export", "--format", "ultrafeedback", "--store", db2).stdout.splitlines() == lines(UF)
    db4 = f"sqlite:///{tmp_path / 'd.db'}"  # one project only
    out = hitl("feedback", "import", "--format", "jsonl", str(tmp_path / "records.jsonl"), "--tasks", str(tmp_path / "tasks.jsonl"), "--project", "uf", "--store", db4)
    assert json.loads(out.stdout)["tasks_created"] == 2 and json.loads(out.stdout)["records_accepted"] == 5
    assert hitl("feedback", "export", "--format", "hh-rlhf", "--store", db4).stdout == ""

    # records whose tasks are missing are rejected by the store's validation, named by line
    db3 = f"sqlite:///{tmp_path / 'c.db'}"
    failed = hitl("feedback", "import", "--format", "jsonl", str(tmp_path / "records.jsonl"), "--store", db3, check=False)
    assert failed.returncode == 1 and "records.jsonl:1: record" in failed.stderr and "task_id: unknown task" in failed.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    failed = hitl("feedback", "import", "--format", "hh-rlhf", str(bad), "--store", db3, check=False)
    assert failed.returncode == 2 and "bad.jsonl:1: not JSON" in failed.stderr
