"""An evaluation's report: the statistics of every judge (rlhf/eval/stats.py) over the items,
per slice, the judges' agreement, and its three files: eval.json, eval.md, eval.png.

    report = evaluate(items, [RuleJudge(cfg)], a={"label": "round-0004"}, b={"label": "base"})
    write_report(report, out_dir)
"""

from __future__ import annotations

import itertools
import json
import math
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf.eval.judges import PairJudge
from rlhf.eval.records import EvalItem, JudgeVerdicts
from rlhf.eval.stats import cohen_kappa, slices, summarise

INTERVAL = "wilson-95"


def judge_all(items: Sequence[EvalItem], judges: Sequence[PairJudge]) -> list[JudgeVerdicts]:
    """Every judge's verdicts on the items, in the judges' order."""
    out = []
    for judge in judges:
        result = judge.judge(items)
        if len(result.verdicts) != len(items):
            raise ValueError(f"{judge.name}: {len(result.verdicts)} verdicts for {len(items)} items")
        out.append(result)
    return out


def build_report(items: Sequence[EvalItem], results: Sequence[JudgeVerdicts], *, a: dict | None = None, b: dict | None = None,
                 eval_id: str | None = None, extra: dict | None = None) -> dict[str, Any]:
    """The report (a JSON-ready dict) of judged items. `a` and `b` describe the two sides
    (label, kind, `kl` to the reference where measured); `extra` is kept as it is."""
    len_a = [len(i.answer_a) for i in items]
    len_b = [len(i.answer_b) for i in items]
    groups = slices([i.category for i in items])
    judges: dict[str, Any] = {}
    for r in results:
        entry = summarise(r.verdicts, len_a, len_b).as_dict()
        if r.scores_a is not None and r.scores_b is not None and items:
            entry["mean_reward_a"] = sum(r.scores_a) / len(r.scores_a)
            entry["mean_reward_b"] = sum(r.scores_b) / len(r.scores_b)
        entry["details"] = dict(r.details)
        if groups:
            entry["slices"] = {name: summarise([r.verdicts[i] for i in idx], [len_a[i] for i in idx], [len_b[i] for i in idx]).as_dict()
                               for name, idx in groups.items()}
        judges[r.judge] = entry
    agreement = [{"judges": [x.judge, y.judge], **cohen_kappa(x.verdicts, y.verdicts)} for x, y in itertools.combinations(results, 2)]
    rows = []
    for k, item in enumerate(items):
        row: dict[str, Any] = {"prompt": item.prompt, "category": item.category, "answer_a": item.answer_a, "answer_b": item.answer_b,
                               "verdicts": {r.judge: r.verdicts[k] for r in results}}
        scores = {r.judge: [r.scores_a[k], r.scores_b[k]] for r in results if r.scores_a is not None and r.scores_b is not None}
        if scores:
            row["scores"] = scores
        more = {r.judge: r.item_details[k] for r in results if r.item_details is not None}
        if more:
            row["details"] = more
        rows.append(row)
    return {
        "eval_id": eval_id or uuid.uuid4().hex[:12],
        "a": a or {}, "b": b or {},
        "n_items": len(items),
        "interval": INTERVAL,
        "win_rate_of": "a",  # every win-rate is A's, ties counted half
        "judges": judges,
        "agreement": agreement,
        "slices": list(groups),
        **(extra or {}),
        "items": rows,
    }


def evaluate(items: Sequence[EvalItem], judges: Sequence[PairJudge], **kwargs) -> dict[str, Any]:
    """Judge the items with every judge and build the report (what the loop calls per round)."""
    return build_report(items, judge_all(items, judges), **kwargs)


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def judge_lines(report: dict) -> list[str]:
    """One line per judge: win-rate, its 95% interval, win / tie / loss."""
    out = []
    for name, j in report["judges"].items():
        ci = j["ci95"]
        interval = f"[{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "[–]"
        line = (f"{name}: win-rate {_pct(j['win_rate'])} {interval} (95% Wilson), W/T/L {j['win']}/{j['tie']}/{j['loss']}"
                f" of {j['n']}" + (f", {j['missing']} missing" if j["missing"] else "") + f"; length-controlled {_pct(j['lc_win_rate'])}")
        if "mean_reward_a" in j:
            line += f"; mean reward A {j['mean_reward_a']:.3g}, B {j['mean_reward_b']:.3g}"
        out.append(line)
    return out


