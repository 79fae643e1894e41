"""The reward model on Ray: N replicas that score concurrently, one that trains.

    group = RewardModelGroup.start(spec, options)     # [1] N replicas, each on its device
    report = group.train(items, flagged)              # [2] replica 0 trains, the others copy
    scores = group.score(prompts, responses)          # [3] the batch split over all replicas

[1] Each `RewardModelActor` holds one `rlhf.reward.RewardModel` on the device its placement
    gave it (`rlhf.devices.role_device`): a replica given a GPU scores on it.
[2] Training is small (tens to thousands of pairs a round) and sequential in its epochs, so
    one replica trains and the others load its trained tensors (adapters or weights, the
    head, the centring offset) from the object store: every replica then scores alike.
[3] Trainer ranks call `score` at once; each call splits its batch evenly over the replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

from actors.config import RewardModelSpec


@ray.remote
class RewardModelActor:
    """Holds one `rlhf.reward.RewardModel`; every round adds its pairs and updates it."""

    def __init__(self, spec: RewardModelSpec):
        from rlhf.devices import role_device
        from rlhf.threads import set_torch_threads

        self.spec = spec
        set_torch_threads(spec.resources.torch_threads, ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
        self.device = role_device(len(ray.get_gpu_ids()), spec.simulate_gpus)
        self.model = self._fresh_model()
        self.items: list = []
        self.trained_rounds = 0

    def _fresh_model(self):
        from rlhf.reward.model import build_reward_model

        model = build_reward_model(self.spec.reward, self.spec.policy_model, self.spec.template)
        model.to(self.device)
        model.eval()
        return model

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

        import time

        from services.telemetry import reward_model_metrics

        started = time.perf_counter()
        forgotten = self.forget(list(flagged))
        new_from = len(self.items)
        self.items.extend(items)
        report = train_reward_model(self.model, self.items, new_from=new_from)
        self.trained_rounds += 1
        reward_model_metrics().record({"accuracy": report.validation_accuracy, "update_seconds": time.perf_counter() - started,
                                       "pairs": report.train_pairs + report.validation_pairs},
                                      replica=ray.get_runtime_context().get_actor_id()[-8:])
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
        return self.model.score(prompts, responses).cpu()

    def trained_state(self) -> dict:
        """What training changed (see `_trained_tensors`), on the CPU, to copy onto the other replicas."""
        return _trained_tensors(self.model)

    def load_trained(self, tensors: dict) -> None:
        self.model.load_state_dict({k: v.to(self.device) for k, v in tensors.items()}, strict=False)
        self.model.eval()

    def save(self, storage, rel: str) -> None:
        """The trained tensors (adapters or weights, head, centring offset) and the items
        trained on so far, into `rel` of the checkpoint storage (rlhf/storage.py)."""
        import pickle
        from pathlib import Path

        from safetensors.torch import save_file

        with storage.writing(rel) as local:
            directory = Path(local)
            save_file(_trained_tensors(self.model), str(directory / "trained.safetensors"))
            (directory / "items.pkl").write_bytes(pickle.dumps(self.items))
            (directory / "rounds.txt").write_text(f"{self.trained_rounds}\n")

    def load(self, storage, rel: str) -> int:
        """Restore what `save` wrote onto a fresh model: the same scores as before."""
        import pickle
        from pathlib import Path

        from safetensors.torch import load_file

        with storage.reading(rel) as local:
            directory = Path(local)
            items = pickle.loads((directory / "items.pkl").read_bytes())
            tensors = load_file(str(directory / "trained.safetensors"))
            rounds = int((directory / "rounds.txt").read_text())
        self.items = items
        self.model = self._fresh_model()
        missing = set(tensors) - set(self.model.state_dict())
        if missing:
            raise ValueError(f"{storage.location(rel)}: tensors the reward model does not have: {sorted(missing)[:3]}")
        self.load_trained(tensors)
        self.trained_rounds = rounds
        return len(self.items)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def device_name(self) -> str:
        return str(self.device)


def _trained_tensors(model) -> dict:
    """What training changes: the trainable tensors and the centring offset."""
    names = {name for name, p in model.named_parameters() if p.requires_grad} | {"offset"}
    return {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items() if name in names}


@dataclass
class RewardModelGroup:
    """The reward-model replicas (see the module docstring); picklable, so trainer ranks hold it."""

    replicas: list
    timeout_s: float = 1800.0

    @classmethod
    def start(cls, spec: RewardModelSpec, options: list[dict], timeout_s: float = 1800.0) -> "RewardModelGroup":
        replicas = [RewardModelActor.options(**o).remote(spec) for o in options]
        return cls(replicas, timeout_s)

    def _get(self, refs, timeout_s: float | None = None):
        return ray.get(refs, timeout=self.timeout_s if timeout_s is None else timeout_s)

    def train(self, items: list, flagged: list = ()) -> dict:
        """[2] Replica 0 trains; the others take its trained tensors."""
        report = self._get(self.replicas[0].train.remote(items, flagged))
        self._spread()
        return report

    def forget(self, flagged: list) -> int:
        return self._get(self.replicas[0].forget.remote(flagged))

    def score(self, prompts: list[str], responses: list[str], timeout_s: float | None = None):
        """[3] Scores of a batch, its rows split evenly over the replicas, (B,) on the CPU;
        `timeout_s` instead of the group's call timeout (a caller that would rather not wait
        behind a training update)."""
        import torch

        n = len(self.replicas)
        size = -(-len(prompts) // n) if prompts else 0
        chunks = [(k, k + size) for k in range(0, len(prompts), size)] if size else []
        parts = self._get([self.replicas[i].score.remote(prompts[a:b], responses[a:b]) for i, (a, b) in enumerate(chunks)], timeout_s)
        return torch.cat(parts) if parts else torch.zeros(0)

    def save(self, storage, rel: str) -> None:
        self._get(self.replicas[0].save.remote(storage, rel))

    def load(self, storage, rel: str) -> None:
        self._get([r.load.remote(storage, rel) for r in self.replicas])

    def nodes(self) -> list[str]:
        return self._get([r.node.remote() for r in self.replicas])

    def devices(self) -> list[str]:
        return self._get([r.device_name.remote() for r in self.replicas])

    def _spread(self) -> None:
        if len(self.replicas) > 1:
            state = self.replicas[0].trained_state.remote()  # an ObjectRef: each replica fetches it once
            self._get([r.load_trained.remote(state) for r in self.replicas[1:]])

    def shutdown(self) -> None:
        for r in self.replicas:
            ray.kill(r)
        self.replicas = []
