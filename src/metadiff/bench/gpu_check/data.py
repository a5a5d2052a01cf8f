"""Generated data in the real formats, so the real readers run on it: a VQA v2 + COCO tree (official question and
annotation JSON, COCO-named JPEGs of COCO's size) and miniImageNet's pickled distribution (`mini-imagenet-cache-*.pkl`,
84 x 84 uint8). The content is random: the check times and sizes things, it never learns from them."""

from __future__ import annotations

import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from metadiff.bench.gpu_check.config import VQASize


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth colour field with noise: decodes like a photo (pure noise would make an unusually large JPEG)."""
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    base = rng.uniform(0, 255, (3, 3))
    image = sum(base[:, k, None, None] * f for k, f in enumerate((xx, yy, 1 - xx)))
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(image)


def write_vqa_tree(
    root: Path, size: VQASize, splits: list[str], files: dict[str, str], seed: int = 0
) -> dict[str, Path]:
    """`root/VQA` (files[questions|annotations] per split, the official layout) and `root/coco/<split>/` JPEGs.

    Question q is asked of `images_per_question` consecutive images (cyclically) with `answers_per_question`
    answers in turn, each answer on >= 2 images, all of answer type `other`: every question passes the Meta-VQA
    rules when it has more examples than their `min_task_examples`."""
    if size.images_per_question > size.images or size.images_per_question < 2 * size.answers_per_question:
        raise ValueError(
            f"gpu_check vqa: images_per_question={size.images_per_question} must be <= images="
            f"{size.images} and >= 2 x answers_per_question={size.answers_per_question}"
        )
    width, height = size.image_size
    vqa, coco = root / "VQA", root / "coco"
    images = [(splits[i % len(splits)], i + 1) for i in range(size.images)]  # (split, image_id)
    for split in splits:
        (coco / split).mkdir(parents=True, exist_ok=True)

    def write(image: tuple[str, int]) -> None:  # its own generator: the same pixels whichever thread writes it
        split, image_id = image
        rng = np.random.default_rng([seed, image_id])
        photo_like(rng, width, height).save(coco / split / f"COCO_{split}_{image_id:012d}.jpg", quality=90)

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # JPEG encoding releases the GIL
        list(pool.map(write, images))
    questions: dict[str, list[dict]] = {s: [] for s in splits}
    annotations: dict[str, list[dict]] = {s: [] for s in splits}
    for q in range(size.questions):
        text = f"What is the kind of thing number {q}?"
        for k in range(size.images_per_question):
            split, image_id = images[(q * size.images_per_question + k) % size.images]
            qid = len(questions[split]) + 1 + 10**7 * splits.index(split)
            answer = f"kind {k % size.answers_per_question}"
            questions[split].append({"image_id": image_id, "question": text, "question_id": qid})
            annotations[split].append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "answer_type": "other",
                    "multiple_choice_answer": answer,
                    "question_type": "what is the",
                    "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": 1}],
                }
            )
    for split in splits:
        for key, records, template in (
            ("questions", questions[split], files["questions"]),
            ("annotations", annotations[split], files["annotations"]),
        ):
            path = vqa / template.format(split=split)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"data_subtype": split, key: records}))
    return {"vqa_dir": vqa, "coco_dir": coco}


def write_miniimagenet(
    root: Path, file_name: str, n_classes: int, per_class: int, side: int = 84, seed: int = 0
) -> Path:
    """One split of miniImageNet in the `cache` schema ({image_data uint8 [N, side, side, 3], class_dict})."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_classes * per_class, side, side, 3), dtype=np.uint8)
    classes = {f"n{c:08d}": list(range(c * per_class, (c + 1) * per_class)) for c in range(n_classes)}
    root.mkdir(parents=True, exist_ok=True)
    path = root / file_name
    with open(path, "wb") as f:
        pickle.dump({"image_data": images, "class_dict": classes}, f)
    return path
