"""Meta-VQA: VQA v2 questions as few-shot tasks (task = question, classes = its answers)."""

from metadiff.data.meta_vqa.tasks import Task, answer_prompt, load_prompts, load_task_file, task_statistics

__all__ = ["Task", "answer_prompt", "load_prompts", "load_task_file", "task_statistics"]
