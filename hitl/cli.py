"""The `hitl` command, assembled from the command modules that live beside what they drive.

    hitl run CONFIG | --resume RUN_DIR           actors/command.py
    hitl train dpo|ipo|kto --config C ...       actors/train_command.py
    hitl annotators [--store URL] ...            actors/command.py
    hitl feedback serve|submit|tasks|export|import|stats   services/feedback/command.py
    hitl adapters serve ...                      services/adapters/command.py
    hitl generation serve CONFIG|RUN_DIR         services/generation/command.py
    hitl eval --a A --b B --judge J ... --out D  services/eval/command.py
    hitl label --project P --annotator-id ME     services/labeling/command.py
    hitl label-web --project P ...               services/labeling/web/command.py

This is the one module that imports every layer (cli -> actors -> services -> rlhf).
"""

from __future__ import annotations

import logging

import click

from actors.command import annotators, run
from actors.train_command import train
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


for command in (run, train, annotators, feedback, adapters, generation, label, label_web, eval_command):
    main.add_command(command)


if __name__ == "__main__":
    main()
