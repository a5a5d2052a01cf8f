"""Build Meta-VQA task files from the official VQA v2 files, with the rules of the paper's data (spec §2.1).

Per split (train2014, then val2014): keep `number`/`other` answer types, group question ids by the exact question
string (file order). Per question: label = `multiple_choice_answer`, one example per image (first wins), answers
in order of first appearance, answers with < `min_images_per_answer` images dropped; a question is a task iff it
keeps > `min_task_examples` examples and > 1 answer and has no whitespace token `or`. Per answer a fresh
`random.Random(seed)` shuffles its examples and `round(train_fraction * n)` go to `train`; a `random.Random(seed)`
shuffle of the task list puts the first `round(meta_train_fraction * N)` tasks in meta-train.

Written by hand: no library implements this selection, and matching the published split needs these exact rules.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from metadiff.errors import InputFileError, MissingInputError
from metadiff.utils.io import read_json, write_json

TASK_FILES = ("meta_train.json", "meta_test.json", "ques_ans_count.json")


class VQAFileError(InputFileError):
    """A VQA v2 file is missing, truncated or lacks a field the builder needs."""


@dataclass(frozen=True)
class MetaVQARules:
    """The construction rules; the defaults (in conf/data/meta_vqa.yaml) are the paper's."""

    splits: tuple[str, ...] = ("train2014", "val2014")
    answer_types: tuple[str, ...] = ("number", "other")
    min_images_per_answer: int = 2
    min_task_examples: int = 20  # a task needs strictly more examples than this
    min_answers: int = 2
    excluded_words: tuple[str, ...] = ("or",)
    train_fraction: float = 0.7
    meta_train_fraction: float = 0.7
    seed: int = 2021
    image_name: str = "COCO_{split}_{image_id:012d}"

    def __post_init__(self) -> None:
        for name in ("splits", "answer_types", "excluded_words"):  # a config's lists: the same (hashable) rules
            object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass(frozen=True)
class VQAFiles:
    """Where the official files are, relative to the VQA root (the layout of the official VQA API)."""

    questions: str = "Questions/v2_OpenEnded_mscoco_{split}_questions.json"
    annotations: str = "Annotations/v2_mscoco_{split}_annotations.json"


def _records(path: Path, key: str, fields: Sequence[str], what: str) -> list[dict[str, Any]]:
    """The `key` list of an official VQA JSON file, each record checked for the fields the builder reads."""
    raw = read_json(path, what=what)  # missing/truncated files: a one-line error naming the file
    if not isinstance(raw, dict) or not isinstance(raw.get(key), list):
        raise VQAFileError(f"{path}: expected a JSON object with a '{key}' list ({what})")
    records = raw[key]
    for i, record in enumerate(records):
        missing = [f for f in fields if not isinstance(record, dict) or f not in record]
        if missing:
            raise VQAFileError(f"{path}: {key}[{i}] lacks field(s) {missing} ({what})")
    return records


def load_vqa_split(vqa_dir: Path, split: str, files: VQAFiles) -> tuple[list[dict], dict[int, str]]:
    """The annotations (in file order) and question_id -> question string of one split."""
    q_path = vqa_dir / files.questions.format(split=split)
    a_path = vqa_dir / files.annotations.format(split=split)
    questions = _records(
        q_path, "questions", ("question_id", "question", "image_id"), f"VQA v2 questions file for split '{split}'"
    )
    annotations = _records(
        a_path,
        "annotations",
        ("question_id", "image_id", "answer_type", "multiple_choice_answer"),
        f"VQA v2 annotations file for split '{split}'",
    )
    text = {int(q["question_id"]): str(q["question"]) for q in questions}
    unknown = [a["question_id"] for a in annotations if int(a["question_id"]) not in text]
    if unknown:
        raise VQAFileError(f"{a_path}: {len(unknown)} annotations have no question in {q_path} (e.g. {unknown[0]})")
    return annotations, text


