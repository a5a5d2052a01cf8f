"""The synthetic Meta-VQA twin: schema, real-benchmark rules, statistics, determinism, caching, exact labels."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from metadiff.data.synthvqa import build as B
from metadiff.data.synthvqa.questions import SceneTable, enumerate_questions, true_statements
from metadiff.data.synthvqa.scenes import (
    GRID_CELLS,
    Scene,
    SceneObject,
    SceneSpec,
    caption_scene,
    render_scene,
    sample_scene,
)

SMALL = B.SynthVQAConfig(n_scenes=1500, n_tasks=200)


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def full(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The default config, built once: it must reach the real 1243 tasks."""
    return B.build_synthvqa(B.SynthVQAConfig(), tmp_path_factory.mktemp("synthvqa") / "full")


@pytest.fixture(scope="session")
def tasks(full: dict[str, Path]) -> dict[str, dict]:
    return {**load_json(full["meta_train"]), **load_json(full["meta_test"])}


@pytest.fixture(scope="session")
def scenes(full: dict[str, Path]) -> dict[str, Scene]:
    raw = load_json(full["scenes"])
    return {name: Scene(tuple(SceneObject(**o) for o in objs)) for name, objs in raw.items()}


# ------------------------------------------------------------------------------------ schema & split


def test_full_default_reaches_real_task_counts(full: dict[str, Path]) -> None:
    train, test = load_json(full["meta_train"]), load_json(full["meta_test"])
    assert (len(train), len(test)) == (870, 373)
    assert not set(train) & set(test)
    manifest = load_json(full["manifest"])
    assert manifest["fingerprint"] == B.fingerprint(B.SynthVQAConfig())
    assert manifest["statistics"] == B.task_statistics({**train, **test})


def test_schema(full: dict[str, Path], tasks: dict[str, dict]) -> None:
    n_scenes = np.load(full["images"], mmap_mode="r").shape[0]
    for question, task in tasks.items():
        assert set(task) == {"answers", "train", "test"}, question
        answers = task["answers"]
        assert len(answers) >= 2 and len(set(answers)) == len(answers)
        examples = task["train"] + task["test"]
        assert len(examples) > 20
        names = [name for name, _ in examples]
        assert len(set(names)) == len(names), f"duplicate image in {question!r}"
        assert all(int(n.removeprefix("synth_")) < n_scenes for n in names)
        per_answer = Counter(a for _, a in examples)
        assert set(per_answer) == set(answers)
        assert min(per_answer.values()) >= 2
        for split in ("train", "test"):
            split_answers = [a for _, a in task[split]]
            assert set(split_answers) == set(answers), f"{question!r}: an answer is missing from {split}"
            # grouped by answer, in answer order
            assert [a for a in dict.fromkeys(split_answers)] == answers


def test_per_answer_split_uses_bankers_rounding(tasks: dict[str, dict]) -> None:
    for task in tasks.values():
        n_train = Counter(a for _, a in task["train"])
        n_test = Counter(a for _, a in task["test"])
        for a in task["answers"]:
            assert n_train[a] == round(0.7 * (n_train[a] + n_test[a]))
    for n, expected in [(2, 1), (3, 2), (4, 3), (5, 4), (15, 10)]:  # round(3.5) == 4, round(10.5) == 10
        train, test = B.split_answer([f"i{k}" for k in range(n)], seed=0, train_fraction=0.7)
        assert (len(train), len(test)) == (expected, n - expected)
        assert sorted(train + test) == sorted(f"i{k}" for k in range(n))


def test_make_task_applies_real_rules() -> None:
    cfg = B.SynthVQAConfig()
    pairs = [(f"a{i}", "red") for i in range(12)] + [("x", "white")] + [(f"b{i}", "blue") for i in range(9)]
    pairs.insert(3, ("c0", "green"))  # green appears before blue but has a single example -> dropped
    task = B.make_task(pairs, cfg)
    assert task is not None and task["answers"] == ["red", "blue"]
    assert Counter(a for _, a in task["train"]) == {"red": 8, "blue": 6}
    assert B.make_task(pairs[:20], cfg) is None  # <= 20 examples after dropping singletons
    assert B.make_task([(f"a{i}", "red") for i in range(30)], cfg) is None  # a single answer


