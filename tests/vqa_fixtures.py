"""A tiny VQA v2 + COCO tree in the official layout, written by the tests themselves (no real data needed).

Images are COCO-named JPEGs of one coloured shape; questions follow the VQA v2 JSON schema. The content is chosen
so the Meta-VQA rules have something to accept and something to reject:
- "What color is the shape?"  (other)  -> task, 4 answers by colour;
- "How many shapes are there?" (number) -> task, 3 answers;
- "What shape is it?"          (other)  -> task, but one answer has a single image (dropped) and one image repeats;
- "Is the shape red or blue?"  (other)  -> rejected: contains the word 'or';
- "Is there a shape?"          (yes/no) -> rejected: yes/no answer type;
- "What is the rare thing?"    (other)  -> rejected: too few examples.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}
SPLITS = {"train2014": range(1, 31), "val2014": range(101, 111)}  # 40 images


def _image_attrs(image_id: int) -> tuple[str, str, int]:
    color = list(COLORS)[image_id % 4]
    shape = ("circle", "square", "triangle")[image_id % 3]
    count = 1 + image_id % 3
    return color, shape, count


def write_image(path: Path, image_id: int, size: tuple[int, int] = (64, 48)) -> None:
    color, shape, count = _image_attrs(image_id)
    image = Image.new("RGB", size, (200, 200, 200))
    draw = ImageDraw.Draw(image)
    for k in range(count):
        x0, y0 = 4 + 18 * k, 12
        box = (x0, y0, x0 + 14, y0 + 14)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(x0, y0 + 14), (x0 + 7, y0), (x0 + 14, y0 + 14)], fill=COLORS[color])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)


def write_vqa_tree(root: Path) -> dict[str, Path]:
    """Write `root/VQA/{Questions,Annotations}` and `root/coco/{train2014,val2014}`; return the paths."""
    vqa, coco = root / "VQA", root / "coco"
    questions: list[dict] = []
    annotations: list[dict] = []

    def ask(image_id: int, question: str, answer: str, answer_type: str) -> None:
        qid = 1 + len(questions) + 1000 * len(json_written)
        questions.append({"image_id": image_id, "question": question, "question_id": qid})
        annotations.append(
            {
                "question_id": qid,
                "image_id": image_id,
                "answer_type": answer_type,
                "multiple_choice_answer": answer,
                "question_type": "what",
                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": 1}],
            }
        )

    json_written: list[str] = []
    for split, ids in SPLITS.items():
        questions.clear()
        annotations.clear()
        for image_id in ids:
            write_image(coco / split / f"COCO_{split}_{image_id:012d}.jpg", image_id)
            color, shape, count = _image_attrs(image_id)
            ask(image_id, "What color is the shape?", color, "other")
            ask(image_id, "How many shapes are there?", str(count), "number")
            # 'star' appears once (dropped answer); image 1 is asked twice (second ignored)
            ask(image_id, "What shape is it?", "star" if image_id == 5 else shape, "other")
            if image_id == 1:
                ask(image_id, "What shape is it?", "hexagon", "other")
            ask(image_id, "Is the shape red or blue?", "red" if color == "red" else "blue", "other")
            ask(image_id, "Is there a shape?", "yes", "yes/no")
            if image_id % 10 == 0:
                ask(image_id, "What is the rare thing?", color, "other")
        (vqa / "Questions").mkdir(parents=True, exist_ok=True)
        (vqa / "Annotations").mkdir(parents=True, exist_ok=True)
        (vqa / "Questions" / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(
            json.dumps({"data_subtype": split, "questions": questions})
        )
        (vqa / "Annotations" / f"v2_mscoco_{split}_annotations.json").write_text(
            json.dumps({"data_subtype": split, "annotations": annotations})
        )
        json_written.append(split)
    prompts = root / "prompt_meta.json"
    prompts.write_text(
        json.dumps({"What color is the shape?": "the shape is {}", "How many shapes are there?": "there are {} shapes"})
    )
    return {"vqa_dir": vqa, "coco_dir": coco, "prompts": prompts}
