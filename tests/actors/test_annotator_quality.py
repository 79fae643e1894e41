"""Annotator quality wired through the loop's pieces: gold tasks mixed into rounds, quality
per round and overall from a real store, weights and pausing in curation, `hitl annotators`,
and a random annotator whose pausing makes a tiny reward model measurably better."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.quality import (
    AnnotatorQualityConfig,
    GoldFileError,
    QualityTracker,
    gold_count,
    judgements_of,
    mix_gold,
    rule_gold,
)
from actors.config import RunConfig
from actors.coordinator import countable_feedback
from rlhf.curation.rules import curate
from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.config import ConfigError, parse_config
from rlhf.quality.judges import Judge, JudgeConfig
from services.feedback.records import GoldAnswer, Task
from services.feedback.jsonl import load_gold_tasks
from services.feedback.store import Status, open_store

PROJECT = "demo"


def pair_task(task_id: str, a: str = "first answer", b: str = "second answer", wanted: int = 3, gold: GoldAnswer | None = None,
              prompt: str | None = None, version: int = 3) -> Task:
    return Task(task_id, PROJECT, f"p-{task_id}", prompt or f"prompt of {task_id}",
                (pb.Candidate(candidate_id=f"{task_id}-0", text=a, policy_version=version),
                 pb.Candidate(candidate_id=f"{task_id}-1", text=b, policy_version=version)),
                annotations_wanted=wanted, gold=gold)


def pref(task_id: str, who: str, choice, lead: float = 10.0, **kw) -> pb.FeedbackRecord:
    return pb.FeedbackRecord(
        feedback_id=f"{who}:{task_id}", project=PROJECT, task_id=task_id, annotator_id=who, lead_time_seconds=lead,
        preference=pb.Preference(candidate_a_id=f"{task_id}-0", candidate_b_id=f"{task_id}-1", choice=choice), **kw,
    )


A, B, TIE = pb.Preference.CHOICE_A, pb.Preference.CHOICE_B, pb.Preference.CHOICE_TIE


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("section, field, text", [
    ({"quality": {"gold_rate": 1.5}}, "coordinator.quality.gold_rate", "must be <= 1.0"),
    ({"quality": {"gold_rate": -0.1}}, "coordinator.quality.gold_rate", "must be >= 0.0"),
    ({"quality": {"gold_rte": 0.1}}, "coordinator.quality.gold_rte", "unknown key"),
    ({"quality": {"pause_below_gold_accuracy": 2}}, "coordinator.quality.pause_below_gold_accuracy", "must be <= 1.0"),
    ({"quality": {"min_gold": 0}}, "coordinator.quality.min_gold", "must be >= 1"),
    ({"quality": {"gold_tasks": "gold.jsonl"}}, "coordinator.quality.gold_tasks", "gold_rate is 0"),
])
def test_quality_config_errors_name_the_dotted_field(section, field, text):
    with pytest.raises(ConfigError) as info:
        parse_config({"coordinator": section}, RunConfig)
    [issue] = info.value.issues
    assert issue.field == field and text in issue.message


def test_gold_without_a_file_needs_simulated_annotators():
    with pytest.raises(ConfigError, match="coordinator.quality.gold_tasks: required when gold_rate > 0"):
        parse_config({"coordinator": {"quality": {"gold_rate": 0.2}}, "annotators": {"enabled": False}}, RunConfig)
    cfg = parse_config({"coordinator": {"quality": {"gold_rate": 0.2}}}, RunConfig)  # the simulated annotators' rule makes them
    assert cfg.coordinator.quality.gold_rate == 0.2 and cfg.coordinator.quality.thresholds().min_gold == 5


# --------------------------------------------------------------------------- judgements


def test_judgements_compare_across_display_orders():
    shown_b_first = pref("t", "x", B, metadata={"display_order": "t-1,t-0"})
    plain = pref("t", "y", B)
    reversed_pair = pb.FeedbackRecord(feedback_id="z", project=PROJECT, task_id="t", annotator_id="z",
                                      preference=pb.Preference(candidate_a_id="t-1", candidate_b_id="t-0", choice=A))
    [jx], [jy], [jz] = judgements_of(shown_b_first), judgements_of(plain), judgements_of(reversed_pair)
    assert jx.value == jy.value == jz.value == ("better", "t-1")  # the same answer, however it was shown
    assert (jx.chose_left, jy.chose_left, jz.chose_left) == (True, False, True)
    assert jx.lead_time_s == 10.0 and jz.lead_time_s is None
    [tie] = judgements_of(pref("t", "w", TIE))
    assert tie.value == ("tie",) and tie.chose_left is None
    ranking = pb.FeedbackRecord(task_id="r", annotator_id="x", ranking=pb.Ranking(entries=[
        pb.Ranking.Entry(candidate_id="c0", rank=2), pb.Ranking.Entry(candidate_id="c1", rank=1)]))
    assert [(j.unit, j.value, j.kind) for j in judgements_of(ranking)] == [(("r", "c0"), 2, "ranking"), (("r", "c1"), 1, "ranking")]
    ratings = pb.FeedbackRecord(task_id="s", annotator_id="x", ratings=pb.Ratings(entries=[pb.Ratings.Entry(candidate_id="c0", aspect="help", value=4)]))
    assert [(j.unit, j.value, j.kind) for j in judgements_of(ratings)] == [(("s", "c0", "help"), 4.0, "rating")]
    assert judgements_of(pb.FeedbackRecord(task_id="s", annotator_id="x", flag=pb.Flag(kind=pb.Flag.KIND_SPAM))) == []


# --------------------------------------------------------------------------- gold tasks in a round


def round_tasks(r: int, n: int = 8, texts=None) -> list[Task]:
    texts = texts or [("one answer", "another answer")] * n
    return [pair_task(f"r{r}-t{i}", *texts[i], wanted=2, version=r + 1) for i in range(n)]


def write_gold_file(path: Path, n: int = 3) -> Path:
    rows = [{"task_id": f"ops-{i}", "project": "ops", "prompt_id": f"ops-p{i}", "prompt": f"gold prompt {i}",
             "candidates": [{"candidate_id": "good", "text": f"good answer {i}"}, {"candidate_id": "bad", "text": f"bad answer {i}"}],
             "metadata": {"origin": "operator"}, "gold": {"better": "good"}} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_gold_count():
    assert [gold_count(rate, 8) for rate in (0.0, 0.01, 0.25, 0.3, 1.0)] == [0, 1, 2, 2, 8]
    assert gold_count(0.5, 0) == 0


def test_gold_from_a_file_looks_like_any_other_task(tmp_path):
    pool = load_gold_tasks(write_gold_file(tmp_path / "gold.jsonl"))
    cfg = AnnotatorQualityConfig(gold_rate=0.25, gold_tasks=tmp_path / "gold.jsonl", seed=3)
    better_position = set()
    used_prompts = []
    for r in range(6):
        slots = round_tasks(r)
        mixed = mix_gold(slots, r, cfg, pool, judge=None, prompt_id=lambda p: "p-" + p)
        assert mixed == mix_gold(slots, r, cfg, pool, judge=None, prompt_id=lambda p: "p-" + p)  # seeded
        gold = [(i, t) for i, t in enumerate(mixed) if t.gold is not None]
        assert len(gold) == 2
        assert [t for t in mixed if t.gold is None] == [s for s, m in zip(slots, mixed) if m.gold is None]
        for i, task in gold:
            slot = slots[i]
            assert task.task_id == slot.task_id and task.project == slot.project and task.annotations_wanted == slot.annotations_wanted
            assert [c.candidate_id for c in task.candidates] == [c.candidate_id for c in slot.candidates]
            assert {c.policy_version for c in task.candidates} == {r + 1}
            assert task.metadata == {} and task.prompt.startswith("gold prompt") and task.prompt_id == "p-" + task.prompt
            good = next(c for c in task.candidates if c.text.startswith("good"))
            assert task.gold == GoldAnswer(good.candidate_id)
            better_position.add(good.candidate_id[-1])
            used_prompts.append(task.prompt)
    assert better_position == {"0", "1"}  # the better answer is not always in one place
    assert set(used_prompts) == {f"gold prompt {i}" for i in range(3)}  # the pool cycles


def test_mixed_gold_tasks_publish_and_lease_without_their_answer(tmp_path):
    pool = load_gold_tasks(write_gold_file(tmp_path / "gold.jsonl"))
    cfg = AnnotatorQualityConfig(gold_rate=0.5, gold_tasks=tmp_path / "gold.jsonl")
    mixed = mix_gold(round_tasks(0, 4), 0, cfg, pool, judge=None, prompt_id=lambda p: "p-" + p)
    store = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    try:
        assert all(o.created for o in store.add_tasks(mixed))
        assert set(store.gold_answers([PROJECT])) == {t.task_id for t in mixed if t.gold is not None} and len(store.gold_answers()) == 2
        leased = store.lease_tasks(PROJECT, "ann", 10, 60)
        assert [l.task.task_id for l in leased] == [t.task_id for t in mixed]
        assert all(l.task.gold is None and l.task.metadata == {} for l in leased)
    finally:
        store.close()


def test_a_gold_tasks_file_is_checked_line_by_line(tmp_path):
    good = json.loads(write_gold_file(tmp_path / "g.jsonl", 1).read_text())
    cases = {
        "gold: required": dict(good, gold=None),
        "candidates: a gold pair needs exactly 2": dict(good, candidates=good["candidates"] + [{"candidate_id": "x", "text": "x"}]),
        "gold.better: unknown candidate 'nope'": dict(good, gold={"better": "nope"}),
    }
    for message, row in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(GoldFileError, match=f"task 2 .*{message}"):
            load_gold_tasks(path)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(GoldFileError, match="no gold tasks"):
        load_gold_tasks(tmp_path / "empty.jsonl")


def test_simulated_gold_pairs_are_the_ones_the_rule_clearly_separates():
    judge = Judge(JudgeConfig(rule="positive"))
    texts = [("a wonderful happy day", "an awful sad day"), ("a day", "another day"), ("a day", "a good day"),
             ("it was bad", "it was great and lovely"), ("plain words", "more plain words")] * 2
    tasks = round_tasks(0, len(texts), texts)
    cfg = AnnotatorQualityConfig(gold_rate=1.0, simulated_gold_margin=0.5)
    mixed = mix_gold(tasks, 0, cfg, [], judge, prompt_id=str)
    for task in mixed:
        a, b = task.candidates
        gap = judge.score(task.prompt, a.text) - judge.score(task.prompt, b.text)
        if abs(gap) > 0.5:
            assert task.gold == GoldAnswer((a if gap > 0 else b).candidate_id) == rule_gold(task, judge, 0.5)
        else:
            assert task.gold is None
    assert sum(t.gold is not None for t in mixed) == 6  # three clearly separated pairs, twice
    fewer = mix_gold(tasks, 0, cfg.model_copy(update={"gold_rate": 0.2}), [], judge, prompt_id=str)
    assert sum(t.gold is not None for t in fewer) == 2
    with pytest.raises(ValueError, match="gold_tasks"):
        mix_gold(tasks, 0, cfg, [], None, prompt_id=str)


# --------------------------------------------------------------------------- quality from a store, into curation


def quality_store(url: str):
    """Three annotators on 12 gold and 10 other pairs: ann is always right, bea misses one gold
    answer, cid is always wrong on gold, disagrees with the others and answers in half a second."""
    store = open_store(url)
    gold = [pair_task(f"g{i}", gold=GoldAnswer(f"g{i}-{i % 2}")) for i in range(12)]
    other = [pair_task(f"t{i}") for i in range(10)]
    assert all(o.created for o in store.add_tasks(gold + other))
    records = []
    for i in range(12):
        right, wrong = (A, B) if i % 2 == 0 else (B, A)
        records += [pref(f"g{i}", "ann", right), pref(f"g{i}", "bea", wrong if i == 0 else right, lead=12.0),
                    pref(f"g{i}", "cid", wrong, lead=0.5)]
    for i in range(10):
        records += [pref(f"t{i}", "ann", A), pref(f"t{i}", "bea", A, lead=12.0), pref(f"t{i}", "cid", B, lead=0.5)]
    assert all(o.status is Status.ACCEPTED for o in store.write_batch(records))
    return store


def test_weights_and_pausing_flow_into_curation(tmp_path):
    store = quality_store(f"sqlite:///{tmp_path / 'f.db'}")
    try:
        records = list(store.iter_after(0))
        cfg = AnnotatorQualityConfig(min_gold=5, pause_below_gold_accuracy=0.6, min_consensus=5)
        tracker = QualityTracker(cfg, store, PROJECT, judge=None, prompt_id=str)
        applied = tracker.assess(records, round_index=0)
        assert applied.paused == {"cid"}
        assert applied.weights == pytest.approx({"ann": 1.0, "bea": 2 * 11 / 12 - 1, "cid": 0.0})
        curated = curate(records, store.get_task, weights=applied.weights, paused=applied.paused)
        assert curated.counts == {"used/preference": 44, "paused/preference": 22}
        by_annotator = {(item.annotator_id, round(item.weight, 6)) for item in curated.items}
        assert by_annotator == {("ann", 1.0), ("bea", round(2 * 11 / 12 - 1, 6))}
        # without quality inputs curation is as before: everyone, weight 1
        plain = curate(records, store.get_task)
        assert plain.counts == {"used/preference": 66} and {i.weight for i in plain.items} == {1.0}
        # a zero weight drops the item and says so
        zero = curate(records, store.get_task, weights={"bea": 0.0})
        assert zero.counts["dropped/zero_weight"] == 22 and all(i.annotator_id != "bea" for i in zero.items)

        report = applied.report
        assert report["paused"] == ["cid"] and report["paused_judgements"] == {"cid": 22}
        rows = {row["annotator"]: row for row in report["overall"]["annotators"]}
        assert rows["cid"]["paused"] and rows["cid"]["gold_accuracy"] == 0.0 and rows["cid"]["gold_answered"] == 12
        assert rows["cid"]["lead_time_outlier"] and not rows["ann"]["lead_time_outlier"]
        # cid, against the others everywhere, carries no weight in ann's consensus: bea's answers are it
        assert rows["cid"]["consensus_agreement"] == 0.0 and rows["ann"]["consensus_agreement"] == 1.0
        assert rows["bea"]["gold_accuracy"] == round(11 / 12, 4)
        assert report["overall"]["alpha"]["preference"] < 0.5  # cid disagrees with the others everywhere
        json.dumps(report, allow_nan=False)  # the round report is plain JSON

        # the next round's feedback threshold counts what curation will use: not cid's records
        counted = countable_feedback(records, frozenset(report["paused"]))
        assert len(counted) == curated.counts["used/preference"] == 44
        assert {s.record.annotator_id for s in counted} == {"ann", "bea"}
        assert len(countable_feedback(records, frozenset())) == 66
    finally:
        store.close()


def test_round_and_overall_quality_and_a_rebuilt_tracker(tmp_path):
    store = quality_store(f"sqlite:///{tmp_path / 'f.db'}")
    try:
        records = list(store.iter_after(0))
        first, second = records[:36], records[36:]  # the gold round, then the other tasks
        cfg = AnnotatorQualityConfig(min_gold=5)
        tracker = QualityTracker(cfg, store, PROJECT, judge=None, prompt_id=str)
        round0 = tracker.assess(first, 0).report
        round1 = tracker.assess(second, 1).report
        counts = lambda table: {row["annotator"]: row["judgements"] for row in table["annotators"]}  # noqa: E731
        assert counts(round0["round"]) == counts(round0["overall"]) == {"ann": 12, "bea": 12, "cid": 12}
        assert counts(round1["round"]) == {"ann": 10, "bea": 10, "cid": 10}
        assert counts(round1["overall"]) == {"ann": 22, "bea": 22, "cid": 22}
        assert round1["round"]["annotators"][0]["gold_answered"] == 0 and round1["overall"]["annotators"][0]["gold_answered"] == 12
        assert round1["paused"] == ["cid"] and round1["paused_judgements"] == {"cid": 10}
        # a resumed run's tracker reads what came before from the store and reaches the same view
        rebuilt = QualityTracker(cfg, store, PROJECT, judge=None, prompt_id=str).assess(second, 1).report
        assert rebuilt["overall"] == round1["overall"] and rebuilt["weights"] == round1["weights"]
        # a round redone after a restore forgets records past it
        redone = tracker.assess(first, 0).report
        assert redone["overall"] == round0["overall"]
    finally:
        store.close()


def test_hitl_annotators_prints_the_table_of_a_real_store(tmp_path):
    url = f"sqlite:///{tmp_path / 'f.db'}"
    quality_store(url).close()

    def hitl(*args):
        return subprocess.run([sys.executable, "-m", "hitl.cli", "annotators", "--store", url, *args],
                              capture_output=True, text=True, timeout=120)

    out = hitl("--project", PROJECT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for column in ("annotator", "judgements", "gold answered", "gold accuracy", "consensus agreement", "position bias",
                   "lead-time outlier", "weight", "paused"):
        assert column in lines[0]
    rows = {line.split()[0]: line for line in lines[2:5]}
    assert set(rows) == {"ann", "bea", "cid"}
    assert rows["cid"].split()[1:4] == ["22", "12", "0.00"] and rows["cid"].rstrip().endswith("PAUSED")
    assert rows["ann"].split()[1:4] == ["22", "12", "1.00"] and rows["ann"].rstrip().endswith("no")
    assert "yes (median 0.5s" in rows["cid"] and "no (median 10.0s" in rows["ann"]
    assert lines[-1].startswith("Krippendorff's alpha: preference ")
    data = json.loads(hitl("--json", "--min-gold", "20").stdout)
    assert [row["paused"] for row in data["annotators"]] == [False, False, False]  # 12 gold answers are not enough now
    assert json.loads(hitl("--json", "--project", "elsewhere").stdout) == {"alpha": {}, "annotators": []}
    bad = hitl("--pause-below", "2")
    assert bad.returncode == 2 and "--pause-below" in bad.stderr


# --------------------------------------------------------------------------- a random annotator and the reward model

POSITIVE = ("happy", "great", "love", "good")
NEGATIVE = ("sad", "awful", "hate", "bad")
FILLER = ("the", "a", "is", "was", "very", "and", "it", "we", "saw", "today", "there", "then")
TOPICS = ("fruit", "weather", "travel", "music", "cooking", "sports", "books", "gardens")
RULE = JudgeConfig(rule="positive")


def _response(rng: random.Random) -> str:
    """Six words; the positive rule's score is (#positive − #negative) / √6."""
    words = [rng.choice(POSITIVE) for _ in range(rng.randint(0, 2))] + [rng.choice(NEGATIVE) for _ in range(rng.randint(0, 2))]
    words += [rng.choice(FILLER) for _ in range(6 - len(words))]
    rng.shuffle(words)
    return " ".join(words)


