"""The llm judge and `hitl eval` against the project's own generation server (Ray Serve, the
tiny model, OpenAI-compatible routes): both orders asked of the served model, every reply kept,
the template version reported. The tiny random model writes no sensible letter, so most
verdicts are ties; what is checked is the path over real HTTP."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.ray  # Serve is imported inside the test (the unit tier can collect this file)


SERVE_PORT = 8792
"""The port the loop tests give Serve: Serve keeps the HTTP port of its first start for the
whole Ray session, so every test that serves over HTTP uses the same one."""


@pytest.mark.slow
def test_llm_judge_served_by_the_generation_server(ray_session, tmp_path):
    from ray import serve

    from hitl.cli import main
    from rlhf.eval.config import LlmJudgeConfig
    from rlhf.eval.judges import LLM_TEMPLATE_VERSION, LlmJudge
    from rlhf.eval.records import OUTCOMES, EvalItem
    from rlhf.models import ModelConfig
    from services.generation.config import GenerationConfig
    from services.generation.server import APP_NAME, start_generation_server
    from tests.services.eval.test_command import _prompts, _run_dir

    port = SERVE_PORT
    model = ModelConfig(source="tiny", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, seed=0)
    gen = GenerationConfig(replicas=1, num_cpus=0.25, http_host="127.0.0.1", http_port=port)
    start_generation_server(model, None, gen, http=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        items = [EvalItem("Say hi.", "Hi.", "Hello there."), EvalItem("Name a colour.", "Blue.", "A long answer about red.")]
        result = LlmJudge(LlmJudgeConfig(base_url=url, max_tokens=4, concurrency=2)).judge(items)
        assert len(result.verdicts) == 2 and set(result.verdicts) <= set(OUTCOMES)
        assert result.details["template_version"] == LLM_TEMPLATE_VERSION and result.details["model"] == "tiny"
        assert all(d.keys() == {"a_first", "b_first"} for d in result.item_details)

        run = _run_dir(tmp_path)
        out = tmp_path / "out"
        r = CliRunner().invoke(main, ["eval", "--a", str(run), "--b", str(run / "checkpoints" / "round-0000"),
                                      "--prompts", str(_prompts(tmp_path)), "--judge", "rule", "--judge", "llm",
                                      "--llm-url", url, "--out", str(out)], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert any(line.startswith("llm: win-rate ") for line in r.output.splitlines())
        report = json.loads((out / "eval.json").read_text())
        assert report["judges"]["llm"]["n"] == 6 and report["judges"]["llm"]["details"]["template_version"] == LLM_TEMPLATE_VERSION
    finally:
        serve.delete(APP_NAME)
