"""The reward-model actor: trains on the curated feedback of each round, scores rollouts."""

from __future__ import annotations

import ray


@ray.remote
class RewardModelActor:
    """Holds one `rlhf.reward.RewardModel`; every round adds its pairs and retrains."""

    def __init__(self, cfg_json: str):
        import torch

        from actors.config import RunConfig
        from rlhf.reward.model import build_reward_model

        cfg = RunConfig.model_validate_json(cfg_json)
        self.cfg = cfg
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.model = build_reward_model(cfg.reward, cfg.model)
        self.items: list = []
        self.trained_rounds = 0

    def train(self, items: list) -> dict:
        """Add a round's items (PreferencePair / Ranking) and fit on everything so far."""
        from rlhf.reward.trainer import train_reward_model

        self.items.extend(items)
        report = train_reward_model(self.model, self.items)
        self.trained_rounds += 1
        return {
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
        """What `load` needs: the items trained on so far (see `load`)."""
        import pickle
        from pathlib import Path

        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "items.pkl").write_bytes(pickle.dumps(self.items))

    def load(self, directory: str) -> int:
        """Rebuild the model and refit it on the checkpoint's items: training is seeded and
        deterministic, so this restores the same weights, adapters and all."""
        import pickle
        from pathlib import Path

        from rlhf.reward.model import build_reward_model
        from rlhf.reward.trainer import train_reward_model

        self.items = pickle.loads((Path(directory) / "items.pkl").read_bytes())
        self.model = build_reward_model(self.cfg.reward, self.cfg.model)
        if self.items:
            train_reward_model(self.model, self.items)
        return len(self.items)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()
