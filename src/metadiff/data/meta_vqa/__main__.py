"""Meta-VQA from the command line.

    python -m metadiff.data.meta_vqa build --vqa-dir /data/VQA --out /data/meta_vqa   # VQA v2 -> task files
    python -m metadiff.data.meta_vqa stats /data/meta_vqa                             # tasks, answers, examples

`build` uses the construction rules of conf/data/meta_vqa.yaml (the paper's), so the command and
`python train.py experiment=features_vqa` build the same files. Bad input exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import cast

from omegaconf import OmegaConf

from metadiff.config import ConfigError
from metadiff.config.paths import CONF_DIR
from metadiff.data.meta_vqa.build import MetaVQARules, VQAFiles, build_meta_vqa
from metadiff.data.meta_vqa.tasks import load_task_file, task_statistics
from metadiff.data.sources import TASK_FILE_SPLITS, MetaValSplit, dataclass_from_config
from metadiff.errors import UserError
from metadiff.utils.io import atomic_dir


def configured_rules() -> tuple[MetaVQARules, VQAFiles]:
    """The rules and file layout from conf/data/meta_vqa.yaml (the single place they are set)."""
    source = OmegaConf.load(CONF_DIR / "data" / "meta_vqa.yaml").source
    # both nodes are mappings in that file, so their containers are dicts
    return (
        dataclass_from_config(MetaVQARules, cast(dict, OmegaConf.to_container(source.rules)), "data.source.rules"),
        dataclass_from_config(VQAFiles, cast(dict, OmegaConf.to_container(source.vqa_files)), "data.source.vqa_files"),
    )


def print_stats(task_dir: Path) -> None:
    keys = (
        "tasks",
        "answers_median",
        "answers_mean",
        "examples_median",
        "examples_mean",
        "examples_total",
        "distinct_images",
        "majority_test_accuracy",
        "chance_accuracy",
    )
    files = {split: load_task_file(task_dir / f"{split}.json") for split in TASK_FILE_SPLITS}
    stats = {split: task_statistics(tasks) for split, tasks in files.items()}
    print(f"{'':24s} {'meta_train':>12s} {'meta_test':>12s}")
    for key in keys:
        print(f"{key:24s} {stats['meta_train'][key]:12.3f} {stats['meta_test'][key]:12.3f}")
    # the split the runs make of these files (conf/data/meta_vqa.yaml source.meta_val)
    meta_val = MetaValSplit.from_config(OmegaConf.load(CONF_DIR / "data" / "meta_vqa.yaml").source.meta_val)
    try:
        train, val = meta_val.carve(files["meta_train"])
    except ConfigError as err:  # too few meta-train tasks for a meta-val split: the statistics above still hold
        print(f"meta-val: {err}")
        return
    print(
        f"meta-val (conf/data/meta_vqa.yaml source.meta_val {meta_val.describe()}): {len(val)} of the "
        f"{len(files['meta_train'])} meta-train tasks, leaving {len(train)} for meta-training"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m metadiff.data.meta_vqa",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build meta_train/meta_test/ques_ans_count JSON from VQA v2")
    build.add_argument("--vqa-dir", type=Path, required=True, help="folder with Questions/ and Annotations/")
    build.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    stats = sub.add_parser("stats", help="tasks, answers and examples of a folder of Meta-VQA task files")
    stats.add_argument("task_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            rules, files = configured_rules()
            with atomic_dir(args.out, overwrite=True) as tmp:
                summary = build_meta_vqa(args.vqa_dir, tmp, rules, files)
            print(
                f"built {summary['tasks']} tasks ({summary['meta_train']} meta-train, {summary['meta_test']} "
                f"meta-test) from {summary['questions']} questions into {args.out}"
            )
            print_stats(args.out)
        else:
            print_stats(args.task_dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