def test_prompts_have_one_slot(full: dict[str, Path], tasks: dict[str, dict]) -> None:
    prompts = load_json(full["prompt_meta"])
    assert set(prompts) == set(tasks)
    for question, template in prompts.items():
        assert template.count("{}") == 1, question
        assert "{" not in template.replace("{}", "") and "}" not in template.replace("{}", "")
        assert template.format(tasks[question]["answers"][0])
    assert prompts.get("What color is the circle?", "the circle is {}") == "the circle is {}"
    assert prompts.get("How many squares are there?", "there are {} squares") == "there are {} squares"


def test_statistics_in_real_band(full: dict[str, Path], tasks: dict[str, dict]) -> None:
    stats = B.task_statistics(tasks)
    assert 5 <= stats["answers_median"] <= 9
    assert stats["answers_min"] >= 2
    assert 30 <= stats["examples_median"] <= 60
    assert stats["examples_min"] >= 21
    assert stats["majority_test_acc"] < 0.6
    assert 0.08 <= stats["chance"] <= 0.3
    counts = load_json(full["manifest"])["counts"]
    assert counts["surviving_questions"] > 1.2 * 1243  # comfortably more candidates than tasks


def test_colour_tasks_are_not_constant(tasks: dict[str, dict]) -> None:
    colour = {q: t for q, t in tasks.items() if q.startswith("What color is the ")}
    assert len(colour) > 200
    for task in colour.values():
        assert len({a for _, a in task["train"]}) >= 2 or len({a for _, a in task["test"]}) >= 2
    chance = np.mean([1 / len(t["answers"]) for t in colour.values()])
    assert 0.08 <= chance <= 0.3


def test_images(full: dict[str, Path]) -> None:
    images = np.load(full["images"], mmap_mode="r")
    spec = SceneSpec()
    assert images.shape == (B.SynthVQAConfig().n_scenes, spec.image_size, spec.image_size, 3)
    assert images.dtype == np.uint8
    assert full["images"].stat().st_size < 100 * 2**20
    first = np.asarray(images[:8], dtype=np.float32)
    assert 10 < first.mean() < 200 and not np.array_equal(first[0], first[1])


# ------------------------------------------------------------------------------------ exact labels


def test_labels_match_reference_answers(full: dict[str, Path], tasks: dict[str, dict], scenes) -> None:
    by_text = {q.text: q for q in enumerate_questions(SceneSpec())}
    for question, task in tasks.items():
        q = by_text[question]
        for name, answer in task["train"] + task["test"]:
            assert q.answer(scenes[name]) == answer, (question, name)


def test_labels_match_hand_written_rules(tasks: dict[str, dict], scenes) -> None:
    """Independent re-derivation for three families, straight from scenes.json."""
    checked = 0
    for shape in SceneSpec().shapes:
        task = tasks.get(f"What color is the {shape}?")
        for name, answer in (task["train"] + task["test"]) if task else []:
            hits = [o for o in scenes[name].objects if o.shape == shape]
            assert len(hits) == 1 and hits[0].color == answer
            checked += 1
        plural = shape + ("es" if shape.endswith("s") else "s")
        task = tasks.get(f"How many {plural} are there?")
        for name, answer in (task["train"] + task["test"]) if task else []:
            assert sum(o.shape == shape for o in scenes[name].objects) == int(answer)
            checked += 1
    spec = SceneSpec()
    for color in spec.colors:
        for shape in spec.shapes:
            task = tasks.get(f"Where is the {color} {shape}?")
            for name, answer in (task["train"] + task["test"]) if task else []:
                hits = [o for o in scenes[name].objects if o.shape == shape and o.color == color]
                assert len(hits) == 1
                row, col = (int(v >= 1 / 3) + int(v >= 2 / 3) for v in (hits[0].y, hits[0].x))
                assert answer == GRID_CELLS[3 * row + col]
                checked += 1
    assert checked > 100


def test_vectorised_answers_match_reference() -> None:
    spec = SceneSpec()
    rng = np.random.default_rng(123)
    scene_list = [sample_scene(rng, spec) for _ in range(60)]
    table = SceneTable.from_scenes(scene_list, spec)
    for q in enumerate_questions(spec):
        space = q.answer_space(spec)
        codes = q.answer_codes(table)
        for scene, code in zip(scene_list, codes, strict=True):
            assert q.answer(scene) == (space[code] if code >= 0 else None), q.text