def rule_pairs(n: int, seed: int) -> list[tuple[str, str, str, str]]:
    """(prompt, a, b, "a" or "b") with a prompt of its own each and no ties under the rule."""
    rng, judge, out = random.Random(seed), Judge(RULE), []
    while len(out) < n:
        a, b = _response(rng), _response(rng)
        verdict = judge.compare("", a, b)
        if verdict != "tie":
            out.append((f"Say something about {TOPICS[len(out) % len(TOPICS)]} #{seed}-{len(out)}", a, b, verdict))
    return out


def labeling_tasks(regular: int, gold: int) -> list[Task]:
    """Pairs to judge once each, with a gold pair (judged by everyone) every (regular + gold) / gold tasks."""
    every = (regular + gold) // gold
    tasks = []
    for i, (prompt, a, b, verdict) in enumerate(rule_pairs(regular + gold, seed=1)):
        is_gold = i % every == every // 2 and sum(t.gold is not None for t in tasks) < gold
        answer = GoldAnswer(f"t{i}-0" if verdict == "a" else f"t{i}-1") if is_gold else None
        tasks.append(pair_task(f"t{i}", a, b, wanted=4 if is_gold else 1, gold=answer, prompt=prompt))
    return tasks


@pytest.fixture
def tiny_model(tmp_path_factory):
    import torch

    from rlhf.models import ModelConfig

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: one thread is faster
    yield ModelConfig(source="tiny", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, seed=0,
                      cache_dir=tmp_path_factory.mktemp("model-cache"))
    torch.set_num_threads(before)


