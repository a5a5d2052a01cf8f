"""CLIP zero-shot answering: score each image against the answer prompts of its task (spec §3.1 with W2=b2=0)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from metadiff.data.meta_vqa.tasks import Task


def per_task_accuracy(
    tasks: Sequence[Task],
    image_embeddings: torch.Tensor,
    image_row: Mapping[str, int],
    answer_embeddings: Sequence[torch.Tensor],
    split: str = "test",
) -> torch.Tensor:
    """Accuracy per task of argmax_a cos(image, prompt_a) against the label, on the task's `split`."""
    images = F.normalize(image_embeddings.float(), dim=-1)
    accs = []
    for task, answers in zip(tasks, answer_embeddings, strict=True):
        examples = task.split(split)
        rows = torch.tensor([image_row[name] for name, _ in examples])
        labels = torch.tensor([label for _, label in examples])
        logits = images[rows] @ F.normalize(answers.float(), dim=-1).T
        accs.append((logits.argmax(-1) == labels).float().mean())
    return torch.stack(accs)


@torch.no_grad()
def encode_texts(
    encode: Callable[[torch.Tensor], torch.Tensor],
    tokenize: Callable,
    texts: Sequence[str],
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Encode many texts in batches (the prompt set of all tasks at once)."""
    out = [
        encode(tokenize(list(texts[i : i + batch_size])).to(device)).float() for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(out)


def split_by_task(flat: torch.Tensor, counts: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.split(flat, list(counts)))
