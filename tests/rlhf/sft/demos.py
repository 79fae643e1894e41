"""Demonstrations shared by the SFT tests: short prompts and corrected answers."""

from rlhf.sft import Demonstration

DEMOS = [
    Demonstration("Tell me a story.", "Once upon a time a cat sailed home.", prompt_id="p0", annotator_id="a"),
    Demonstration("What is the capital of France?", "Paris.", prompt_id="p1", annotator_id="a"),
    Demonstration("Name three colours.", "Red, green and blue.", prompt_id="p2", annotator_id="b", weight=0.5),
    Demonstration("Count to five.", "One, two, three, four, five.", prompt_id="p3", annotator_id="b"),
    Demonstration("Why is the sky blue?", "Air scatters blue light the most.", prompt_id="p4", annotator_id="a"),
]