@pytest.mark.slow
def test_a_random_annotator_is_paused_and_the_reward_model_is_better_without_it(tmp_path, tiny_model):
    """Three careful annotators (10% coin flips) and one fast one who answers every pair by coin
    flip, over real gRPC; gold pairs catch the random one, and a tiny reward model trained on the
    others' judgements (weighted by quality) beats one trained on everything on held-out pairs."""
    from services.feedback.client import FeedbackClient
    from services.feedback.simulated import AnnotatorConfig, SimulatedAnnotator
    from tests.services.feedback.conftest import running_server

    with running_server(f"sqlite:///{tmp_path / 'f.db'}") as server:
        store = server.server.store
        store.add_tasks(labeling_tasks(regular=500, gold=20))
        careful = [AnnotatorConfig(annotator_id=f"careful-{i}", judge=RULE, noise=0.1, seed=i, batch=4) for i in range(3)]
        hasty = AnnotatorConfig(annotator_id="random", judge=RULE, noise=1.0, seed=7, batch=16)  # pulls four times as much
        annotators = [SimulatedAnnotator(c, FeedbackClient(server.address), PROJECT) for c in [hasty, *careful]]
        while sum(a.run_once() for a in annotators):  # in turns, until every task is judged
            pass
        records = list(store.iter_after(0))
        cfg = AnnotatorQualityConfig(min_gold=10, pause_below_gold_accuracy=0.7)
        applied = QualityTracker(cfg, store, PROJECT, judge=None, prompt_id=str).assess(records, 0)
        everything = curate(records, store.get_task)
        kept = curate(records, store.get_task, weights=applied.weights, paused=applied.paused)

    rows = {row["annotator"]: row for row in applied.report["overall"]["annotators"]}
    assert applied.paused == {"random"}
    assert rows["random"]["gold_answered"] == 20 and rows["random"]["gold_accuracy"] < 0.7
    assert all(rows[c.annotator_id]["gold_accuracy"] >= 0.8 for c in careful)
    assert rows["random"]["judgements"] > len(records) / 2  # most of the judgements are noise
    assert kept.counts["paused/preference"] == rows["random"]["judgements"]
    assert len(everything.items) == len(records) and len(kept.items) == len(records) - rows["random"]["judgements"]

    on_everything, on_the_rest = held_out_accuracy(everything.items, tiny_model), held_out_accuracy(kept.items, tiny_model)
    assert on_the_rest >= 0.85 and on_the_rest >= on_everything + 0.05, (on_the_rest, on_everything)


