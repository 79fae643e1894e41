"""The reward-model actor: trains on the curated feedback of each round, scores rollouts."""

from __future__ import annotations

import ray

from actors.config import RewardModelSpec


@ray.remote
class RewardModelActor:
    """Holds one `rlhf.reward.RewardModel`; every round adds its pairs and updates it."""

    def __init__(self, spec: RewardModelSpec):
        from rlhf.reward.model import build_reward_model
        from rlhf.threads import set_torch_threads

        self.spec = spec
        set_torch_threads(spec.resources.torch_threads, ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
        self.model = build_reward_model(spec.reward, spec.policy_model)
        self.items: list = []
        self.trained_rounds = 0

    def forget(self, flagged: list) -> int:
        """Leave out of later updates the earlier items that flags (`FlaggedContent`) of a
        later round reach (`rlhf.curation.rules.without_flagged`); returns how many items changed.
        What the weights already learnt from them stays until they are trained again."""
        from rlhf.curation.rules import without_flagged

        self.items, changed = without_flagged(self.items, flagged)
        return changed

    def train(self, items: list, flagged: list = ()) -> dict:
        """Add a round's items (PreferencePair / Ranking) and update the model: on everything
        so far, or on the new pairs plus a sample of earlier ones (``reward.update_pairs``).
        Earlier items that this round's flags reach are left out first (see `forget`)."""
        from rlhf.reward.trainer import train_reward_model

        forgotten = self.forget(list(flagged))
        new_from = len(self.items)
        self.items.extend(items)
        report = train_reward_model(self.model, self.items, new_from=new_from)
        self.trained_rounds += 1
        return {
            "forgotten_flagged": forgotten,
            "pairs_total": len(self.items),
            "train_pairs": report.train_pairs,
            "validation_pairs": report.validation_pairs,
            "validation_accuracy": report.validation_accuracy,
            "validation_loss": report.validation_loss[report.best_epoch - 1] if report.best_epoch else None,
            "epochs": report.epochs_run,
        }

    def score(self, prompts: list[str], responses: list[str]):
        return self.model.score(prompts, responses)

    def save(self, directory: str) -> None:
        """The trained tensors (adapters or weights, head, centring offset) and the items
        trained on so far."""
        import pickle
        from pathlib import Path

        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file(_trained_tensors(self.model), str(Path(directory) / "trained.safetensors"))
        (Path(directory) / "items.pkl").write_bytes(pickle.dumps(self.items))
        (Path(directory) / "rounds.txt").write_text(f"{self.trained_rounds}\n")

    def load(self, directory: str) -> int:
        """Restore what `save` wrote onto a fresh model: the same scores as before."""
        import pickle
        from pathlib import Path

        from safetensors.torch import load_file

        from rlhf.reward.model import build_reward_model

        self.items = pickle.loads((Path(directory) / "items.pkl").read_bytes())
        self.model = build_reward_model(self.spec.reward, self.spec.policy_model)
        tensors = load_file(str(Path(directory) / "trained.safetensors"))
        missing = set(tensors) - set(self.model.state_dict())
        if missing:
            raise ValueError(f"{directory}: tensors the reward model does not have: {sorted(missing)[:3]}")
        self.model.load_state_dict(tensors, strict=False)
        self.model.eval()
        self.trained_rounds = int((Path(directory) / "rounds.txt").read_text())
        return len(self.items)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def _trained_tensors(model) -> dict:
    """What training changes: the trainable tensors and the centring offset."""
    names = {name for name, p in model.named_parameters() if p.requires_grad} | {"offset"}
    return {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items() if name in names}
