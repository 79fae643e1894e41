"""The `hitl` command, assembled from the command modules that live beside what they drive.

    hitl run CONFIG | --resume RUN_DIR           actors/command.py
    hitl train dpo|ipo|kto --config C ...       actors/train_command.py
    hitl distill --teacher T --student S --out D actors/distill_command.py
    hitl annotators [--store URL] ...            actors/command.py
    hitl prompts preview|stats CONFIG            actors/prompts_command.py
    hitl feedback serve|submit|tasks|export|import|stats   services/feedback/command.py
    hitl adapters serve ...                      services/adapters/command.py
    hitl generation serve CONFIG|RUN_DIR         services/generation/command.py
    hitl eval --a A --b B --judge J ... --out D  services/eval/command.py
    hitl tune SPACE --out D | --resume D         actors/tune/command.py
    hitl status RUN_DIR | --address A           actors/status_command.py
    hitl label --project P --annotator-id ME     services/labeling/command.py
    hitl label-web --project P ...               services/labeling/web/command.py

This is the one module that imports every layer (cli -> actors -> services -> rlhf).
"""

from __future__ import annotations

import logging

import click

from actors.command import annotators, run
from actors.distill_command import distill_command
from actors.prompts_command import prompts
from actors.status_command import status_command
from actors.train_command import train
from actors.tune.command import tune_command
from services.adapters.command import adapters
from services.eval.command import eval_command
from services.feedback.command import feedback
from services.generation.command import generation
from services.labeling.command import label
from services.labeling.web.command import label_web


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
def main(verbose: bool) -> None:
    """hitl: human-in-the-loop RLHF on Ray."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


for command in (run, train, distill_command, annotators, prompts, feedback, adapters, generation, eval_command, tune_command,
                status_command, label, label_web):
    main.add_command(command)


if __name__ == "__main__":
    main()