@pytest.mark.slow
def test_invented_annotators_who_vote_many_times_move_neither_weights_nor_the_reward_model(tmp_path, tiny_model):
    """The reproduction: three people (10% coin flips) judge every pair once; two invented ids
    vote against the rule on every pair, three times each, over real gRPC. Each id's repeats
    count once (the last answer), the ids earn weight 0 from the people's consensus while the
    people keep theirs (no gold needed), and a tiny reward model trained on the weighted mix
    prefers what the people prefer."""
    from services.feedback.client import FeedbackClient
    from tests.services.feedback.conftest import running_server

    judge, rng = Judge(RULE), random.Random(5)
    tasks = [pair_task(f"t{i}", a, b, wanted=5, prompt=prompt) for i, (prompt, a, b, _) in enumerate(rule_pairs(240, seed=1))]
    people, invented = [f"person-{i}" for i in range(3)], [f"invented-{i}" for i in range(2)]
    records = []
    for t in tasks:
        a, b = t.candidates[0].text, t.candidates[1].text
        for who in people:
            verdict = judge.noisy_compare(t.prompt, a, b, 0.1, rng)
            records.append(pref(t.task_id, who, A if verdict == "a" else B))
        against = B if judge.compare(t.prompt, a, b) == "a" else A
        for who in invented:
            records += [pb.FeedbackRecord(feedback_id=f"{who}:{t.task_id}:{k}", project=PROJECT, task_id=t.task_id,
                                          annotator_id=who, lead_time_seconds=3.0,
                                          preference=pb.Preference(candidate_a_id=f"{t.task_id}-0",
                                                                   candidate_b_id=f"{t.task_id}-1", choice=against))
                        for k in range(3)]
    with running_server(f"sqlite:///{tmp_path / 'f.db'}") as server:
        store = server.server.store
        store.add_tasks(tasks)
        client = FeedbackClient(server.address)
        for start in range(0, len(records), 200):
            assert all(r.status == pb.RecordResult.STATUS_ACCEPTED for r in client.submit(records[start : start + 200]))
        stored = list(store.iter_after(0))
        applied = QualityTracker(AnnotatorQualityConfig(min_consensus=5), store, PROJECT, judge=None, prompt_id=str).assess(stored, 0)
        kept = curate(stored, store.get_task, weights=applied.weights, paused=applied.paused)
        unweighted = curate(stored, store.get_task)

    assert len(stored) == len(tasks) * (3 + 2 * 3)
    assert min(applied.weights[p] for p in people) > max(applied.weights[i] for i in invented) == 0.0
    rows = {row["annotator"]: row for row in applied.report["overall"]["annotators"]}
    assert all(rows[i]["judgements"] == len(tasks) and rows[i]["superseded"] == 2 * len(tasks) for i in invented)
    assert kept.counts["superseded/preference"] == 2 * 2 * len(tasks)  # one vote per id and task
    assert kept.counts["dropped/zero_weight"] == 2 * len(tasks) and not {i.annotator_id for i in kept.items} & set(invented)

    weighted, everyone = held_out_accuracy(kept.items, tiny_model), held_out_accuracy(unweighted.items, tiny_model)
    assert weighted >= 0.85 and weighted >= everyone + 0.05, (weighted, everyone)


