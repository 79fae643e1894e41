"""`hitl run --resume-if-present`: a retried job (a RayJob's next attempt) continues the run in
its run directory instead of starting over it."""

import yaml
from click.testing import CliRunner

from hitl.cli import main


def test_a_run_already_in_the_directory_is_continued(tmp_path):
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({"coordinator": {"run_dir": str(tmp_path / "run")}}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"coordinator": {"roundz": 3}}')  # the stored run's config is read
    result = CliRunner().invoke(main, ["run", str(profile), "--resume-if-present"])
    assert result.exit_code == 2
    assert "continuing it" in result.output and "config.json" in result.output and "roundz" in result.output


def test_a_bad_profile_is_named_before_anything_starts(tmp_path):
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({"coordinator": {"rounds": 0}}))
    result = CliRunner().invoke(main, ["run", str(profile), "--resume-if-present"])
    assert result.exit_code == 2 and "coordinator.rounds" in result.output


def test_a_runs_config_json_keeps_no_token_and_the_token_can_come_from_the_environment(monkeypatch):
    import json

    from actors.config import RunConfig, run_config_json

    cfg = RunConfig.model_validate({"feedback": {"token": "s3cret-token", "project": "p"}})
    kept = json.loads(run_config_json(cfg))
    assert "s3cret-token" not in run_config_json(cfg) and kept["feedback"]["project"] == "p"
    assert RunConfig.model_validate(kept).feedback.bearer() is None  # a resumed run needs the token again
    monkeypatch.setenv("HITL_TEST_FEEDBACK_TOKEN", "from-the-env")
    cfg = RunConfig.model_validate({"feedback": {"token_env": "HITL_TEST_FEEDBACK_TOKEN"}})
    assert cfg.feedback.bearer() == "from-the-env"
    assert RunConfig.model_validate(json.loads(run_config_json(cfg))).feedback.bearer() == "from-the-env"
