"""The real Meta-VQA: builder rules on a self-written VQA v2 tree, the published-file reader, views, task batches,
and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from metadiff.data.meta_vqa.__main__ import configured_rules
from metadiff.data.meta_vqa.batches import TaskEpisodes, collate_tasks
from metadiff.data.meta_vqa.build import build_meta_vqa
from metadiff.data.meta_vqa.source import MetaVQASource
from metadiff.data.meta_vqa.tasks import Task, load_task_file, task_statistics
from metadiff.data.meta_vqa.views import n_shot, split_random_disjoint, task_view
from metadiff.errors import InputFileError, MissingInputError, UserError
from metadiff.features.store import FeatureStoreBuilder, build_index

AUTHORS = REPO.parent / "shared" / "data" / "meta-vqa-authors"


@pytest.fixture(scope="module")
def built(vqa_tree: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("meta_vqa")
    rules, files = configured_rules()
    build_meta_vqa(vqa_tree["vqa_dir"], out, rules, files, progress=False)
    return out


def _all_tasks(root: Path) -> dict[str, Task]:
    return {t.question: t for split in ("meta_train", "meta_test") for t in load_task_file(root / f"{split}.json")}


def test_builder_applies_the_papers_rules(built: Path) -> None:
    tasks = _all_tasks(built)
    # 'or' questions, yes/no questions and questions with <= 20 examples are not tasks
    assert set(tasks) == {"What color is the shape?", "How many shapes are there?", "What shape is it?"}
    shape = tasks["What shape is it?"]
    # answers in order of first appearance; 'star' (1 image) dropped; image 1's second answer 'hexagon' ignored
    assert shape.answers == ("square", "triangle", "circle")
    images = [name for name, _ in shape.train + shape.test]
    assert len(images) == len(set(images)) == 39 and images.count("COCO_train2014_000000000001") == 1
    for task in tasks.values():
        for label in range(task.n_answers):
            n_train = sum(1 for _, y in task.train if y == label)
            n = n_train + sum(1 for _, y in task.test if y == label)
            assert n_train == round(0.7 * n) and n - n_train >= 1
    # 3 tasks -> round(2.1) = 2 meta-train, 1 meta-test
    assert [len(load_task_file(built / f"{s}.json")) for s in ("meta_train", "meta_test")] == [2, 1]


def test_builder_is_deterministic_and_counts_match(built: Path, vqa_tree: dict, tmp_path: Path) -> None:
    rules, files = configured_rules()
    build_meta_vqa(vqa_tree["vqa_dir"], tmp_path, rules, files, progress=False)
    for name in ("meta_train.json", "meta_test.json", "ques_ans_count.json"):
        assert (tmp_path / name).read_bytes() == (built / name).read_bytes(), name
    counts = json.loads((built / "ques_ans_count.json").read_text())
    for question, task in _all_tasks(built).items():
        assert list(counts[question]) == list(task.answers)
        assert sum(counts[question].values()) == len(task.train) + len(task.test)


def test_reader_loads_the_authors_published_files() -> None:
    if not AUTHORS.is_dir():
        pytest.fail(f"the authors' Meta-VQA files are expected beside the repo in {AUTHORS}")
    train = task_statistics(load_task_file(AUTHORS / "meta_train.json"))
    test = task_statistics(load_task_file(AUTHORS / "meta_test.json"))
    assert (train["tasks"], test["tasks"]) == (870, 373)
    assert (train["examples_total"], test["examples_total"]) == (74512, 29600)
    assert train["answers_median"] == test["answers_median"] == 7
    out = subprocess.run(
        [sys.executable, "-m", "metadiff.data.meta_vqa", "stats", str(AUTHORS)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "tasks" in out and "870.000" in out and "373.000" in out


def test_build_command_writes_files_and_reports(vqa_tree: dict, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "metadiff.data.meta_vqa",
            "build",
            "--vqa-dir",
            str(vqa_tree["vqa_dir"]),
            "--out",
            str(tmp_path / "mv"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "built 3 tasks (2 meta-train, 1 meta-test)" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "mv").iterdir()) == [
        "meta_test.json",
        "meta_train.json",
        "ques_ans_count.json",
    ]


# ---- bad input: one line naming the file and what was expected ------------------------------------------------


def _copy_tree(vqa_tree: dict, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(vqa_tree["vqa_dir"], tmp_path / "VQA")
    return tmp_path / "VQA"


def _cli_error(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "metadiff.data.meta_vqa", *args], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_vqa_file_is_named(vqa_tree: dict, tmp_path: Path) -> None:
    vqa = _copy_tree(vqa_tree, tmp_path)
    (vqa / "Annotations" / "v2_mscoco_val2014_annotations.json").unlink()
    line = _cli_error(["build", "--vqa-dir", str(vqa), "--out", str(tmp_path / "out")])
    assert "v2_mscoco_val2014_annotations.json" in line and "not found" in line and "val2014" in line
    assert not (tmp_path / "out").exists(), "a failed build left an output folder behind"


def test_truncated_json_is_named(vqa_tree: dict, tmp_path: Path) -> None:
    vqa = _copy_tree(vqa_tree, tmp_path)
    path = vqa / "Questions" / "v2_OpenEnded_mscoco_train2014_questions.json"
    path.write_text(path.read_text()[:500])
    line = _cli_error(["build", "--vqa-dir", str(vqa), "--out", str(tmp_path / "out")])
    assert str(path) in line and "not valid JSON" in line


def test_missing_field_is_named(vqa_tree: dict, tmp_path: Path) -> None:
    vqa = _copy_tree(vqa_tree, tmp_path)
    path = vqa / "Annotations" / "v2_mscoco_train2014_annotations.json"
    raw = json.loads(path.read_text())
    del raw["annotations"][3]["multiple_choice_answer"]
    path.write_text(json.dumps(raw))
    line = _cli_error(["build", "--vqa-dir", str(vqa), "--out", str(tmp_path / "out")])
    assert "annotations[3] lacks field(s) ['multiple_choice_answer']" in line and str(path) in line


def test_unknown_answer_in_task_file_is_named(built: Path, tmp_path: Path) -> None:
    raw = json.loads((built / "meta_test.json").read_text())
    question = next(iter(raw))
    raw[question]["test"][0][1] = "purple-ish"
    (tmp_path / "meta_test.json").write_text(json.dumps(raw))
    (tmp_path / "meta_train.json").write_text((built / "meta_train.json").read_text())
    with pytest.raises(InputFileError, match=r"meta_test.json: task '.*': test\[0\] has unknown answer 'purple-ish'"):
        load_task_file(tmp_path / "meta_test.json")
    line = _cli_error(["stats", str(tmp_path)])
    assert "unknown answer 'purple-ish'" in line


def test_missing_image_is_named(vqa_tree: dict, built: Path, tmp_path: Path) -> None:
    import shutil

    coco = tmp_path / "coco"
    shutil.copytree(vqa_tree["coco_dir"], coco)
    gone = coco / "val2014" / "COCO_val2014_000000000103.jpg"
    gone.unlink()
    source = MetaVQASource(image_dir=str(coco), task_dir=str(built), meta_val={"fraction": 0.0, "seed": 0})
    with pytest.raises(MissingInputError, match=r"1 COCO image\(s\) .* missing .*COCO_val2014_000000000103.jpg"):
        source.prepare()


def test_source_needs_tasks_or_vqa(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="task_dir .* or vqa_dir"):
        MetaVQASource(image_dir=str(tmp_path), meta_val={"fraction": 0.0, "seed": 0})


# ---- views, n-shot, task batches ------------------------------------------------------------------------------


def _task(n_per_answer: tuple[int, ...] = (6, 3, 1)) -> Task:
    examples = [(f"img{a}_{i}", a) for a, n in enumerate(n_per_answer) for i in range(n)]
    train = tuple(ex for ex in examples if int(ex[0].split("_")[1]) % 3 != 2)
    test = tuple(ex for ex in examples if int(ex[0].split("_")[1]) % 3 == 2)
    return Task("q?", tuple(f"a{i}" for i in range(len(n_per_answer))), train, test)


def test_views_have_the_documented_sizes() -> None:
    task = _task()
    n = len(task.train) + len(task.test)
    assert task_view(task, "train") == list(task.train) and task_view(task, "traintest") == list(task.train + task.test)
    sizes = {len(task_view(task, "random", np.random.default_rng(s))) for s in range(200)}
    assert min(sizes) >= math.ceil(n * 2 / 3) and max(sizes) <= n and len(sizes) > 1
    half = task_view(task, "random50", np.random.default_rng(0))
    assert len(half) == math.ceil(n / 2) and len(set(half)) == len(half)
    a = task_view(task, "random", np.random.default_rng(3))
    assert a == task_view(task, "random", np.random.default_rng(3))
    assert task_view(task, "train", data_idx=[0, n - 1]) == [task.train[0], task.test[-1]]
    with pytest.raises(ValueError, match="unknown task view 'rnd'"):
        task_view(task, "rnd", np.random.default_rng(0))


def test_n_shot_is_per_answer_and_seeded() -> None:
    task = _task()
    both = list(task.train + task.test)
    two = n_shot(both, task.n_answers, 2, seed=42)
    assert [sum(1 for _, y in two if y == a) for a in range(3)] == [2, 2, 1]  # answer 2 has a single example
    assert n_shot(both, task.n_answers, None) == both
    seeds = {tuple(n_shot(both, task.n_answers, 2, seed=s)) for s in range(10)}
    assert len(seeds) > 1


def test_disjoint_random_split() -> None:
    task = _task((9, 6))
    support, query = split_random_disjoint(task, np.random.default_rng(0))
    assert not set(support) & set(query) and len(query) == 10 and len(support) == 5


def test_task_batches_pad_and_mask(tmp_path: Path) -> None:
    tasks = [_task((6, 3, 1)), Task("p?", ("x", "y"), (("img0_0", 0), ("img1_0", 1)), (("img0_1", 0),))]
    images = sorted({n for t in tasks for n, _ in t.train + t.test})
    index = build_index(images, ["q?", "p?"], {"q?": ["a0", "a1", "a2"], "p?": ["x", "y"]})
    builder = FeatureStoreBuilder(tmp_path / "store", 3, index, "fp")
    builder.write("image", np.arange(len(images)), np.arange(len(images) * 3, dtype=np.float32).reshape(-1, 3))
    builder.write("question", np.arange(2), np.ones((2, 3), np.float32))
    builder.write("answer", np.arange(5), np.zeros((5, 3), np.float32))
    store = builder.commit("fp", {}, {})
    episodes = TaskEpisodes(tasks, store, support_view="train", query_view="test")
    batch = collate_tasks([episodes[0], episodes[1]])
    assert batch.support_x.shape == (2, len(tasks[0].train), 3) and batch.answers.shape == (2, 3, 3)
    assert batch.support_mask.sum(1).tolist() == [len(tasks[0].train), 2]
    assert batch.answer_mask.tolist() == [[True, True, True], [True, True, False]]
    row = index.image["img1_0"]
    k = [n for n, _ in tasks[1].train].index("img1_0")
    assert torch.equal(batch.support_x[1, k], torch.arange(row * 3, row * 3 + 3, dtype=torch.float32))
    assert batch.support_y[1].tolist()[:2] == [0, 1]
