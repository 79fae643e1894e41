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
