"""`hitl status`: the status record the coordinator keeps, rendered on one screen; bad
arguments named. The record written by a real run is checked in tests/actors/test_loop.py."""

import json

from click.testing import CliRunner

from actors.status import StatusBoard, render
from hitl.cli import main


def test_the_board_writes_a_whole_record_each_time(tmp_path):
    board = StatusBoard(tmp_path, run_id="abc-", rounds=3)
    board.update(stage="ppo", round="2/3", ppo="1/4", kl=1.5, win_rate=float("nan"))
    record = json.loads((tmp_path / "status.json").read_text())
    assert record["stage"] == "ppo" and record["metrics"] == {"kl": 1.5, "win_rate": None}
    assert record["state"] == "running" and record["last_error"] is None
    board.error("round 1: ActorDiedError: the trainer died\ntraceback...")
    board.finish("failed")
    record = json.loads((tmp_path / "status.json").read_text())
    assert record["state"] == "failed" and record["last_error"]["message"].startswith("round 1: ActorDiedError")
    assert not list(tmp_path.glob("*.tmp"))


def test_one_screen(tmp_path):
    board = StatusBoard(tmp_path, run_id="abc-", rounds=3)
    board.update(stage="evaluate", round="3/3", policy_version=3, watermark=96, feedback={"used/preference": 30},
                 win_rate=0.75, reward_accuracy=0.6)
    board.error("round 2: TimeoutError: a call's deadline passed")
    text = render(board.record, {"rounds": [{"round": 0, "win_rate": 0.5}, {"round": 1, "win_rate": 0.75}]}, now=board.record["updated_at"] + 5)
    lines = text.splitlines()
    assert lines[1].startswith("state       running") and "(updated 5s ago)" in lines[1]
    assert "stage       evaluate   round 3/3" in text and "policy      v3   watermark 96" in text
    assert "win_rate 0.750   reward_accuracy 0.600" in text and "0:0.500  1:0.750" in text
    assert lines[-1] == "last error  round 2: TimeoutError: a call's deadline passed"


def test_the_command_reads_a_run_directory_and_names_what_is_missing(tmp_path):
    StatusBoard(tmp_path, run_id="abc-", rounds=2).update(stage="feedback", round="1/2")
    out = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert out.exit_code == 0 and "stage       feedback   round 1/2" in out.output
    as_json = CliRunner().invoke(main, ["status", "--json", str(tmp_path)])
    assert json.loads(as_json.output)["run_id"] == "abc-"
    missing = CliRunner().invoke(main, ["status", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "no status.json here" in missing.output
    assert CliRunner().invoke(main, ["status"]).exit_code != 0