def markdown(report: dict) -> str:
    a, b = report["a"], report["b"]
    lines = [f"# Evaluation {report['eval_id']}", "",
             f"A: {a.get('label', 'A')} · B: {b.get('label', 'B')} · {report['n_items']} prompts"
             + (f" ({report['prompts']})" if report.get("prompts") else "")
             + ". Win-rates are A's against B, ties counted half; intervals are 95% Wilson score intervals.", "",
             "| judge | n | win | tie | loss | win-rate | 95% interval | length-controlled | mean reward A | mean reward B |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, j in report["judges"].items():
        ci = j["ci95"]
        lines.append(f"| {name} | {j['n']} | {j['win']} | {j['tie']} | {j['loss']} | {_pct(j['win_rate'])} | "
                     f"{(_pct(ci[0]) + ' – ' + _pct(ci[1])) if ci else '–'} | {_pct(j['lc_win_rate'])} | "
                     f"{_num(j.get('mean_reward_a'))} | {_num(j.get('mean_reward_b'))} |")
    kl = [(side, s.get("kl")) for side, s in (("A", a), ("B", b)) if s.get("kl") is not None]
    if kl:
        lines += ["", "KL to the reference (" + (a.get("kl_reference") or b.get("kl_reference") or "the base policy")
                  + "), mean over the side's answers of the summed token log-ratio: "
                  + ", ".join(f"{side} {value:.3f} nats" for side, value in kl) + "."]
    templates = {j["details"]["template_version"] for j in report["judges"].values() if "template_version" in j["details"]}
    if templates:
        lines += ["", f"LLM judge template: {', '.join(sorted(templates))}; each pair asked in both orders, a verdict that flips is a tie."]
    if report["slices"]:
        lines += ["", "## Per slice", "", "| judge | slice | n | win | tie | loss | win-rate | 95% interval |", "|---|---|---|---|---|---|---|---|"]
        for name, j in report["judges"].items():
            for cat, s in j.get("slices", {}).items():
                ci = s["ci95"]
                lines.append(f"| {name} | {cat} | {s['n']} | {s['win']} | {s['tie']} | {s['loss']} | {_pct(s['win_rate'])} | "
                             f"{(_pct(ci[0]) + ' – ' + _pct(ci[1])) if ci else '–'} |")
    if report["agreement"]:
        lines += ["", "## Agreement between judges", "", "| judges | items | raw agreement | Cohen's kappa |", "|---|---|---|---|"]
        for g in report["agreement"]:
            lines.append(f"| {' / '.join(g['judges'])} | {g['n']} | {_pct(g['raw'])} | {_num(g['kappa'])} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    """Each judge's win-rate with its 95% interval (and the length-controlled one); per slice
    beside it when prompts carry categories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["judges"])
    panels = 2 if report["slices"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for k, name in enumerate(names):
        j = report["judges"][name]
        if j["win_rate"] is None:
            continue
        lo, hi = j["ci95"]
        ax.errorbar([k], [j["win_rate"]], yerr=[[j["win_rate"] - lo], [hi - j["win_rate"]]], fmt="o", capsize=6, color="C0",
                    label="win-rate, 95% interval" if k == 0 else None)
        if j["lc_win_rate"] is not None:
            ax.plot([k + 0.15], [j["lc_win_rate"]], "s", color="C1", label="length-controlled" if k == 0 else None)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win-rate of A ({report['a'].get('label', 'A')}) vs B ({report['b'].get('label', 'B')})")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    if panels == 2:
        ax2 = axes[0][1]
        cats = report["slices"]
        width = 0.8 / max(1, len(names))
        for k, name in enumerate(names):
            s = report["judges"][name].get("slices", {})
            xs = [c + k * width for c in range(len(cats))]
            ys = [s[c]["win_rate"] if s.get(c) and s[c]["win_rate"] is not None else 0.0 for c in cats]
            ax2.bar(xs, ys, width=width, label=name)
        ax2.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax2.set_xticks([c + 0.4 - width / 2 for c in range(len(cats))], cats, rotation=30, ha="right")
        ax2.set_ylim(0, 1)
        ax2.set_title("per slice", fontsize=10)
        ax2.legend(fontsize=8)
    fig.suptitle(f"hitl eval {report['eval_id']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: dict, out: Path) -> dict[str, Path]:
    """eval.json, eval.md and eval.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "md": out / "eval.md", "png": out / "eval.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths
