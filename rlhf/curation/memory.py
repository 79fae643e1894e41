"""What curation remembers from round to round: flagged content and the items already used.

A round's curation asks this memory three things: is this prompt or candidate flagged (by a
flag of this round or an earlier one), does an item repeat a response within itself, and
does it duplicate an item used before (this round or earlier). The memory is saved with
each checkpoint (`curation.json`), so a resumed or redone round sees exactly what the
checkpointed rounds used, and nothing of a round that was lost.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rlhf.curation.config import CurationConfig
from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.curation.dedup import DuplicateIndex, Fingerprint

FLAG_KINDS = {
    pb.Flag.KIND_HARMFUL: "harmful",
    pb.Flag.KIND_PII: "pii",
    pb.Flag.KIND_SPAM: "spam",
    pb.Flag.KIND_OTHER: "other",
}
"""Flag categories by wire value, most severe first (a target flagged twice reports the more
severe category)."""

_SEVERITY = {name: i for i, name in enumerate(FLAG_KINDS.values())}
_FILE = "curation.json"


class CurationMemory:
    """Flags by (task, candidate) ("" for the prompt) and a duplicate index of used items."""

    def __init__(self, cfg: CurationConfig, index: DuplicateIndex | None = None,
                 flags: dict[tuple[str, str], str] | None = None) -> None:
        self.cfg = cfg
        self.index = index or DuplicateIndex(cfg.near_duplicate_threshold, cfg.num_permutations, cfg.shingle_size, cfg.dedup_seed)
        self.flags = flags or {}

    # -- flags ------------------------------------------------------------------------

    def add_flag(self, flag: pb.Flag, task_id: str) -> str:
        """Remember a flag; returns its category ("harmful", "pii", "spam", "other")."""
        kind = FLAG_KINDS.get(flag.kind, "other")
        key = (task_id, flag.candidate_id)
        if key not in self.flags or _SEVERITY[kind] < _SEVERITY[self.flags[key]]:
            self.flags[key] = kind
        return kind

    def flag_on(self, task_id: str, candidate_ids: Sequence[str] = ()) -> str | None:
        """The category of a flag on the task's prompt, else on one of the candidates (the
        most severe); None when none is flagged."""
        if (task_id, "") in self.flags:
            return self.flags[(task_id, "")]
        kinds = [self.flags[(task_id, c)] for c in candidate_ids if (task_id, c) in self.flags]
        return min(kinds, key=_SEVERITY.__getitem__) if kinds else None

    # -- duplicates -------------------------------------------------------------------

    def fingerprint(self, scope: str, prompt: str, responses: Sequence[str]) -> Fingerprint:
        return self.index.fingerprint(scope, prompt, responses)

    def repeated_responses(self, fp: Fingerprint) -> list[int]:
        """Indices of responses of one item that duplicate an earlier response of the item."""
        return self.index.repeated_responses(fp)

    def admit(self, fp: Fingerprint, round_: int) -> str | None:
        """None, and the item is remembered as used in ``round_``; or why it is a duplicate:
        ``dropped/duplicate_seen`` (used in an earlier round), ``dropped/duplicate_exact`` or
        ``dropped/duplicate_near`` (of an item kept earlier in this round)."""
        if not self.cfg.dedup:
            return None
        match = self.index.find(fp)
        if match is None:
            self.index.add(fp, round_)
            return None
        if match.tag < round_:
            return "dropped/duplicate_seen"
        return f"dropped/duplicate_{match.kind}"

    def judgement_scope(self, annotator_id: str) -> str:
        return f"judgement:{annotator_id}" if self.cfg.per_annotator else "judgement"

    # -- persistence ------------------------------------------------------------------

    def save(self, directory: Path) -> Path:
        path = Path(directory) / _FILE
        state = {"flags": sorted([t, c, k] for (t, c), k in self.flags.items()), "index": self.index.state()}
        path.write_text(json.dumps(state))
        return path

    @classmethod
    def load(cls, directory: Path, cfg: CurationConfig) -> CurationMemory:
        """The memory saved in ``directory``, or an empty one if it holds none (a checkpoint
        written before curation had a memory)."""
        path = Path(directory) / _FILE
        if not path.exists():
            return cls(cfg)
        state = json.loads(path.read_text())
        try:
            index = DuplicateIndex.from_state(state["index"], cfg.near_duplicate_threshold, cfg.num_permutations,
                                              cfg.shingle_size, cfg.dedup_seed)
        except ValueError as err:
            raise ValueError(f"curation: {path}: {err}") from None
        return cls(cfg, index, {(t, c): k for t, c, k in state["flags"]})
