"""`hitl tune`: the space file checked by field before anything runs, and a real search on
Ray Tune: a 4-trial random search with ASHA over the reward model's learning rate and epochs
on the tiny model, replaying a frozen snapshot of stored judgements; the command is killed
(SIGKILL) after its second trial and resumed, keeping the finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from actors.tune.config import TuneSpec
from actors.tune.space import check_space, set_field, with_values
from actors.tune.trials import objectives, rounds_of
from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.config import ConfigError, parse_config
from rlhf.prompts import BUILTIN

TINY = yaml.safe_load(Path("configs/tiny.yaml").read_text())
SHORT = ["Yes.", "Fine.", "It is nice.", "Good idea.", "Sure, why not."]
LONG = ["Well, there is a great deal one could say about this, and I will try to say all of it at length.",
        "Let me think about that for a while, because it deserves a long and careful answer with many words.",
        "This is a big question with many sides, so here is a long answer that goes on and on for quite some time."]


def _spec(**space) -> dict:
    return {"config": "configs/tiny.yaml", "space": space or {"reward.lr": {"loguniform": [1e-4, 1e-2]}}}


def test_the_space_file_names_what_is_wrong():
    with pytest.raises(ConfigError) as err:
        parse_config({**_spec(), "space": {"reward.lr": {"uniform": [2.0, 1.0]}}}, TuneSpec)
    assert "space: reward.lr: uniform: low 2.0 is above high 1.0" in str(err.value)
    with pytest.raises(ConfigError, match="objective.metric"):
        parse_config({**_spec(), "objective": {"metric": "win_rate"}}, TuneSpec)  # replay trains the reward model only
    with pytest.raises(ConfigError, match=r"space.reward.lr.*grid"):
        parse_config(_spec(**{"reward.lr": {"grid": [1e-3, 1e-2]}}), TuneSpec)  # grid values need the grid search
    with pytest.raises(ConfigError, match="kl_budget"):
        parse_config({**_spec(), "objective": {"metric": "reward_at_kl"}, "trial": {"kind": "loop"}}, TuneSpec)


def test_every_value_is_tried_against_the_run_config():
    spec = parse_config(_spec(**{"reward.lrr": {"choice": [1e-3]}, "reward.max_epochs": {"randint": [0, 3]},
                                 "ppo.clip_range": {"uniform": [0.1, 0.3]}}), TuneSpec)
    problems = check_space(TINY, spec)
    assert len(problems) == 2, problems
    assert problems[0].startswith("space.reward.lrr = 0.001: reward.lrr")  # no such field
    assert problems[1].startswith("space.reward.max_epochs = 0: reward.max_epochs")  # the low end is out of range


def test_dotted_paths_with_list_items():
    data = {"annotators": {"annotators": [{"noise": 0.1}, {"noise": 0.2}]}}
    set_field(data, "annotators.annotators[1].noise", 0.5)
    assert data["annotators"]["annotators"][1]["noise"] == 0.5
    with pytest.raises(ValueError, match=r"item \[5\]"):
        set_field(data, "annotators.annotators[5].noise", 0.5)
    assert with_values({"reward": {"lr": 1.0}}, {"reward.lr": 2.0}) == {"reward": {"lr": 2.0}}


def test_rounds_are_consecutive_parts_in_watermark_order():
    assert rounds_of(list(range(10)), 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert rounds_of([1, 2], 4) == [[1], [2]]


def test_objectives_of_a_round_report():
    report = {"win_rate": 0.75, "reward_model": {"validation_accuracy": 0.6},
              "ppo": [{"reward": 0.1, "kl": 1.0}, {"reward": 0.3, "kl": 2.0}, {"reward": 0.5, "kl": 9.0}]}
    assert objectives(report, kl_budget=5.0) == {"win_rate": 0.75, "reward_accuracy": 0.6, "reward_at_kl": 0.3}
    assert objectives({"win_rate": 0.5, "reward_model": {"skipped": "x"}, "ppo": []}, kl_budget=1.0)["reward_at_kl"] != 0.3


def _judged_store(path: Path) -> str:
    """A SQLite store with 48 tasks (a short and a long answer) and one preference each for
    the short answer, 1 in 8 the other way (noise)."""
    from services.feedback.records import Task
    from services.feedback.store import open_store

    url = f"sqlite:///{path}"
    store = open_store(url)
    prompts = BUILTIN["default"][:48]
    tasks = [Task(task_id=f"t{i}", project="default", prompt_id=f"p{i}", prompt=p,
                  candidates=(pb.Candidate(candidate_id=f"t{i}-0", text=SHORT[i % len(SHORT)]),
                              pb.Candidate(candidate_id=f"t{i}-1", text=LONG[i % len(LONG)])))
             for i, p in enumerate(prompts)]
    assert all(o.rejection is None for o in store.add_tasks(tasks))
    records = [pb.FeedbackRecord(feedback_id=f"f{i}", project="default", task_id=f"t{i}", annotator_id=f"a{i % 3}",
                                 preference=pb.Preference(candidate_a_id=f"t{i}-0", candidate_b_id=f"t{i}-1",
                                                          choice=pb.Preference.CHOICE_B if i % 8 == 7 else pb.Preference.CHOICE_A))
               for i in range(len(prompts))]
    assert all(o.rejection is None for o in store.write_batch(records))
    store.close()
    return url


def _events(out: Path) -> list[dict]:
    path = out / "trials.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _tune(args: list[str], address: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "RAY_ADDRESS": address}
    return subprocess.Popen([sys.executable, "-m", "hitl.cli", "tune", *args, "--address", address], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_a_random_search_with_asha_killed_and_resumed(ray_session, tmp_path):
    import ray

    url = _judged_store(tmp_path / "feedback.db")
    space = {"config": str(Path("configs/tiny.yaml").resolve()),
             "objective": {"metric": "reward_accuracy"},
             "trial": {"kind": "replay", "store": url, "rounds": 3, "cpus": 1},
             "search": {"algorithm": "random", "trials": 4, "seed": 3, "max_concurrent": 1},
             "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
             "space": {"reward.lr": {"loguniform": [1e-4, 1e-2]}, "reward.max_epochs": {"choice": [1, 2, 4]}}}
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space))
    out = tmp_path / "search"
    address = ray.get_runtime_context().gcs_address

    first = _tune([str(space_file), "--out", str(out)], address)
    deadline = time.monotonic() + 600
    while sum(e["event"] == "start" for e in _events(out)) < 3:  # the second trial is over once the third starts
        assert first.poll() is None, first.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no third trial within 10 minutes"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = _events(out)
    done_before = [e["trial"] for e in before if e["event"] == "complete"]
    assert len(done_before) == 2, before
    assert not (out / "best.yaml").exists()

    again = _tune(["--resume", str(out)], address)
    output, _ = again.communicate(timeout=900)
    assert again.returncode == 0, output[-3000:]
    summary = json.loads(output.strip().splitlines()[-1])
    events = _events(out)
    completed = [e["trial"] for e in events if e["event"] == "complete"]
    assert len(set(completed)) == 4 and summary["trials"] == 4 and summary["errors"] == 0, events
    for trial in done_before:  # finished before the kill: kept, never run again
        assert [e["event"] for e in events if e["trial"] == trial] == ["start", "complete"]
    assert summary["complete"] + summary["stopped_early"] == 4 and summary["complete"] >= 1

    best = summary["best"]
    lines = (out / "results.md").read_text().splitlines()
    assert len(lines) == 2 + 4 and sum("**best**" in line for line in lines) == 1
    assert (out / "search.png").stat().st_size > 0 and (out / "results.csv").exists()
    from actors.config import RunConfig

    best_cfg = parse_config(yaml.safe_load((out / "best.yaml").read_text()), RunConfig)
    assert best_cfg.reward.lr == pytest.approx(best["values"]["reward.lr"])
    assert best_cfg.reward.max_epochs == best["values"]["reward.max_epochs"]
    complete = [e["last"] for e in events if e["event"] == "complete" and e["last"].get("round") == 3]
    assert best["reward_accuracy"] == max(c["reward_accuracy"] for c in complete)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["tpe", "grid"])
def test_bayesian_and_grid_searches_run(ray_session, tmp_path, algorithm):
    from actors.tune.command import prepare, run_search

    url = _judged_store(tmp_path / "feedback.db")
    space = {"lr": {"loguniform": [1e-4, 1e-2]}} if algorithm == "tpe" else {"lr": {"grid": [1e-3, 3e-3]}}
    spec = {"config": str(Path("configs/tiny.yaml").resolve()), "trial": {"store": url, "rounds": 1},
            "search": {"algorithm": algorithm, "trials": 3 if algorithm == "tpe" else 1, "seed": 0, "max_concurrent": 1},
            "scheduler": {"kind": "none"}, "space": {f"reward.{k}": v for k, v in space.items()}}
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    out.mkdir()
    summary = run_search(prepare(space_file), out, address=None, resume=False)
    assert summary["trials"] == summary["complete"] == (3 if algorithm == "tpe" else 2), summary
    rates = [json.loads(line)["values"]["reward.lr"] for line in (out / "trials.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "complete"]
    if algorithm == "grid":
        assert sorted(rates) == [1e-3, 3e-3]
    else:
        assert len(set(rates)) == 3 and all(1e-4 <= r <= 1e-2 for r in rates)


@pytest.mark.slow
def test_replay_loop_trials_tune_the_policy_on_a_frozen_snapshot(ray_session, tmp_path):
    """`replay_loop`: the whole loop over stored judgements (reward model, policy update,
    evaluation) in each trial, asking nobody and leaving the snapshot as it was."""
    from actors.tune.command import prepare, run_search
    from services.feedback.store import open_store
    from tests.actors.test_loop import tiny_run_config

    url = _judged_store(tmp_path / "feedback.db")
    base = json.loads(tiny_run_config(tmp_path / "base", rounds=2, ppo_iterations_per_round=1).model_dump_json())
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"config": str(tmp_path / "base.yaml"), "objective": {"metric": "win_rate"},
            "trial": {"kind": "replay_loop", "store": url, "project": "default", "rounds": 2},
            "search": {"algorithm": "grid", "trials": 1, "max_concurrent": 1}, "scheduler": {"kind": "none"},
            "space": {"ppo.policy_lr": {"grid": [1e-3]}}}  # one trial: what is tested is the trial, not the search
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    out.mkdir()
    summary = run_search(prepare(space_file), out, address=None, resume=False)
    assert summary["trials"] == summary["complete"] == 1 and summary["errors"] == 0, summary
    events = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    finals = [e["last"] for e in events if e["event"] == "complete"]
    assert [f["round"] for f in finals] == [2] and 0.0 <= finals[0]["win_rate"] <= 1.0
    reports = sorted(out.glob("search/*/run/report.json"))
    assert len(reports) == 1
    for path in reports:  # the trial's two rounds read the snapshot's two halves, every record once
        rounds = json.loads(path.read_text())["rounds"]
        assert [(r["watermark_from"], r["watermark_to"]) for r in rounds] == [(0, 24), (24, 48)]
        assert all(r["feedback"].get("used/preference", 0) > 0 and r["policy_version"] == i + 1 for i, r in enumerate(rounds))
        assert "publish" in rounds[0]["stage_seconds"] and rounds[-1]["ppo"]
    store = open_store(url)
    try:  # nobody was asked anything: no task published, no record added
        assert store.task_count("default") == 48 and store.watermark() == 48 and not store.open_tasks("default")
        assert store.task_count("loop") == 0
    finally:
        store.close()


def test_a_replay_loop_trial_reads_the_snapshot_and_asks_nobody():
    from actors.config import RunConfig
    from actors.tune.replay import replay_config
    from actors.tune.trials import ReplaySource

    source = ReplaySource(store="sqlite:////data/people.db", project="people", watermark=90, rounds=3)
    own = {**TINY, "feedback": {"project": "p", "service": {"store": "sqlite:///own.db", "port": 50051}},
           "coordinator": {"rounds": 5, "mode": "continuous"}, "annotators": {"enabled": True}}
    data = replay_config(own, source)
    cfg = parse_config(data, RunConfig)
    assert cfg.feedback.service.store == source.store and cfg.feedback.project == "people"
    assert cfg.feedback.service.port == 0 and cfg.coordinator.rounds == 3 and cfg.coordinator.mode == "rounds"
    assert not cfg.annotators.enabled
    assert own["feedback"]["service"]["store"] == "sqlite:///own.db"  # the trial's own dict is not changed
    # every objective fits a replay_loop trial (it runs the policy update and the evaluation)
    for metric in ("win_rate", "reward_accuracy"):
        parse_config({**_spec(), "objective": {"metric": metric}, "trial": {"kind": "replay_loop"}}, TuneSpec)
