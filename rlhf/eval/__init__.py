"""Evaluation: two policies' answers on a prompt set, judged by rules, a reward model, an LLM
or people, with the uncertainty stated (`hitl eval`, services/eval/command.py; the loop's
per-round evaluation).

    from rlhf.eval import EvalItem, RuleJudge, evaluate, write_report
    report = evaluate(items, [RuleJudge(JudgeConfig(rule="concise"))], a={"label": "new"}, b={"label": "base"})
    write_report(report, Path("out"))      # eval.json, eval.md, eval.png
"""

from rlhf.eval.config import EvalConfig, HumanJudgeConfig, JudgeName, LlmJudgeConfig
from rlhf.eval.judges import (
    LLM_TEMPLATE,
    LLM_TEMPLATE_VERSION,
    LlmJudge,
    PairJudge,
    RewardModelJudge,
    RuleJudge,
    combine_orders,
    parse_choice,
    reward_model_scorer,
)
from rlhf.eval.records import EvalItem, JudgeVerdicts, Outcome
from rlhf.eval.report import build_report, evaluate, judge_all, judge_lines, markdown, write_report
from rlhf.eval.stats import cohen_kappa, length_controlled_win_rate, summarise, wilson_interval

__all__ = [
    "EvalConfig", "EvalItem", "HumanJudgeConfig", "JudgeName", "JudgeVerdicts", "LLM_TEMPLATE", "LLM_TEMPLATE_VERSION",
    "LlmJudge", "LlmJudgeConfig", "Outcome", "PairJudge", "RewardModelJudge", "RuleJudge", "build_report", "cohen_kappa",
    "combine_orders", "evaluate", "judge_all", "judge_lines", "length_controlled_win_rate", "markdown", "parse_choice",
    "reward_model_scorer", "summarise", "wilson_interval", "write_report",
]
