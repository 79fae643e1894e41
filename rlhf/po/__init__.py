"""Preference optimisation without a reward model: DPO, IPO and KTO on the policy's own engine.

    from rlhf.po import POConfig, pairs_from, run_preference_optimisation
    report = run_preference_optimisation(ppo_trainer, pairs_from(curated.items), POConfig(loss="dpo"))
"""

from rlhf.po.config import POConfig, POLoss
from rlhf.po.data import KTOExample, PairExample, kto_examples_from, pairs_from
from rlhf.po.losses import dpo_loss, ipo_loss, kto_loss
from rlhf.po.trainer import POReport, run_preference_optimisation

__all__ = [
    "KTOExample",
    "POConfig",
    "POLoss",
    "POReport",
    "PairExample",
    "dpo_loss",
    "ipo_loss",
    "kto_examples_from",
    "kto_loss",
    "pairs_from",
    "run_preference_optimisation",
]