def test_question_texts_unique_and_plentiful() -> None:
    questions = enumerate_questions(SceneSpec())
    assert len({q.text for q in questions}) == len(questions) > 1.5 * 1243


def test_too_small_pool_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"only \d+ of \d+ candidate.*n_tasks=5000"):
        B.build_synthvqa(B.SynthVQAConfig(n_scenes=300, n_tasks=5000), tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    assert not list(tmp_path.iterdir())  # the temporary build directory was removed


# --------------------------------------------------------------------------- determinism & caching


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = B.build_synthvqa(SMALL, tmp_path / "a")
    b = B.build_synthvqa(SMALL, tmp_path / "b")
    for key in B.FILES:
        assert a[key].read_bytes() == b[key].read_bytes(), key
    c = B.build_synthvqa(B.SynthVQAConfig(seed=1, n_scenes=1500, n_tasks=200), tmp_path / "c")
    for key in ("images", "meta_train", "meta_test", "scenes"):
        assert a[key].read_bytes() != c[key].read_bytes(), key
    assert B.fingerprint(SMALL) != B.fingerprint(B.SynthVQAConfig(seed=1, n_scenes=1500, n_tasks=200))


def test_cache_reuse_and_rebuild(tmp_path: Path) -> None:
    root = B.load_or_build_synthvqa(SMALL, tmp_path)
    assert root == tmp_path / f"synthvqa-{B.fingerprint(SMALL)[:12]}"
    manifest = root / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert B.load_or_build_synthvqa(SMALL, tmp_path) == root
    assert manifest.stat().st_mtime_ns == stamp  # reused, not rebuilt
    manifest.unlink()  # an incomplete directory is rebuilt in place
    assert B.load_or_build_synthvqa(SMALL, tmp_path) == root
    assert B.read_manifest(root)["fingerprint"] == B.fingerprint(SMALL)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".locks") == [root.name]  # no temp/old siblings


def test_config_round_trip() -> None:
    cfg = B.SynthVQAConfig(seed=3, scene=SceneSpec(image_size=32))
    assert B.SynthVQAConfig.from_dict(cfg.to_dict()) == cfg
    assert B.fingerprint(B.SynthVQAConfig.from_dict(cfg.to_dict())) == B.fingerprint(cfg)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    B.main(["--out", str(tmp_path / "cli"), "--n-scenes", "1500", "--n-tasks", "200"])
    out = capsys.readouterr().out
    assert "majority-class test accuracy" in out and "140 / 60" in out
    assert (tmp_path / "cli" / "manifest.json").exists()


# ---------------------------------------------------------------------------------- scenes/captions


def test_scenes_are_well_formed() -> None:
    spec = SceneSpec()
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng, spec)
        assert spec.min_objects <= len(scene.objects) <= spec.max_objects
        for i, o in enumerate(scene.objects):
            r = spec.diameter(o.size) / 2
            assert r <= o.x <= 1 - r and r <= o.y <= 1 - r
            for p in scene.objects[i + 1 :]:
                gap = np.hypot(o.x - p.x, o.y - p.y)
                assert gap >= spec.min_separation * (r + spec.diameter(p.size) / 2) - 1e-12
    img = render_scene(scene, spec, rng)
    assert img.shape == (spec.image_size, spec.image_size, 3) and img.dtype == np.uint8


def test_captions_are_true_and_deterministic() -> None:
    spec = SceneSpec()
    templates = enumerate_questions(spec)
    rng = np.random.default_rng(5)
    for _ in range(15):
        scene = sample_scene(rng, spec)
        seed = int(rng.integers(1 << 30))
        caption = caption_scene(scene, np.random.default_rng(seed), spec)
        assert caption == caption_scene(scene, np.random.default_rng(seed), spec)
        objects = {f"a {o.size} {o.color} {o.shape}" for o in scene.objects}
        for part in caption.split(". "):
            if part.startswith("a "):  # the optional object list
                assert set(part.split(", ")) == objects
                continue
            matching = [q for q in templates if _fills(q.prompt, part)]
            assert any(q.answer(scene) == _fills(q.prompt, part) for q in matching), part
        statements = true_statements(scene, np.random.default_rng(seed), 4)
        assert 1 <= len(statements) <= 4 and len(set(statements)) == len(statements)


