"""The artifact store and the pipeline's find-or-build: fingerprints that ignore where outputs live, relative
manifests, the real `build_once` shared by processes, nested builds that give back process-wide state, and a real
chain reused as it is after its outputs tree is copied under another root."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from build_helpers import build_and_hang, build_slowly, publish
from conftest import compose_config, run_train
from metadiff.data.meta_vqa.datamodule import upstream_store_dir
from metadiff.pipeline import UpstreamMissingError, compose_upstream, find_or_build, resolve_upstreams
from metadiff.store import (
    Artifact,
    artifact_dir,
    config_fingerprint,
    find_artifact,
    load_artifact,
    publish_artifact,
)
from metadiff.utils.io import atomic_dir, build_once
from metadiff.utils.process_state import preserved_process_state
from metadiff.utils.ranks import RANK_VARIABLES, launched_as_follower_rank


# ------------------------------------------------------------------------------------------------- fingerprints
def _composed(tmp_path: Path, root: str, *overrides: str) -> DictConfig:
    return compose_config(list(overrides), tmp_path / root, tmp_path / root / "outputs" / "logs" / "run")


@pytest.mark.parametrize("experiment", ["features_synthvqa", "adaptation_synthvqa"])
def test_same_config_under_another_root_has_the_same_fingerprint(tmp_path: Path, experiment: str) -> None:
    a, b = (_composed(tmp_path, root, f"experiment={experiment}") for root in ("a", "b"))
    # values that interpolate paths.* differ once resolved (store_dir, cache_dir, work_dir): not what is hashed
    resolved = [OmegaConf.to_container(c.model, resolve=True) for c in (a, b)]
    assert resolved[0] != resolved[1]
    assert config_fingerprint(a) == config_fingerprint(b)
    assert artifact_dir(a).relative_to(a.paths.artifacts_dir) == artifact_dir(b).relative_to(b.paths.artifacts_dir)


def test_a_changed_value_changes_the_fingerprint(tmp_path: Path) -> None:
    base = _composed(tmp_path, "a", "experiment=features_synthvqa")
    other = _composed(tmp_path, "a", "experiment=features_synthvqa", "data.batch_size=256")
    assert config_fingerprint(base) != config_fingerprint(other)


def test_excluded_keys_do_not_change_the_fingerprint(tmp_path: Path) -> None:
    cfg = _composed(tmp_path, "a", "experiment=clip_synthvqa")
    before = config_fingerprint(cfg)
    OmegaConf.set_struct(cfg, False)
    cfg.tags = ["another"]
    cfg.optimized_metric = "val/loss"
    cfg.trainer.log_every_n_steps = 7
    cfg.trainer.enable_progress_bar = not cfg.trainer.enable_progress_bar
    cfg.upstream_overrides = {"clip_synthvqa": ["seed=3"]}  # reaches upstreams, which have their own fingerprint
    cfg.paths.checkpoints_dir = "/elsewhere/checkpoints"
    assert config_fingerprint(cfg) == before


def test_input_data_elsewhere_changes_the_fingerprint(tmp_path: Path) -> None:
    # input directories are not relocated: another data set under one key must not reuse the first one's artifacts
    a, b = (_composed(tmp_path, "a", "experiment=features_vqa", f"paths.vqa_dir=/data/{v}/VQA") for v in ("v1", "v2"))
    assert config_fingerprint(a) != config_fingerprint(b)


def _plain(data_dir: str, value: str) -> DictConfig:
    return OmegaConf.create({"paths": {"data_dir": data_dir}, "stage": "s", "task_name": "t", "model": {"f": value}})


def test_paths_are_abstracted_at_directory_boundaries() -> None:
    assert config_fingerprint(_plain("/r/data", "/r/data/x")) == config_fingerprint(_plain("/s/data", "/s/data/x"))
    assert config_fingerprint(_plain("/r/data", "/r/data")) == config_fingerprint(_plain("/s/data/", "/s/data"))
    # /r/data2 is not under /r/data: hashed as it is
    assert config_fingerprint(_plain("/r/data", "/r/data2/x")) != config_fingerprint(_plain("/s/data", "/s/data2/x"))


# ---------------------------------------------------------------------------------------------------- manifests
def _store(root: Path, stage: str, task: str = "t", **cfg: object) -> DictConfig:
    return OmegaConf.create({"paths": {"artifacts_dir": str(root)}, "stage": stage, "task_name": task, **cfg})


def _write(name: str) -> object:
    return lambda directory: (directory / "weights.txt").write_text(name)


def test_manifests_name_upstreams_relative_to_the_artifacts_root(tmp_path: Path) -> None:
    root = tmp_path / "a" / "artifacts"
    clip = publish_artifact(_store(root, "clip"), _write("clip"), {"m": 1.0})
    outside = publish_artifact(_store(tmp_path / "elsewhere", "vae"), _write("vae"), {})
    features = publish_artifact(_store(root, "features"), _write("f"), {}, {"clip": clip, "vae": outside})
    stored = features.manifest["upstream"]
    assert stored["clip"]["path"] == f"clip/{clip.path.name}"
    assert stored["vae"]["path"] == str(outside.path)  # not under this root: does not move with it
    moved = tmp_path / "b" / "artifacts"
    shutil.copytree(root, moved)
    found = load_artifact(moved / "features" / features.path.name)
    assert found.upstream_path("clip") == moved / "clip" / clip.path.name
    assert found.upstream_path("vae") == outside.path
    assert found.manifest["lineage"] == {"clip": clip.fingerprint, "vae": outside.fingerprint}


def test_old_manifests_with_absolute_upstream_paths_still_load(tmp_path: Path) -> None:
    art = Artifact(
        tmp_path / "features" / "t-abc",
        {"fingerprint": "f", "upstream": {"clip": {"path": "/old/outputs/artifacts/clip/c-123", "fingerprint": "c"}}},
    )
    assert art.upstream_path("clip") == Path("/old/outputs/artifacts/clip/c-123")
    with pytest.raises(KeyError, match="no upstream 'vae'"):
        art.upstream_path("vae")


# --------------------------------------------------------------------------------------- build_once, processes
def _join(procs: list[mp.Process]) -> list[int | None]:
    for p in procs:
        p.join(60)
    return [p.exitcode for p in procs]


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    target, log = tmp_path / "clip" / "clip-abc", tmp_path / "builds.log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=build_slowly, args=(str(target), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    assert _join(procs) == [0, 0, 0]
    assert log.read_text().splitlines() == ["built"]
    assert (target / "weights.txt").read_text() == "done"
    assert sorted(p.name for p in target.parent.iterdir()) == [".locks", "clip-abc"]
    assert build_once(target, target.exists, lambda: pytest.fail("built twice")) is False


def test_a_failed_build_leaves_nothing_and_frees_the_lock(tmp_path: Path) -> None:
    target = tmp_path / "clip" / "clip-abc"

    def failing() -> None:
        with atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("out of memory halfway")

    with pytest.raises(RuntimeError, match="halfway"):
        build_once(target, target.exists, failing)
    assert sorted(p.name for p in target.parent.iterdir()) == [".locks"]  # no artifact, no temporary sibling
    assert build_once(target, target.exists, lambda: target.mkdir()) is True  # the lock is free again


def test_a_killed_builder_leaves_no_artifact_and_another_builds_it(tmp_path: Path) -> None:
    target = tmp_path / "clip" / "clip-abc"
    proc = mp.get_context("spawn").Process(target=build_and_hang, args=(str(target),))
    proc.start()
    deadline = time.time() + 60
    while not (target.parent / "started").exists():
        assert time.time() < deadline and proc.is_alive(), "the builder never started"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert not target.exists()  # only a hidden temporary sibling stays, never read as an artifact
    assert build_once(target, target.exists, lambda: target.mkdir()) is True  # an OS lock: freed by the kill


def test_concurrent_overwriting_publishes_leave_one_complete_copy(tmp_path: Path) -> None:
    target = tmp_path / "stage" / "task-abc"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=publish, args=(str(target), name)) for name in ("a", "b")]
    for p in procs:
        p.start()
    assert _join(procs) == [0, 0]
    assert (target / "weights.txt").read_text() in {"a", "b"}
    assert [p.name for p in target.parent.iterdir()] == ["task-abc"]  # no temporary or moved-aside copies left


@pytest.mark.parametrize(
    ("env", "follower"),
    [
        ({}, False),
        ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, False),  # rank 0 after Lightning's launcher set its variables
        ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, True),  # a rank that Lightning's subprocess launcher started
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, True),  # rank 0 of the second node
        ({"RANK": "3"}, True),  # torchrun
        ({"SLURM_PROCID": "2"}, True),
        ({"SLURM_PROCID": "0"}, False),
    ],
)
def test_follower_ranks_are_told_apart_before_any_trainer(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], follower: bool
) -> None:
    # followers build a missing upstream alongside their rank 0 instead of waiting for the lock it holds
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launched_as_follower_rank() is follower


# ----------------------------------------------------------------------------------------- pipeline, no training
def _state() -> tuple:
    return (
        torch.get_float32_matmul_precision(),
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.rand(1).item(),
        float(np.random.rand()),
        random.random(),
        os.environ.get("PL_GLOBAL_SEED"),
    )


def _messy_stage(calls: list[str]) -> object:
    """A stage runner that publishes an empty artifact after changing every process-wide setting it can."""

    def run(cfg: DictConfig) -> dict[str, float]:
        calls.append(cfg.task_name)
        torch.set_float32_matmul_precision("medium" if torch.get_float32_matmul_precision() != "medium" else "high")
        torch.set_num_threads(torch.get_num_threads() + 1)
        torch.use_deterministic_algorithms(not torch.are_deterministic_algorithms_enabled())
        torch.manual_seed(123), np.random.seed(123), random.seed(123)
        os.environ["PL_GLOBAL_SEED"] = "123"
        upstream = resolve_upstreams(cfg)  # already there: the pipeline resolved them before building this one
        run_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # what @hydra.main hands a run
        publish_artifact(run_cfg, _write(cfg.task_name), {}, upstream)
        return {}

    return run


def _seeded_state() -> tuple:
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    state = _state()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    return state


def test_upstreams_are_built_once_by_the_given_runner_and_give_back_process_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _composed(tmp_path, "a", "experiment=features_synthvqa", "synthvqa_clip=trained")
    calls: list[str] = []
    with preserved_process_state():
        before = _seeded_state()
        upstream = resolve_upstreams(cfg, build=_messy_stage(calls))
        assert _state() == before  # the parent goes on as if nothing had run
    assert calls == ["clip_synthvqa"]
    assert upstream["clip"].path.parent == Path(cfg.paths.artifacts_dir) / "clip"
    caplog.clear()
    with caplog.at_level("INFO", logger="metadiff.pipeline"):
        again = resolve_upstreams(cfg)  # found: nothing to build, no runner needed
    assert again["clip"].path == upstream["clip"].path and calls == ["clip_synthvqa"]
    assert f"upstream 'clip': using {upstream['clip'].path}" in caplog.text
    own = find_or_build(cfg, build=_messy_stage(calls))
    assert calls == ["clip_synthvqa", "features_synthvqa"]
    assert own.upstream_path("clip") == upstream["clip"].path
    assert find_artifact(cfg, {"clip": upstream["clip"].fingerprint}) == own


def test_a_missing_upstream_without_a_runner_names_the_command(tmp_path: Path) -> None:
    cfg = _composed(tmp_path, "a", "experiment=features_synthvqa", "synthvqa_clip=trained")
    with pytest.raises(UpstreamMissingError, match="build it first with: python train.py experiment=clip_synthvqa"):
        resolve_upstreams(cfg)
    assert not [p for p in Path(cfg.paths.artifacts_dir).glob("*/*") if not p.name.startswith(".")]


@pytest.mark.parametrize("debug", ["fdr", "[fdr]", "[short_chain,fdr]"])
def test_an_inherited_group_reaches_the_upstream_also_when_chosen_as_a_list(debug: str, tmp_path: Path) -> None:
    """features_synthvqa inherits `debug` into the CLIP it trains: a list choice (which Hydra's runtime choices do not
    record) must reach it too, or a smoke run trains a full CLIP."""
    cfg = compose_config(
        ["experiment=features_synthvqa", "synthvqa_clip=trained", f"debug={debug}"], tmp_path, tmp_path / "out"
    )
    assert compose_upstream(cfg, "clip").trainer.fast_dev_run is True


# --------------------------------------------------------------------------------------- relocation, real chain
SMALL_SYNTH = ["data.source.generator.n_scenes=1500", "data.source.generator.n_tasks=200"]  # as test_meta_val
SHORT_CLIP = (
    "["
    + ",".join(
        f"'{o}'"
        for o in ["trainer.max_steps=2", "data.n_train_pairs=512", "data.n_val_tasks=5", "test=false", *SMALL_SYNTH]
    )
    + "]"
)


def _artifacts(root: Path) -> set[str]:
    base = root / "outputs" / "artifacts"
    return {
        f"{s.name}/{a.name}"
        for s in base.iterdir()
        if not s.name.startswith(".")
        for a in s.iterdir()
        if not a.name.startswith(".")
    }


def test_a_copied_outputs_tree_is_reused_under_another_root(tmp_path: Path) -> None:
    # the cheapest chain of two artifacts: a 2-step CLIP and the feature store of its embeddings, on a small twin
    args = [
        "experiment=features_synthvqa",
        "synthvqa_clip=trained",
        *SMALL_SYNTH,
        f"upstream.clip.overrides={SHORT_CLIP}",
    ]
    first = run_train(args, tmp_path / "a")
    assert "upstream 'clip' missing: building it now" in first.stdout + first.stderr
    built = _artifacts(tmp_path / "a")
    assert {a.split("/")[0] for a in built} == {"clip", "features"}
    shutil.copytree(tmp_path / "a" / "outputs", tmp_path / "b" / "outputs")
    shutil.rmtree(tmp_path / "a")  # nothing may still point into the old root
    again = run_train(args, tmp_path / "b")
    log = again.stdout + again.stderr
    clip = sorted(a for a in built if a.startswith("clip/"))[0]
    assert f"upstream 'clip': using {tmp_path / 'b' / 'outputs' / 'artifacts' / clip}" in log
    assert "building it now" not in log
    assert _artifacts(tmp_path / "b") == built  # the features artifact is republished in place, nothing new
    written = re.findall(r"artifact written: (\S+)", log)
    assert [Path(p).relative_to(tmp_path / "b" / "outputs" / "artifacts").as_posix() for p in written] == [
        a for a in built if a.startswith("features/")
    ]
    features = load_artifact(Path(written[0]))
    assert features.manifest["upstream"]["clip"]["path"] == clip
    assert features.upstream_path("clip") == tmp_path / "b" / "outputs" / "artifacts" / clip
    store = Path(upstream_store_dir({"features": features}))  # what later stages read
    assert store.is_relative_to(tmp_path / "b") and store.is_dir()
    assert not Path(json.loads(features.file("features.json").read_text())["store_dir"]).is_absolute()