def group_questions(
    splits: Iterable[tuple[str, list[dict], dict[int, str]]], rules: MetaVQARules
) -> dict[str, list[tuple[str, int, str, int]]]:
    """question -> [(split, image_id, answer, question_id)] in file order, train split first (steps 1-2)."""
    groups: dict[str, list[tuple[str, int, str, int]]] = {}
    for split, records, text in splits:
        for ann in records:
            if ann["answer_type"] in rules.answer_types:
                qid = int(ann["question_id"])
                groups.setdefault(text[qid], []).append(
                    (split, int(ann["image_id"]), str(ann["multiple_choice_answer"]), qid)
                )
    return groups


def select_task(
    question: str, examples: Sequence[tuple[str, int, str, int]], rules: MetaVQARules
) -> dict[str, list[str]] | None:
    """answer -> image names (first appearance order), or None if the question is not a task (steps 3-5)."""
    seen: set[str] = set()
    by_answer: dict[str, list[str]] = {}
    for split, image_id, answer, _ in examples:
        image = rules.image_name.format(split=split, image_id=image_id)
        if image in seen:
            continue
        seen.add(image)
        by_answer.setdefault(answer, []).append(image)
    kept = {a: imgs for a, imgs in by_answer.items() if len(imgs) >= rules.min_images_per_answer}
    count = sum(len(imgs) for imgs in kept.values())
    words = question.split()
    if (
        count > rules.min_task_examples
        and len(kept) >= rules.min_answers
        and not set(words) & set(rules.excluded_words)
    ):
        return kept
    return None


def split_task(kept: Mapping[str, list[str]], rules: MetaVQARules) -> dict[str, list]:
    """Per-answer train/test split with a fresh RNG per answer (step 6); Python's round() as the original."""
    train, test = [], []
    for answer, images in kept.items():
        shuffled = list(images)
        random.Random(rules.seed).shuffle(shuffled)
        n_train = round(rules.train_fraction * len(shuffled))
        train += [[img, answer] for img in shuffled[:n_train]]
        test += [[img, answer] for img in shuffled[n_train:]]
    return {"answers": list(kept), "train": train, "test": test}


def build_meta_vqa(
    vqa_dir: str | Path,
    out_dir: str | Path,
    rules: MetaVQARules = MetaVQARules(),
    files: VQAFiles = VQAFiles(),
    progress: bool = True,
) -> dict[str, int]:
    """Read the VQA v2 files under `vqa_dir`, write meta_train/meta_test/ques_ans_count JSON into `out_dir`."""
    vqa_dir, out_dir = Path(vqa_dir), Path(out_dir)
    for split in rules.splits:  # all files first: a missing one is reported before minutes of reading
        for template, what in ((files.questions, "questions"), (files.annotations, "annotations")):
            path = vqa_dir / template.format(split=split)
            if not path.is_file():
                raise MissingInputError(
                    f"VQA v2 {what} file for split '{split}' not found: {path} "
                    "(expected the official layout, see conf/data/meta_vqa.yaml vqa_files)"
                )
    splits = []
    for split in tqdm(rules.splits, desc="reading VQA v2", disable=not progress):
        annotations, text = load_vqa_split(vqa_dir, split, files)
        splits.append((split, annotations, text))
    groups = group_questions(splits, rules)
    tasks: dict[str, dict[str, list]] = {}
    for question, examples in tqdm(groups.items(), desc="selecting tasks", disable=not progress):
        kept = select_task(question, examples, rules)
        if kept is not None:
            tasks[question] = split_task(kept, rules)
    if len(tasks) < 2:
        raise VQAFileError(f"{vqa_dir}: only {len(tasks)} question(s) pass the Meta-VQA rules; need at least 2 tasks")
    order = list(tasks)
    random.Random(rules.seed).shuffle(order)
    n_train = round(rules.meta_train_fraction * len(order))
    meta = {"meta_train.json": order[:n_train], "meta_test.json": order[n_train:]}
    for name, questions in meta.items():
        write_json(out_dir / name, {q: tasks[q] for q in questions}, sort_keys=False)
    counts = {
        q: {a: sum(1 for _, x in t["train"] + t["test"] if x == a) for a in t["answers"]} for q, t in tasks.items()
    }
    write_json(out_dir / "ques_ans_count.json", counts, sort_keys=False)
    return {"questions": len(groups), "tasks": len(tasks), "meta_train": n_train, "meta_test": len(order) - n_train}
