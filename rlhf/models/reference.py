"""The reference policy pi_ref of the KL penalty.

Under LoRA (or any other PEFT kind: DoRA, IA3, BitFit, bottleneck adapters) the reference is
the policy itself with its PEFT part disabled (``PeftModel.disable_adapter()``): the base
weights are frozen, so "adapters off" is exactly the starting policy and no second copy is
held in memory. Without LoRA every weight trains,
so the reference is a frozen deep copy taken when :func:`reference_model` is called (call it
before the optimiser's first step, and before wrapping the policy in a DeepSpeed engine).

Usage::

    ref = reference_model(policy)
    with ref.active() as module:        # no_grad, eval mode, adapters off where shared
        logits = module(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    # or simply
    logits = ref.logits(ids, mask)      # (B, T, V)
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from peft import PeftModel
from torch import nn

from rlhf.models.loading import PolicyModel, position_ids_from_mask


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class ReferenceModel:
    """pi_ref: the policy with adapters disabled (LoRA) or a frozen copy of it."""

    def __init__(self, policy: PolicyModel) -> None:
        self.shares_weights: bool = isinstance(policy, PeftModel)
        """True when the reference is the policy's own base weights (LoRA)."""
        if self.shares_weights:
            self._module: nn.Module = policy
        else:
            frozen = copy.deepcopy(policy).eval()
            frozen.requires_grad_(False)
            self._module = frozen

    @classmethod
    def frozen(cls, module: nn.Module) -> "ReferenceModel":
        """A reference that is `module` itself, loaded apart from the policy (e.g. ZeRO-3
        partitioned under an inference engine), frozen here."""
        ref = cls.__new__(cls)
        ref.shares_weights = False
        module.eval().requires_grad_(False)
        ref._module = module
        return ref

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        """Yield the module to call as the reference: gradients off, eval mode, and, when the
        weights are shared, adapters disabled until the block ends."""
        with torch.no_grad(), _eval_mode(self._module):
            if self.shares_weights:
                with self._module.disable_adapter():
                    yield self._module
            else:
                yield self._module

    def logits(
        self,
        input_ids: torch.Tensor,  # (B, T) long
        attention_mask: torch.Tensor,  # (B, T) 1 = real token
        position_ids: torch.Tensor | None = None,  # (B, T); default from the mask
    ) -> torch.Tensor:  # (B, T, V)
        """Reference logits for a batch (left or right padded)."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        with self.active() as module:
            return module(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
            ).logits


def reference_model(policy: PolicyModel) -> ReferenceModel:
    """The reference of a policy: adapters disabled under LoRA, else a frozen deep copy."""
    return ReferenceModel(policy)
