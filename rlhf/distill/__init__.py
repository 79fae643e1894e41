"""Distillation: a student model trained to imitate a teacher that shares its tokenizer,
token-level (forward KL, reverse KL or generalised JSD on the teacher's logits, as TRL's GKD)
or sequence-level (SFT on the teacher's answers), on the PPO trainer's engine.

    from rlhf.distill import DistillConfig, check_same_tokenizer, distill, student_trainer, write_answers
    check_same_tokenizer(teacher_tokenizer, tokenizer, "teacher", "student")
    trainer = student_trainer(student, tokenizer, cfg, DeepSpeedConfig())
    report = distill(trainer, teacher, write_answers(teacher, tokenizer, prompts, cfg), held_out, cfg)
"""

from rlhf.distill.config import DistillConfig, DistillMode, Divergence
from rlhf.distill.data import (
    Answer,
    TokenizerMismatch,
    answer_batch,
    check_same_tokenizer,
    demonstrations,
    vocabulary_digest,
    write_answers,
)
from rlhf.distill.losses import forward_kl, generalized_jsd, masked_mean, masked_sum, reverse_kl, token_divergence
from rlhf.distill.trainer import DistillReport, HeldOut, distill, held_out_figures, student_trainer

__all__ = [
    "Answer",
    "DistillConfig",
    "DistillMode",
    "DistillReport",
    "Divergence",
    "HeldOut",
    "TokenizerMismatch",
    "answer_batch",
    "check_same_tokenizer",
    "demonstrations",
    "distill",
    "forward_kl",
    "generalized_jsd",
    "held_out_figures",
    "masked_mean",
    "masked_sum",
    "reverse_kl",
    "student_trainer",
    "token_divergence",
    "vocabulary_digest",
    "write_answers",
]
