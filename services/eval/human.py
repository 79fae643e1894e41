"""The human judge: each pair is published as a labeling task in the feedback store, which the
feedback service hands to annotators (people, labeling tools or simulated annotators over
gRPC); their preferences come back through the same store.

- One task per item, id `eval-<eval_id>-<index>`, asking k distinct annotators
  (`annotations_per_item`); the two answers in a seeded random order per item (so an
  annotator's position bias does not favour a side), shown as the loop shows them (an
  empty answer as `(no answer)`); no metadata.
- Gold tasks (`gold_tasks`, `gold_rate`) are mixed in at seeded positions, with the same k,
  ids `eval-<eval_id>-g<index>`; each annotator's accuracy on them is reported, and
  annotators under `min_gold_accuracy` are left out of the verdicts.
- An annotator counts once per task (its latest preference). An item's verdict is the
  plurality of its annotators' votes (A, B, tie; both-bad is a tie); a shared top is a tie;
  an item nobody judged has no verdict (reported as missing).
- `judge` publishes, then waits up to `timeout_s` for k judgements of every item; `collect`
  reads whatever has arrived (`hitl eval --collect`). Publishing twice is harmless: a task id
  that exists is left as it is.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.eval.config import HumanJudgeConfig
from rlhf.eval.records import EvalItem, JudgeVerdicts
from rlhf.quality.gold import check_gold_pool, gold_count, gold_from_file
from rlhf.quality.judges import shown_text
from rlhf.records import Task


def prompt_id(prompt: str) -> str:
    return "p-" + hashlib.sha256(prompt.encode()).hexdigest()[:16]


def load_gold_pool(path) -> list[Task]:
    from services.feedback.jsonl import read_tasks

    return check_gold_pool(list(read_tasks(path)), str(path))


@dataclass(frozen=True)
class Published:
    tasks: list[Task]  # every task, gold included, in publication order
    a_candidate: dict[str, str]  # item task id -> the candidate id that shows answer A
    item_tasks: list[str]  # task id of each item, in the items' order


class HumanJudge:
    name = "human"

    def __init__(self, cfg: HumanJudgeConfig, store, eval_id: str, gold_pool: Sequence[Task] = ()):
        self.cfg = cfg
        self.store = store
        self.eval_id = eval_id
        self.gold_pool = list(gold_pool) if gold_pool else (load_gold_pool(cfg.gold_tasks) if cfg.gold_tasks else [])

    def task_id(self, index: int) -> str:
        return f"eval-{self.eval_id}-{index:05d}"

    def tasks(self, items: Sequence[EvalItem]) -> Published:
        """The tasks of the items and the gold tasks (deterministic for eval id and seed)."""
        rng = random.Random(f"hitl-eval:{self.eval_id}:{self.cfg.seed}")
        k = self.cfg.annotations_per_item
        out, a_candidate, ids = [], {}, []
        for i, item in enumerate(items):
            tid = self.task_id(i)
            texts = [("a", item.answer_a), ("b", item.answer_b)]
            if rng.random() < 0.5:
                texts.reverse()
            candidates = tuple(pb.Candidate(candidate_id=f"{tid}-{j}", text=shown_text(text)) for j, (_, text) in enumerate(texts))
            a_candidate[tid] = next(f"{tid}-{j}" for j, (side, _) in enumerate(texts) if side == "a")
            out.append(Task(task_id=tid, project=self.cfg.project, prompt_id=prompt_id(item.prompt), prompt=item.prompt,
                            candidates=candidates, annotations_wanted=k))
            ids.append(tid)
        n_gold = gold_count(self.cfg.gold_rate, len(items)) if self.gold_pool else 0
        for j in range(n_gold):
            slot = Task(task_id=f"eval-{self.eval_id}-g{j:04d}", project=self.cfg.project, prompt_id="", prompt="",
                        candidates=(), annotations_wanted=k)
            gold = gold_from_file(slot, self.gold_pool[j % len(self.gold_pool)], rng, prompt_id)
            out.insert(rng.randrange(len(out) + 1), gold)
        return Published(out, a_candidate, ids)

    def publish(self, items: Sequence[EvalItem]) -> Published:
        published = self.tasks(items)
        outcomes = self.store.add_tasks(published.tasks)
        refused = [(t.task_id, o.rejection) for t, o in zip(published.tasks, outcomes) if getattr(o, "rejection", None)]
        if refused:
            tid, why = refused[0]
            raise ValueError(f"task {tid} refused by the store: {why}")
        return published

    def _votes(self) -> dict[str, dict[str, pb.Preference]]:
        """task id -> annotator -> that annotator's latest preference, for this eval's tasks."""
        prefix = f"eval-{self.eval_id}-"
        votes: dict[str, dict[str, pb.Preference]] = {}
        for stored in self.store.iter_after(0, [self.cfg.project]):
            r = stored.record
            if r.task_id.startswith(prefix) and r.WhichOneof("judgement") == "preference":
                votes.setdefault(r.task_id, {})[r.annotator_id] = r.preference  # read in seq order: the latest stays
        return votes

    @staticmethod
    def _preferred(p: pb.Preference) -> str | None:
        """The candidate id the preference chose; None for a tie or both-bad."""
        if p.choice == pb.Preference.CHOICE_A:
            return p.candidate_a_id
        if p.choice == pb.Preference.CHOICE_B:
            return p.candidate_b_id
        return None

    def missing(self, items: Sequence[EvalItem]) -> int:
        """Judgements still wanted (k per item, less those received)."""
        votes = self._votes()
        k = self.cfg.annotations_per_item
        return sum(max(0, k - len(votes.get(self.task_id(i), {}))) for i in range(len(items)))

    def collect(self, items: Sequence[EvalItem]) -> JudgeVerdicts:
        """The verdicts from the judgements received so far (see the module docstring)."""
        published = self.tasks(items)
        votes = self._votes()
        gold = self.store.gold_answers([self.cfg.project])
        gold_right: Counter = Counter()
        gold_seen: Counter = Counter()
        for tid, by in votes.items():
            if tid not in gold:
                continue
            for annotator, p in by.items():
                gold_seen[annotator] += 1
                gold_right[annotator] += self._preferred(p) == gold[tid].better
        accuracy = {a: gold_right[a] / gold_seen[a] for a in gold_seen}
        excluded = sorted(a for a, acc in accuracy.items() if acc < self.cfg.min_gold_accuracy)
        verdicts, per_item = [], []
        for tid in published.item_tasks:
            counts: Counter = Counter()
            for annotator, p in votes.get(tid, {}).items():
                if annotator in excluded:
                    continue
                chosen = self._preferred(p)
                counts["tie" if chosen is None else "a" if chosen == published.a_candidate[tid] else "b"] += 1
            top = counts.most_common()
            if not top:
                verdicts.append(None)
            elif len(top) > 1 and top[0][1] == top[1][1]:
                verdicts.append("tie")
            else:
                verdicts.append(top[0][0])
            per_item.append({"task_id": tid, "votes": dict(counts)})
        details = {"eval_id": self.eval_id, "project": self.cfg.project, "annotations_per_item": self.cfg.annotations_per_item,
                   "gold_tasks": len(published.tasks) - len(published.item_tasks), "gold_accuracy": accuracy,
                   "excluded_annotators": excluded, "judgements": sum(len(by) for tid, by in votes.items() if tid not in gold)}
        return JudgeVerdicts(self.name, tuple(verdicts), details=details, item_details=tuple(per_item))

    def wait(self, items: Sequence[EvalItem], timeout_s: float | None = None) -> int:
        """Wait until every item has k judgements or the timeout passes; returns how many are still wanted."""
        deadline = time.monotonic() + (self.cfg.timeout_s if timeout_s is None else timeout_s)
        while True:
            left = self.missing(items)
            if left == 0 or time.monotonic() >= deadline:
                return left
            time.sleep(min(self.cfg.poll_s, max(0.0, deadline - time.monotonic())))

    def judge(self, items: Sequence[EvalItem]) -> JudgeVerdicts:
        self.publish(items)
        self.wait(items)
        return self.collect(items)
