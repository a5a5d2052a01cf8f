"""The Meta-VQA task-file format (the authors' `meta_train.json` / `meta_test.json`) and answer prompts.

Schema: `{question: {"answers": [str], "train": [[image_name, answer], ...], "test": [[image_name, answer], ...]}}`.
The label of an example is the index of its answer in `answers`; every task has its own label space. The generated
twin (`synthvqa`) writes the same schema, so every stage reads both through this one reader.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from metadiff.errors import InputFileError
from metadiff.utils.io import read_json

FALLBACK_PROMPT = "a photo of {}"


@dataclass(frozen=True)
class Task:
    """One question with its answers and its two example splits as (image name, label index)."""

    question: str
    answers: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...]

    @property
    def n_answers(self) -> int:
        return len(self.answers)

    def split(self, name: str) -> tuple[tuple[str, int], ...]:
        if name == "train":
            return self.train
        if name == "test":
            return self.test
        if name == "traintest":
            return self.train + self.test
        raise ValueError(f"unknown split '{name}' (expected train, test or traintest)")


def _parse_examples(raw: object, answers: dict[str, int], path: Path, question: str, split: str) -> tuple:
    if not isinstance(raw, list):
        raise InputFileError(f"{path}: task '{question}': '{split}' must be a list of [image_name, answer] pairs")
    examples = []
    for i, pair in enumerate(raw):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise InputFileError(f"{path}: task '{question}': {split}[{i}] = {pair!r}, expected [image_name, answer]")
        image, answer = pair
        if answer not in answers:
            raise InputFileError(
                f"{path}: task '{question}': {split}[{i}] has unknown answer '{answer}' "
                f"(not in the task's answers {sorted(answers)[:10]}...)"
            )
        examples.append((image, answers[answer]))
    return tuple(examples)


def load_task_file(path: str | Path) -> list[Task]:
    """Read and validate a task file; errors name the file, the task and the field."""
    path = Path(path)
    raw = read_json(path, what="Meta-VQA task file")
    if not isinstance(raw, dict):
        raise InputFileError(f"{path}: expected a JSON object {{question: task}}, got {type(raw).__name__}")
    tasks = []
    for question, body in raw.items():
        if not isinstance(body, dict):
            raise InputFileError(f"{path}: task '{question}' must be an object with answers/train/test")
        missing = {"answers", "train", "test"} - set(body)
        if missing:
            raise InputFileError(f"{path}: task '{question}' lacks field(s) {sorted(missing)}")
        answers_list = body["answers"]
        if not isinstance(answers_list, list) or len(answers_list) < 2:
            raise InputFileError(f"{path}: task '{question}': 'answers' must be a list of >= 2 strings")
        answers = {a: i for i, a in enumerate(answers_list)}
        tasks.append(
            Task(
                question=question,
                answers=tuple(answers_list),
                train=_parse_examples(body["train"], answers, path, question, "train"),
                test=_parse_examples(body["test"], answers, path, question, "test"),
            )
        )
    return tasks


def load_prompts(path: str | Path) -> dict[str, str]:
    """question -> declarative template with exactly one '{}' (e.g. 'the bowl is {}')."""
    path = Path(path)
    raw = read_json(path, what="prompt template file")
    for question, template in raw.items():
        if not isinstance(template, str) or template.count("{}") != 1:
            raise InputFileError(f"{path}: template for '{question}' must contain exactly one '{{}}', got {template!r}")
    return raw


def answer_prompt(template: str | None, answer: str) -> str:
    """The text embedded for an answer (spec §2.3/§2.4: underscores become spaces)."""
    return (template or FALLBACK_PROMPT).format(answer.replace("_", " "))


def task_statistics(tasks: Sequence[Task]) -> dict[str, float]:
    """The figures the spec tabulates for the published files (§2.2), for comparing benchmarks."""
    n_answers = [t.n_answers for t in tasks]
    totals = [len(t.train) + len(t.test) for t in tasks]

    def majority(t: Task) -> float:
        counts = [0] * t.n_answers
        for _, label in t.train:
            counts[label] += 1
        best = max(range(t.n_answers), key=counts.__getitem__)
        return sum(1 for _, label in t.test if label == best) / max(len(t.test), 1)

    return {
        "tasks": len(tasks),
        "answers_median": statistics.median(n_answers),
        "answers_mean": statistics.fmean(n_answers),
        "examples_median": statistics.median(totals),
        "examples_mean": statistics.fmean(totals),
        "examples_total": sum(totals),
        "distinct_images": len({img for t in tasks for img, _ in t.train + t.test}),
        "majority_test_accuracy": statistics.fmean(majority(t) for t in tasks),
        "chance_accuracy": statistics.fmean(1 / n for n in n_answers),
    }