def _fills(template: str, sentence: str) -> str | None:
    """The answer that turns ``template`` into ``sentence``, if any."""
    head, tail = template.split("{}")
    if sentence.startswith(head) and sentence.endswith(tail) and len(sentence) > len(head) + len(tail):
        return sentence[len(head) : len(sentence) - len(tail)]
    return None


def test_build_is_atomic_on_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("crash mid-build")

    monkeypatch.setattr(B, "split_meta", boom)
    with pytest.raises(RuntimeError):
        B.build_synthvqa(SMALL, tmp_path / "ds")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ question-dependent priors, prompts


def _colour_given_shape(spec: SceneSpec, n_scenes: int = 600) -> np.ndarray:
    rng = np.random.default_rng(0)
    counts = np.zeros((len(spec.shapes), len(spec.colors)))
    for _ in range(n_scenes):
        for obj in sample_scene(rng, spec).objects:
            counts[spec.shapes.index(obj.shape), spec.colors.index(obj.color)] += 1
    return counts / counts.sum(1, keepdims=True)


def test_conditional_skew_makes_each_shape_favour_its_own_colour() -> None:
    """With conditional_skew, P(colour | shape) peaks at a shape-specific colour (the favourites differ), so the
    answer prior of "What color is the <shape>?" depends on the question; with 0 every shape has the same law."""
    dependent = _colour_given_shape(SceneSpec(conditional_skew=1.5))
    favourites = dependent.argmax(1)
    assert list(favourites) == list(range(len(favourites)))  # shape i favours colour i
    assert dependent.max(1).min() > 0.4  # Zipf(1.5) over 8 colours: 0.52 expected
    independent = _colour_given_shape(SceneSpec(conditional_skew=0.0))
    assert np.abs(independent - independent.mean(0)).max() < 0.08
    assert len(set(independent.argmax(1))) == 1


def test_question_captions_are_question_then_true_answer() -> None:
    spec = SceneSpec(question_caption_prob=1.0)
    by_text = {q.text: q for q in enumerate_questions(spec)}
    rng = np.random.default_rng(2)
    seen = 0
    for _ in range(20):
        scene = sample_scene(rng, spec)
        for statement in true_statements(scene, rng, 3, question_prob=1.0):
            question, answer = statement.split("? ", 1)
            assert by_text[question + "?"].answer(scene) == answer
            seen += 1
    assert seen >= 20


def test_generic_answer_prompt_replaces_every_template(tmp_path: Path) -> None:
    from metadiff.data.synthvqa.source import SynthVQASource

    declarative = SynthVQASource(
        cache_dir=str(tmp_path), generator=B.SynthVQAConfig(), answer_prompt=None, meta_val={"fraction": 0.0, "seed": 0}
    )
    generic = SynthVQASource(
        cache_dir=str(tmp_path), generator=B.SynthVQAConfig(), answer_prompt="{}", meta_val={"fraction": 0.0, "seed": 0}
    )
    assert generic.prompt_template("What color is the circle?") == "{}"
    assert generic.fingerprint() != declarative.fingerprint()  # the feature store must not be shared
    with pytest.raises(ValueError, match="answer_prompt = 'a photo'"):
        SynthVQASource(
            cache_dir=str(tmp_path),
            generator=B.SynthVQAConfig(),
            answer_prompt="a photo",
            meta_val={"fraction": 0.0, "seed": 0},
        )


def test_the_build_command_makes_the_benchmark_the_experiments_use(tmp_path: Path) -> None:
    """`python -m metadiff.data.synthvqa.build` reads conf/data/synthvqa.yaml, not the dataclass defaults (which differ:
    e.g. conditional_skew 0 vs 3.5), so the command line and `data=synthvqa` build the same data."""
    from conftest import compose_config
    from metadiff.config.typed import as_spec

    cfg = compose_config(["experiment=features_synthvqa"], tmp_path, tmp_path / "out")
    used = as_spec(B.SynthVQAConfig, cfg.data.source.generator, "data.source.generator")
    assert B.configured_generator() == used
    assert B.fingerprint(B.configured_generator()) != B.fingerprint(B.SynthVQAConfig())
