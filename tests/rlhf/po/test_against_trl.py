"""Our DPO, IPO and KTO against TRL's (DPOTrainer "sigmoid" and "ipo", KTOTrainer "kto"): the
same tiny model, the same token ids, the same reference; the losses and every parameter's
gradient must agree. TRL's own collators build its batches (right padding) and ours are the
SFT layout (left-padded prompt, right-padded answer), so agreement also shows the layouts and
their position ids to be equivalent."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch

from rlhf.po import KTOExample, PairExample, POConfig
from rlhf.po.trainer import _kl_point, _losses, _micro_batches
from rlhf.ppo import DeepSpeedConfig, PPOConfig
from rlhf.sft.data import prompt_ids, response_ids
from tests.rlhf.ppo.helpers import make_trainer

PAIRS = [
    PairExample("Name a colour.", "Blue, like the sea.", "Nope."),
    PairExample("Say hello.", "Hello there!", "Go away, I am busy today."),
    PairExample("Count to three.", "One, two, three.", "Three."),
]
KTO = [
    KTOExample("Name a colour.", "Blue, like the sea.", True),
    KTOExample("Say hello.", "Go away, I am busy today.", False),
    KTOExample("Count to three.", "One, two, three.", True),
    KTOExample("Name a fruit.", "A chair.", False),
]


def _ours(loss: str, examples, beta: float = 0.1):
    """Our trainer after one step of training (so policy and reference differ), its loss on
    `examples` and the gradient of that loss, on the policy's own parameters."""
    trainer = make_trainer(PPOConfig(advantage_estimator="grpo", rollout_batch_size=4, group_size=2, max_new_tokens=4, minibatch_size=8, seed=0),
                           DeepSpeedConfig(zero_stage=0), lora=False)
    policy = trainer.policy
    with torch.no_grad():  # move the policy away from its reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = POConfig(loss=loss, beta=beta, batch_size=len(examples), max_prompt_tokens=64, max_response_tokens=32)
    (rows,) = list(_micro_batches(trainer, list(examples), cfg))
    kl = _kl_point(trainer, policy, [rows]) if loss == "kto" else None
    policy.zero_grad()
    losses, _ = _losses(trainer, policy, rows, cfg, kl)
    value = losses.mean()
    value.backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
    return trainer, value.detach(), grads, kl


def _args(config_cls, **kw):
    return config_cls(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False, **kw)


def _trl_grads(model, loss) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss, trl_loss", [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_dpo_and_ipo_losses_and_gradients_equal_trl(loss, trl_loss):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    trainer, ours, our_grads, _ = _ours(loss, PAIRS, beta=0.1)
    tok = trainer.tokenizer
    model = copy.deepcopy(trainer.policy).float()
    reference = copy.deepcopy(trainer.reference._module).float()  # the policy as it started
    dataset = Dataset.from_list([{"prompt": "p", "chosen": " a", "rejected": " b"}] * 2)
    trl = DPOTrainer(model=model, ref_model=reference, processing_class=tok, train_dataset=dataset,
                     args=_args(DPOConfig, per_device_train_batch_size=len(PAIRS), beta=0.1, loss_type=[trl_loss]))
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)([
        {"prompt_ids": prompt_ids(tok, e.prompt, 64), "chosen_ids": response_ids(tok, e.chosen, 32),
         "rejected_ids": response_ids(tok, e.rejected, 32)} for e in PAIRS
    ])
    trl.model.zero_grad()
    theirs = trl.compute_loss(trl.model, batch)
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    assert ours.item() != pytest.approx(0.6931, abs=1e-3) or loss != "dpo"  # policy != reference: not the trivial ln 2
    their_grads = _trl_grads(trl.model, theirs)
    assert set(our_grads) == set(their_grads)
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_kto_loss_reference_point_and_gradients_equal_trl():
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    trainer, ours, our_grads, our_kl = _ours("kto", KTO, beta=0.1)
    tok = trainer.tokenizer
    model = copy.deepcopy(trainer.policy).float()
    reference = copy.deepcopy(trainer.reference._module).float()
    dataset = Dataset.from_list([{"prompt": "p", "completion": " a", "label": True}, {"prompt": "q", "completion": " b", "label": False}])
    trl = KTOTrainer(model=model, ref_model=reference, processing_class=tok, train_dataset=dataset,
                     args=_args(KTOConfig, per_device_train_batch_size=len(KTO), beta=0.1))
    previous = KTO[-1:] + KTO[:-1]  # TRL's KL pairs: each prompt with the previous example's answer
    batch = DataCollatorForUnpairedPreference(pad_token_id=tok.pad_token_id)([
        {"prompt_ids": prompt_ids(tok, e.prompt, 64), "completion_ids": response_ids(tok, e.completion, 32),
         "KL_completion_ids": response_ids(tok, p.completion, 32), "label": e.desirable} for e, p in zip(KTO, previous)
    ])
    batch["label"] = torch.tensor([e.desirable for e in KTO])
    trl.model.train()
    trl.model.zero_grad()
    theirs = trl.compute_loss(trl.model, batch)
    theirs.backward()
    assert our_kl.item() > 0  # the mismatched pairs' log-ratio: the reference point is not the clamp's 0
    assert our_kl.item() == pytest.approx(trl._metrics["train"]["kl"][-1], rel=1e-5, abs=1e-7)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    their_grads = _trl_grads(trl.model, theirs)
    assert set(our_grads) == set(their_grads)
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
