"""Shared by the `hitl eval` tests: a gold tasks file, simulated annotators over gRPC."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path

from rlhf.quality.judges import JudgeConfig
from services.feedback.client import FeedbackClient
from services.feedback.simulated import AnnotatorConfig, SimulatedAnnotator


def gold_file(path: Path, n: int = 3) -> Path:
    """Gold pairs the concise rule separates: the one-word answer is the better one."""
    lines = []
    for i in range(n):
        lines.append(json.dumps({
            "task_id": f"gold-{i}", "project": "eval", "prompt_id": f"gp{i}", "prompt": f"Gold question {i}?",
            "candidates": [{"candidate_id": "long", "text": "Well, there are many things one could say about this here."},
                           {"candidate_id": "short", "text": "Yes."}],
            "gold": {"better": "short"}}))
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def annotators(address: str, project: str = "eval", n: int = 3, rule: str = "concise", noise: float = 0.0, prefix: str = "sim"):
    """n simulated annotators pulling and judging over real gRPC until the block ends."""
    stop = threading.Event()
    clients, threads = [], []
    for i in range(n):
        client = FeedbackClient(address)
        clients.append(client)
        annotator = SimulatedAnnotator(AnnotatorConfig(annotator_id=f"{prefix}-{i}", judge=JudgeConfig(rule=rule), noise=noise, seed=i,
                                                       batch=4), client, project)
        t = threading.Thread(target=annotator.run, args=(stop, 0.05), daemon=True)
        t.start()
        threads.append(t)
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for c in clients:
            c.close()
