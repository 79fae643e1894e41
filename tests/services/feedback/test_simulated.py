"""Simulated annotators over real gRPC, and the rule-based judges they use."""

import random

import pytest

from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.quality.judges import Judge, JudgeConfig, positivity, win_rate
from services.feedback.client import FeedbackClient
from services.feedback.records import Task
from services.feedback.simulated import AnnotatorConfig, SimulatedAnnotator


def test_rules():
    pos = Judge(JudgeConfig(rule="positive"))
    assert pos.compare("", "What a wonderful, happy day!", "This is awful and sad.") == "a"
    assert positivity("") == 0.0
    concise = Judge(JudgeConfig(rule="concise"))
    assert concise.compare("", "Yes.", "Well, it depends on many things.") == "a"
    assert concise.compare("", "", "Yes.") == "b"  # empty answers lose
    fmt = Judge(JudgeConfig(rule="format"))
    assert fmt.compare("", "- one\n- two", "one, two") == "a"
    assert fmt.compare("", "one", "two") == "tie"
    assert win_rate(concise, ["p"] * 4, ["a", "a b", "a", "a b c"], ["a b", "a", "a", "a b"]) == pytest.approx(0.375)


def test_noise_rate_is_respected():
    judge = Judge(JudgeConfig(rule="concise"))
    rng = random.Random(0)
    verdicts = [judge.noisy_compare("", "short", "a much longer answer", 0.4, rng) for _ in range(4000)]
    agree = verdicts.count("a") / len(verdicts)
    assert agree == pytest.approx(1 - 0.4 / 2, abs=0.03)


def make_tasks(n):
    tasks = []
    for i in range(n):
        good, bad = "I love this, it is wonderful!", "I hate this, it is awful."
        a, b = (good, bad) if i % 2 else (bad, good)
        tasks.append(Task(f"t{i}", "demo", f"p{i}", f"How was day {i}?",
                          (pb.Candidate(candidate_id="x", text=a), pb.Candidate(candidate_id="y", text=b)), annotations_wanted=2))
    return tasks


def test_annotators_label_everything_over_grpc(server):
    server.server.store.add_tasks(make_tasks(30))
    clean = SimulatedAnnotator(AnnotatorConfig(annotator_id="clean", noise=0.0, batch=7), FeedbackClient(server.address), "demo")
    noisy = SimulatedAnnotator(AnnotatorConfig(annotator_id="noisy", noise=1.0, seed=1), FeedbackClient(server.address), "demo")
    while clean.run_once() or noisy.run_once():
        pass
    assert clean.stats.judged == 30 and noisy.stats.judged == 30
    assert clean.stats.rejected == 0 and noisy.stats.rejected == 0
    stored = [s.record for s in server.server.store.iter_after(0)]
    assert len(stored) == 60
    right = {r.task_id: ("x" if int(r.task_id[1:]) % 2 else "y") for r in stored}

    def accuracy(who):
        recs = [r for r in stored if r.annotator_id == who]
        picked = ["x" if r.preference.choice == pb.Preference.CHOICE_A else "y" for r in recs]
        return sum(p == right[r.task_id] for p, r in zip(picked, recs)) / len(recs)

    assert accuracy("clean") == 1.0
    assert 0.2 < accuracy("noisy") < 0.8  # coin flips
    assert server.server.store.stats().open_tasks == 0
    # nothing left to judge, and a resubmission is idempotent
    assert clean.run_once() == 0


def test_rule_edits_make_answers_follow_the_rule():
    text = "It was a terrible trip. The hotel was lovely!\nWe will go back."
    concise, positive, fmt = (Judge(JudgeConfig(rule=r)) for r in ("concise", "positive", "format"))
    assert concise.edit("", text) == "It was a terrible trip."
    assert positive.edit("", text) == "The hotel was lovely! We will go back."
    assert fmt.edit("", text) == "- It was a terrible trip.\n- The hotel was lovely!\n- We will go back."
    for judge in (concise, positive, fmt):  # an edit never loses to the original under its own rule
        assert judge.compare("", judge.edit("", text), text) in ("a", "tie")
    assert concise.edit("", "Yes.") == "Yes."  # already follows the rule: unchanged


def test_annotators_send_corrections_of_the_answer_they_prefer(server):
    long_a = "First sentence here. And a second one that adds little."
    tasks = [Task(f"c{i}", "demo", f"p{i}", "Tell me.", (pb.Candidate(candidate_id="x", text=long_a),
                  pb.Candidate(candidate_id="y", text=long_a + " And a third.")), annotations_wanted=1) for i in range(20)]
    server.server.store.add_tasks(tasks)
    cfg = AnnotatorConfig(annotator_id="editor", noise=0.0, correction_rate=0.5, seed=4, judge=JudgeConfig(rule="concise"))
    annotator = SimulatedAnnotator(cfg, FeedbackClient(server.address), "demo")
    while annotator.run_once():
        pass
    stored = [s.record for s in server.server.store.iter_after(0)]
    corrections = [r for r in stored if r.WhichOneof("judgement") == "correction"]
    assert annotator.stats.judged == 20 and annotator.stats.corrected == len(corrections)
    assert 4 <= len(corrections) <= 16  # about half, drawn
    assert all(c.correction.candidate_id == "x" and c.correction.corrected_text == "First sentence here." for c in corrections)
    assert len({r.feedback_id for r in stored}) == len(stored) == 20 + len(corrections)


def test_the_no_answer_placeholder_stands_for_an_empty_answer():
    from rlhf.quality.judges import NO_ANSWER, answer_text, shown_text

    assert shown_text("") == shown_text("  ") == NO_ANSWER and shown_text("Hi.") == "Hi."
    assert answer_text(NO_ANSWER) == "" and answer_text("Hi.") == "Hi."
    for rule in ("concise", "positive", "format"):
        judge = Judge(JudgeConfig(rule=rule))
        assert judge.score("", NO_ANSWER) == judge.score("", "")


def test_think_time_spreads_tasks_across_annotators_and_counts_in_the_lead_time(server):
    import threading

    server.server.store.add_tasks([
        Task(f"s{i}", "demo", f"p{i}", "Tell me.", (pb.Candidate(candidate_id="x", text="Short."),
             pb.Candidate(candidate_id="y", text="A longer answer.")), annotations_wanted=1) for i in range(24)])
    annotators = [SimulatedAnnotator(AnnotatorConfig(annotator_id=f"paced{k}", noise=0.0, batch=2, seed=k, think_time_s=0.05),
                                     FeedbackClient(server.address), "demo") for k in range(2)]
    stop = threading.Event()
    threads = [threading.Thread(target=a.run, args=(stop,), kwargs={"idle_sleep_s": 0.05}) for a in annotators]
    for t in threads:
        t.start()
    try:
        for _ in range(600):
            if server.server.store.stats().open_tasks == 0 and sum(a.stats.judged for a in annotators) == 24:
                break
            stop.wait(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    judged = [a.stats.judged for a in annotators]
    assert sum(judged) == 24 and min(judged) >= 6, judged  # both labelled a fair share
    stored = [s.record for s in server.server.store.iter_after(0)]
    assert len(stored) == 24 and all(r.lead_time_seconds >= 0.05 for r in stored)


@pytest.mark.slow
def test_an_annotator_stopped_while_thinking_submits_what_it_judged(server):
    import threading

    server.server.store.add_tasks(make_tasks(4))
    stop = threading.Event()
    annotator = SimulatedAnnotator(AnnotatorConfig(annotator_id="slow", noise=0.0, batch=4, think_time_s=1.0),
                                   FeedbackClient(server.address), "demo")
    threading.Timer(1.5, stop.set).start()  # during the second task
    assert annotator.run_once(stop) == 1
    assert [s.record.annotator_id for s in server.server.store.iter_after(0)] == ["slow"]


def test_idle_time_is_the_time_with_no_task_to_take(server):
    """An annotator that finds nothing to pull is idle until a pull finds a task; the idle
    share of a window counts only the time inside it (continuous mode's figure)."""
    import threading
    import time

    from services.feedback.simulated import overlap

    annotator = SimulatedAnnotator(AnnotatorConfig(annotator_id="waiting", noise=0.0, batch=4), FeedbackClient(server.address), "demo")
    stop = threading.Event()
    thread = threading.Thread(target=annotator.run, args=(stop,), kwargs={"idle_sleep_s": 0.05})
    thread.start()
    try:
        time.sleep(0.6)  # nothing published yet
        published_at = time.time()
        server.server.store.add_tasks(make_tasks(4))
        for _ in range(200):
            if annotator.stats.judged == 4:
                break
            time.sleep(0.05)
        time.sleep(0.6)  # everything judged: idle again
        ended = time.time()
    finally:
        stop.set()
        thread.join()
    assert annotator.stats.judged == 4
    first_span = annotator.idle_spans[0]
    assert first_span[0] == annotator.first_pull_at and published_at - 0.01 <= first_span[1] <= published_at + 0.5
    assert first_span[1] == annotator.first_task_at
    # idle from the first task on: the wait before anything was published is start-up, not idle
    assert annotator.idle_fraction(annotator.first_pull_at, published_at) is None
    share = annotator.idle_fraction(annotator.first_pull_at, ended)
    assert 0.5 < share < 1.0  # labeling 4 tasks took a moment; then nothing to take for 0.6 s
    assert annotator.stats.idle_s >= 0.5 and annotator.stats.active_s >= annotator.stats.idle_s
    assert overlap([(0.0, 2.0), (3.0, 5.0)], 1.0, 4.0) == 2.0