def held_out_accuracy(items, tiny_model) -> float:
    """Accuracy on 300 fresh rule pairs of a tiny reward model trained on `items` (seeded: the
    same items give the same figure, so two trainings differ only by their data)."""
    import torch

    from rlhf.preferences import Choice, PreferencePair
    from rlhf.reward import RewardConfig, build_reward_model, evaluate_preferences, train_reward_model

    held_out = [PreferencePair(p, a, b, Choice.A if v == "a" else Choice.B) for p, a, b, v in rule_pairs(300, seed=99)]
    reward_cfg = RewardConfig(head_init_std=0.5, max_length=96, batch_size=16, lr=3e-3, max_epochs=10, patience=3)
    torch.manual_seed(0)
    model = build_reward_model(reward_cfg, tiny_model)
    train_reward_model(model, items)
    return evaluate_preferences(model, held_out).accuracy


def test_ratings_count_toward_the_threshold_when_curation_pairs_them():
    from types import SimpleNamespace

    rated = pb.FeedbackRecord(task_id="t", annotator_id="x", ratings=pb.Ratings(entries=[pb.Ratings.Entry(candidate_id="c0", aspect="overall", value=4)]))
    preferred = pb.FeedbackRecord(task_id="t", annotator_id="y", preference=pb.Preference(candidate_a_id="c0", candidate_b_id="c1", choice=pb.Preference.CHOICE_A))
    flagged = pb.FeedbackRecord(task_id="t", annotator_id="z", flag=pb.Flag(candidate_id="c0", kind=pb.Flag.KIND_SPAM))
    records = [SimpleNamespace(record=r) for r in (rated, preferred, flagged)]
    assert [s.record.annotator_id for s in countable_feedback(records, frozenset())] == ["x", "y"]
    assert [s.record.annotator_id for s in countable_feedback(records, frozenset(), ratings=False)] == ["y"]
    assert [s.record.annotator_id for s in countable_feedback(records, frozenset({"x"}))] == ["y"]
