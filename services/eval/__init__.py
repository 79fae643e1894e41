"""`hitl eval` (command.py): answers of two policies (answers.py), the human judge over the
feedback service (human.py), judges built from an `EvalConfig` (judges.py). The statistics,
the other judges and the report are in rlhf/eval/."""
