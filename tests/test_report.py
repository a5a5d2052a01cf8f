"""`python -m metadiff.report`: one page of every artifact's metrics and plots (tables, seed aggregates, copied
plots, well-formed HTML, one line per malformed artifact), on artifacts written by the project's own publisher and
on those of a real (one-batch) multirun over seeds."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import run_train
from metadiff.report.__main__ import main, make_report
from metadiff.report.tables import fmt, headline_metrics, main_columns, spread_cell
from metadiff.store import Artifact, publish_artifact

HNET_ACC = {1: (0.606, 0.023), 2: (0.620, 0.021), 3: (0.590, 0.025)}


def _png(path: Path) -> None:
    Image.new("RGB", (6, 4), (200, 30, 30)).save(path)


def publish(
    root: Path,
    stage: str,
    task: str,
    seed: int,
    metrics: dict[str, float],
    pngs: tuple[str, ...] = (),
    lr: float = 0.01,
    upstream: dict[str, Artifact] | None = None,
) -> Artifact:
    """An artifact written by metadiff.store.publish_artifact (the writer every stage uses), from a small config
    with the keys a real one has: a seed, keys that follow it (model.train_seed, upstream_overrides), paths."""
    cfg = OmegaConf.create(
        {
            "task_name": task,
            "stage": stage,
            "seed": seed,
            "tags": [stage],
            "variant": None,
            "upstream_overrides": {"clip_synthvqa": [f"seed={seed}"]},
            "model": {"lr": lr, "train_seed": seed},
            "trainer": {"max_epochs": 2, "default_root_dir": str(root / "logs" / f"{task}-{seed}-{lr}")},
            "paths": {
                "artifacts_dir": str(root / "outputs" / "artifacts"),
                "output_dir": str(root / "logs" / f"{task}-{seed}-{lr}"),
            },
        }
    )
    return publish_artifact(cfg, lambda d: [_png(d / name) for name in pngs], metrics, upstream)


def hnet_metrics(seed: int) -> dict[str, float]:
    acc, ci = HNET_ACC[seed]
    return {
        "test/fewshot_acc": acc,
        "test/fewshot_acc_ci95": ci,
        "test/clip_acc": 0.5,
        "test/clip_acc_ci95": 0.027,
        "test/fewshot_minus_clip": acc - 0.5,
        "test/fewshot_minus_clip_ci95": 0.02,
        "test/n_tasks": 373.0,
        "val/fewshot_acc": acc + 0.01,
        "val/fewshot_acc_ci95": 0.04,
        "sys/peak_rss_mib": 1800.5,
    }


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Artifact]:
    """3 seeds of one hnet task (one with a plot), the same task with another lr, a dfml run (the other family)
    with two plots, and a stage the report does not know."""
    root = tmp_path
    arts = {
        f"hnet{s}": publish(
            root, "hnet", "hnet_synthvqa", s, hnet_metrics(s), pngs=("accuracy_vs_shots.png",) if s == 1 else ()
        )
        for s in HNET_ACC
    }
    arts["hnet_lr"] = publish(root, "hnet", "hnet_synthvqa", 1, hnet_metrics(2), lr=0.1)
    dfml = {
        "test/trained_1shot": 0.575,
        "test/trained_1shot_ci95": 0.008,
        "test/random_init_1shot": 0.343,
        "test/random_init_1shot_ci95": 0.006,
        "test/trained_minus_random_init_1shot": 0.232,
        "test/trained_minus_random_init_1shot_ci95": 0.009,
        "test/gap_closed_1shot": 0.46,
    }
    arts["dfml"] = publish(root, "dfml", "dfml_glyphs", 42, dfml, pngs=("pseudo_round0.png", "accuracy_per_round.png"))
    arts["odd"] = publish(root, "mystage", "mystage_x", 0, {"test/score": 3.5})
    return arts


def md_table(markdown: str, heading: str) -> list[dict[str, str]]:
    """The first table under `heading` as a list of {column: cell}."""
    after = markdown.split(f"\n{heading}\n", 1)[1].splitlines()
    start = next(i for i, ln in enumerate(after) if ln.startswith("|"))
    lines = [ln for ln in itertools.takewhile(lambda ln: ln.startswith("|"), after[start:])]
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines]
    return [dict(zip(cells[0], row, strict=True)) for row in cells[2:]]


def test_tables_show_mean_ci_overrides_and_seed_aggregate(tree: dict[str, Artifact], tmp_path: Path) -> None:
    md_path, _ = make_report([tmp_path / "outputs"], tmp_path / "report")
    markdown = md_path.read_text()
    assert (
        markdown.index("## HyperCLIP / HyperLDM")
        < markdown.index("## Data-free meta-learning")
        < markdown.index("## Other stages")
    )
    rows = md_table(markdown, "### hnet")
    runs = [r for r in rows if not r["run"].startswith("**")]
    # labelled by the one key that differs; model.train_seed and upstream_overrides follow the seed: not shown
    assert [(r["seed"], r["config"]) for r in runs] == [
        ("1", "model.lr=0.01"),
        ("2", "model.lr=0.01"),
        ("3", "model.lr=0.01"),
        ("1", "model.lr=0.1"),
    ]
    assert [r["fewshot_acc"] for r in runs[:3]] == ["0.606 ± 0.023", "0.620 ± 0.021", "0.590 ± 0.025"]
    assert runs[0]["fewshot_minus_clip"] == "+0.106 ± 0.020"  # paired differences are signed
    assert runs[0]["artifact"] == f"`{tree['hnet1'].fingerprint}`"
    (agg,) = [r for r in rows if r["run"].startswith("**")]  # the lr=0.1 run is not one of the seeds
    assert agg["run"] == "**hnet_synthvqa: mean over 3 seeds**" and agg["seed"] == "1, 2, 3"
    values = [a for a, _ in HNET_ACC.values()]
    mean, sd = sum(values) / 3, (sum((v - sum(values) / 3) ** 2 for v in values) / 2) ** 0.5
    assert (round(mean, 4), round(sd, 4)) == (0.6053, 0.0150)  # the sample sd (n - 1), not the population one
    assert agg["fewshot_acc"] == f"{mean:.3f} sd {sd:.3f} [0.590, 0.620]" == "0.605 sd 0.015 [0.590, 0.620]"
    # every other metric in a second table, runs as columns
    more = md_table(markdown, "#### hnet: all other metrics")
    assert {r["metric"] for r in more} >= {"`test/n_tasks`", "`val/fewshot_acc`", "`sys/peak_rss_mib`"}
    val = next(r for r in more if r["metric"] == "`val/fewshot_acc`")
    assert val["hnet_synthvqa (seed 1, model.lr=0.01)"] == "0.616 ± 0.040"
    assert md_table(markdown, "### dfml")[0]["trained_1shot"] == "0.575 ± 0.008"
    assert md_table(markdown, "### mystage")[0]["score"] == "3.500"


def test_spread_is_mean_sample_sd_and_range() -> None:
    values = [0.61, 0.64, 0.70, 0.55]
    cell = spread_cell(values, signed=False)
    assert cell.text == f"{statistics.fmean(values):.3f} sd {statistics.stdev(values):.3f}" == "0.625 sd 0.062"
    assert cell.detail == "[0.550, 0.700]"
    assert fmt(0.000555, signed=True) == "+0.00056" and fmt(12000.0) == "12000" and fmt(-0.0001) == "-0.00010"


def test_headline_columns_are_chosen_from_ci_partners_and_differences() -> None:
    keys = {
        "test/hnet_init",
        "test/hnet_init_ci95",
        "test/cfg_selected",
        "test/cfg_selected_ci95",
        "test/cfg0",
        "test/cfg0_ci95",
        "test/cfg_selected_minus_hnet_init",
        "test/cfg_selected_minus_hnet_init_ci95",
        "test/cfg0_minus_hnet_init",
        "test/cfg0_minus_hnet_init_ci95",
        "test/selected_scale",
        "val/cfg0",
        "val/cfg0_ci95",
        "sys/peak_rss_mib",
    }
    plain, diffs = headline_metrics(keys)
    assert plain == ["test/hnet_init", "test/cfg0", "test/cfg_selected"]  # most compared first, then by name
    assert diffs == ["test/cfg0_minus_hnet_init", "test/cfg_selected_minus_hnet_init"]
    assert headline_metrics({"meta_test/acc", "meta_test/acc_ci95", "train/loss"}) == (["meta_test/acc"], [])
    assert headline_metrics({"val/accuracy", "train/loss"}) == (["val/accuracy"], [])
    assert main_columns([f"p{i}" for i in range(9)], ["d0", "d1", "d2"], 6) == ["p0", "p1", "p2", "p3", "d0", "d1"]
    assert main_columns(["p0"], ["d0", "d1", "d2"], 3) == ["p0", "d0", "d1"]


def test_many_metrics_are_capped_and_the_rest_folded(tmp_path: Path) -> None:
    metrics = {f"test/m{i}": 0.5 + i / 100 for i in range(12)} | {f"test/m{i}_ci95": 0.01 for i in range(12)}
    publish(tmp_path, "clip", "clip_wide", 1, metrics)
    md_path, html_path = make_report([tmp_path / "outputs"], tmp_path / "report", max_columns=5)
    markdown = md_path.read_text()
    assert list(md_table(markdown, "### clip")[0]) == ["run", "seed", "m0", "m1", "m2", "m3", "m4", "artifact"]
    assert [r["metric"] for r in md_table(markdown, "#### clip: all other metrics")] == [
        f"`test/m{i}`" for i in range(5, 12)
    ]
    assert "<details><summary>All other metrics (7)</summary>" in html_path.read_text()


def test_plots_are_copied_and_referenced_relatively(tree: dict[str, Artifact], tmp_path: Path) -> None:
    # a plot the run left in its Hydra run dir belongs to the artifact only while that dir holds this very run
    run_dir = tmp_path / "logs" / "hnet_synthvqa-2-0.01"
    run_dir.mkdir(parents=True)
    shutil.copyfile(tree["hnet2"].path / "config.yaml", run_dir / "resolved_config.yaml")
    _png(run_dir / "accuracy_vs_guidance.png")
    stale = tmp_path / "logs" / "hnet_synthvqa-3-0.01"
    stale.mkdir(parents=True)
    (stale / "resolved_config.yaml").write_text("seed: 99\n")
    _png(stale / "accuracy_vs_guidance.png")

    md_path, html_path = make_report([tmp_path / "outputs"], tmp_path / "report")
    out = tmp_path / "report"
    expected = [
        f"plots/hnet/{tree['hnet1'].path.name}/accuracy_vs_shots.png",
        f"plots/hnet/{tree['hnet2'].path.name}/accuracy_vs_guidance.png",
        f"plots/dfml/{tree['dfml'].path.name}/accuracy_per_round.png",
        f"plots/dfml/{tree['dfml'].path.name}/pseudo_round0.png",
    ]
    copied = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert copied == sorted(expected)
    markdown, page = md_path.read_text(), html_path.read_text()
    for rel in expected:
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({rel})" in markdown and f'src="{rel}"' in page
    # the folder stands alone: moved elsewhere, every image the pages name is still there
    moved = shutil.move(str(out), tmp_path / "moved")
    for rel in re.findall(r'src="([^"]+)"', Path(moved, "report.html").read_text()):
        assert Path(moved, rel).is_file()


class _Checker(HTMLParser):
    VOID = {"meta", "img", "wbr", "br", "link", "hr", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def test_html_is_well_formed(tree: dict[str, Artifact], tmp_path: Path) -> None:
    publish(tmp_path, "clip", 'clip_<b>&"odd"', 1, {"test/acc": 0.5, "test/acc_ci95": 0.1})  # escaped, not markup
    _, html_path = make_report([tmp_path / "outputs"], tmp_path / "report")
    checker = _Checker()
    checker.feed(html_path.read_text())
    checker.close()
    assert not checker.errors and checker.stack == []
    tags = [t for t, _ in checker.tags]
    assert tags[:2] == ["html", "head"] and "b" not in tags
    assert tags.count("section") >= 3 + 4  # 3 families, 4 stages
    ids = [a["id"] for _, a in checker.tags if a.get("id")]
    assert len(ids) == len(set(ids))
    links = [a["href"][1:] for t, a in checker.tags if t == "a" and (a.get("href") or "").startswith("#")]
    assert links and set(links) <= set(ids)


def test_malformed_manifest_is_one_line_naming_the_file(
    tree: dict[str, Artifact], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "outputs" / "artifacts" / "hnet" / "hnet_synthvqa-000000000000"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"stage": "hnet", "metrics": {"test/a"')  # truncated
    wrong = tmp_path / "outputs" / "artifacts" / "clip" / "clip_x-111111111111"
    wrong.mkdir(parents=True)
    (wrong / "manifest.json").write_text(
        json.dumps({"stage": "clip", "task_name": "clip_x", "metrics": {"test/acc": "high"}})
    )
    main([str(tmp_path / "outputs"), "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("warning: skipped ") for line in err)
    (truncated,) = [line for line in err if str(bad / "manifest.json") in line]
    (not_a_number,) = [line for line in err if str(wrong / "manifest.json") in line]
    assert "not valid JSON" in truncated and "metric 'test/acc' is 'high'" in not_a_number
    page = (tmp_path / "report" / "report.md").read_text()
    assert "## Skipped artifacts" in page and len(md_table(page, "### hnet")) == 5  # the good runs are all there

    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "outputs"), "--out", str(tmp_path / "strict"), "--strict"])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and str(wrong / "manifest.json") in line  # the first one met: clip/
    assert not (tmp_path / "strict").exists()


def test_cli_defaults_rerun_and_foreign_plots_dir(
    tree: dict[str, Artifact], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("METADIFF_ROOT", raising=False)
    main([])  # the outputs dir of paths.root_dir = the current directory, as a run writes it
    out = tmp_path / "outputs" / "report"
    assert capsys.readouterr().out.split() == [
        str(Path("outputs/report/report.md")),
        str(Path("outputs/report/report.html")),
    ]
    main([])  # a rerun replaces the report in place and leaves no temporary files
    assert sorted(p.name for p in out.iterdir()) == ["plots", "report.html", "report.md"]
    monkeypatch.setenv("METADIFF_ROOT", str(tmp_path))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    main([])
    assert str(out / "report.html") in capsys.readouterr().out
    foreign = tmp_path / "mine"
    (foreign / "plots").mkdir(parents=True)
    (foreign / "plots" / "keep.png").write_bytes(b"x")
    with pytest.raises(SystemExit) as stop:
        main(["--out", str(foreign)])
    assert stop.value.code == 2 and "refusing to replace" in capsys.readouterr().err
    assert (foreign / "plots" / "keep.png").exists()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nothing-here")])
    assert "no artifacts under" in capsys.readouterr().err


def test_report_of_a_real_multirun_over_seeds(cache_root: Path, tmp_path: Path) -> None:
    """The report of the suite's one-batch CLIP sweep (tests/test_run.py: `-m seed=1,2`), under its own task name so
    that no other test republishes these artifacts while they are copied: two runs that differ only in their seed
    (and the keys that follow it) make one aggregate row, with no config column."""
    proc = run_train(
        [
            "-m",
            "experiment=clip_synthvqa",
            "debug=fdr",
            "seed=1,2",
            "task_name=report_clip",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        cache_root,
    )
    written = [Path(p) for p in re.findall(r"artifact written: (\S+)", proc.stdout + proc.stderr)]
    assert len(written) == 2 and {p.parent.name for p in written} == {"clip"}
    for path in written:  # only these two, not everything the session's cache holds
        shutil.copytree(
            path, tmp_path / "outputs" / "artifacts" / "clip" / path.name, ignore=shutil.ignore_patterns("*.pt")
        )
    md_path, html_path = make_report([tmp_path / "outputs"], tmp_path / "report")
    rows = md_table(md_path.read_text(), "### clip")
    assert [r["seed"] for r in rows] == ["1", "2", "1, 2"] and "config" not in rows[0]
    assert rows[2]["run"] == "**report_clip: mean over 2 seeds**"
    assert all(re.fullmatch(r"\d\.\d{3} ± \d\.\d{3}", r["zeroshot_acc"]) for r in rows[:2])
    assert re.fullmatch(r"\d\.\d{3} sd \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", rows[2]["zeroshot_acc"])
    checker = _Checker()
    checker.feed(html_path.read_text())
    assert not checker.errors and checker.stack == []
