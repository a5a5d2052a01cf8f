"""`model.pretrained` in every form researchers have CLIP weights: open_clip state dicts, safetensors and OpenAI's
TorchScript archives as local files (format detected from the bytes), open_clip tags and hf-hub repos from the
Hugging Face cache (offline: cache only, one line when absent). Loaded models compute exactly what the source model
computes; bad files are one line naming the file; the feature store's key follows the weights file's content."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import open_clip
import open_clip.model
import pytest
import safetensors.torch
import torch

from conftest import run_train, smoke_budget
from metadiff.config import ConfigError
from metadiff.errors import InputFileError, MissingInputError
from metadiff.features.clip_models import ClipBundle, create_clip, detect_format, image_preprocessing
from metadiff.stages.features import FeatureExtractor

ARCH = "metadiff-tiny-vit"
REPO = Path(__file__).resolve().parents[1]
# The smallest CLIP that open_clip.model.build_model_from_openai_state_dict rebuilds exactly: it infers the layout
# from the state dict and assumes 64-wide attention heads and QuickGELU, as in all of OpenAI's models.
OPENAI_LAYOUT_ARCH = "metadiff-test-openai-layout"
OPENAI_LAYOUT = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}


@pytest.fixture(scope="module")
def openai_layout_arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("arch") / f"{OPENAI_LAYOUT_ARCH}.json"
    path.write_text(json.dumps(OPENAI_LAYOUT))
    open_clip.add_model_config(path)
    return OPENAI_LAYOUT_ARCH


def source_model(arch: str = ARCH, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_clip(arch).model.eval()


def assert_same_outputs(loaded: ClipBundle, source: torch.nn.Module) -> None:
    """encode_image and encode_text of the loaded model equal the source model's."""
    torch.manual_seed(123)
    images = torch.randn(3, 3, loaded.image_size, loaded.image_size)
    tokens = loaded.tokenizer(["a red circle", "two squares", "what colour is the triangle?"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval().encode_image(images), source.encode_image(images))
        torch.testing.assert_close(loaded.model.encode_text(tokens), source.encode_text(tokens))


def write_openai_archive(model: torch.nn.Module, path: Path) -> None:
    """A TorchScript archive laid out like OpenAI's (e.g. ViT-B-32.pt): a traced CLIP whose state dict holds OpenAI's
    key names (open_clip kept them), fp16 weights, the scalars input_resolution/context_length/vocab_size as tensors,
    and no attention-mask buffer (OpenAI's model keeps the mask as a constant)."""
    traced = copy.deepcopy(model).eval()
    mask = traced.attn_mask
    del traced.attn_mask
    object.__setattr__(traced, "attn_mask", mask)
    scalars = {
        "input_resolution": traced.visual.image_size[0],
        "context_length": traced.context_length,
        "vocab_size": traced.vocab_size,
    }
    del traced.context_length, traced.vocab_size
    for name, value in scalars.items():
        traced.register_buffer(name, torch.tensor(value))
    images = torch.zeros(1, 3, scalars["input_resolution"], scalars["input_resolution"])
    tokens = torch.zeros(1, scalars["context_length"], dtype=torch.long)
    archive = torch.jit.trace_module(traced, {"encode_image": (images,), "encode_text": (tokens,)})
    archive.half()
    archive.save(str(path))


def fp16_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """The source model with the values an fp16 archive of it holds."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


# --- local files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapping", ["plain", "training_checkpoint", "dataparallel"])
def test_open_clip_state_dict_file_gives_the_same_model(wrapping: str, tmp_path: Path) -> None:
    source = source_model()
    state = source.state_dict()
    if wrapping == "training_checkpoint":  # what open_clip's training script saves
        state = {"epoch": 3, "name": "run", "state_dict": state}
    elif wrapping == "dataparallel":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    assert detect_format(path) == "torch"
    bundle = create_clip(ARCH, str(path))
    assert bundle.weights.kind == "file" and bundle.weights.path == path
    assert_same_outputs(bundle, source)


@pytest.mark.parametrize("name", ["open_clip_model.safetensors", "weights.bin"])  # detected from bytes, not name
def test_safetensors_file_gives_the_same_model(name: str, tmp_path: Path) -> None:
    source = source_model()
    path = tmp_path / name
    safetensors.torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    assert detect_format(path) == "safetensors"
    assert_same_outputs(create_clip(ARCH, path), source)


def test_openai_torchscript_archive_gives_the_same_model(openai_layout_arch: str, tmp_path: Path) -> None:
    source = fp16_rounded(source_model(openai_layout_arch))
    path = tmp_path / "ViT-tiny-16px.pt"
    write_openai_archive(source, path)
    assert detect_format(path) == "torchscript"
    bundle = create_clip(openai_layout_arch, path)
    assert isinstance(bundle.model, open_clip.CLIP)
    assert all(p.dtype == torch.float32 for p in bundle.model.parameters())
    assert_same_outputs(bundle, source)


def test_openai_archive_of_another_architecture_is_one_line(openai_layout_arch: str, tmp_path: Path) -> None:
    path = tmp_path / "ViT-tiny-16px.pt"
    write_openai_archive(source_model(openai_layout_arch), path)
    with pytest.raises(InputFileError) as err:
        create_clip(ARCH, path)
    message = str(err.value)
    assert str(path) in message and "OpenAI TorchScript archive" in message and f"'{ARCH}'" in message
    assert "\n" not in message


def test_torchscript_without_openai_layout_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(InputFileError, match="without OpenAI CLIP's layout") as err:
        create_clip(ARCH, path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # as an interrupted copy leaves it


def _write(fmt: str, path: Path, model: torch.nn.Module) -> None:
    if fmt == "torch":
        torch.save(model.state_dict(), path)
    elif fmt == "safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        write_openai_archive(model, path)


@pytest.mark.parametrize("fmt", ["torch", "safetensors", "torchscript"])
def test_truncated_file_is_one_line_naming_it(fmt: str, openai_layout_arch: str, tmp_path: Path) -> None:
    arch = openai_layout_arch if fmt == "torchscript" else ARCH
    path = tmp_path / f"weights-{fmt}.pt"
    _write(fmt, path, source_model(arch))
    _truncate(path)
    with pytest.raises(InputFileError, match="is not a readable .*, truncated or corrupt") as err:
        create_clip(arch, path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_garbage_and_non_state_dict_files_are_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(InputFileError, match="is not a readable torch checkpoint") as err:
        create_clip(ARCH, garbage)
    assert str(garbage) in str(err.value) and "\n" not in str(err.value)
    whole = tmp_path / "whole_model.pt"
    torch.save(source_model(), whole)  # a pickled model object: refused, not unpickled
    with pytest.raises(InputFileError, match=r"holds pickled Python objects \(open_clip\.model\.CLIP\)") as err:
        create_clip(ARCH, whole)
    assert str(whole) in str(err.value) and "\n" not in str(err.value)
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listing)
    with pytest.raises(InputFileError, match="not a state dict of tensors"):
        create_clip(ARCH, listing)


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_file_that_does_not_fit_the_architecture_is_one_line(fmt: str, tmp_path: Path) -> None:
    state = dict(source_model().state_dict())
    state.pop("ln_final.bias")
    state["text_projection"] = torch.zeros(128, 64)
    path = tmp_path / f"weights.{fmt}"
    if fmt == "torch":
        torch.save(state, path)
    else:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(InputFileError) as err:
        create_clip(ARCH, path)
    message = str(err.value)
    assert message.startswith(f"weights file {path} (") and f"does not fit architecture '{ARCH}'" in message
    assert "'ln_final.bias'" in message and "'text_projection' is [128, 64] in the file, [128, 128]" in message
    assert "\n" not in message


def test_missing_file_and_unknown_tag(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="no download is attempted"):
        create_clip(ARCH, str(tmp_path / "absent.safetensors"))
    with pytest.raises(MissingInputError, match="weights file not found"):
        create_clip("RN50", "weights/rn50.pt")
    with pytest.raises(ConfigError) as err:
        create_clip("RN50", "openia")  # a typo of a tag: nothing is built, the valid tags are listed
    message = str(err.value)
    assert "'openia'" in message and "'RN50'" in message and "openai" in message and "yfcc15m" in message
    assert "\n" not in message


def test_tags_bring_their_own_normalisation() -> None:
    assert image_preprocessing("ViT-B-16-SigLIP", "webli")[1:] == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert image_preprocessing("ViT-B-16-SigLIP")[1] == tuple(open_clip.OPENAI_DATASET_MEAN)  # arch default


# --- the Hugging Face cache, offline -------------------------------------------------------------------------------


def run_offline(script: str, hf_home: Path) -> dict:
    """`script` in a fresh interpreter with HF_HUB_OFFLINE=1, HF_HOME=hf_home and sockets disabled; it leaves its
    answer in the variable `result`, printed here as the last line of JSON."""
    prelude = (
        "import json, socket\n"
        "def _no_network(*a, **k):\n    raise OSError('network access attempted')\n"
        "socket.socket.connect = _no_network\nsocket.create_connection = _no_network\n"
        "from metadiff.features.clip_models import create_clip\n"
        "def error_of(call):\n"
        "    try:\n        call()\n    except Exception as err:\n        return [type(err).__name__, str(err)]\n"
        "    return None\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home))
    proc = subprocess.run(
        [sys.executable, "-c", prelude + script + "\nprint(json.dumps(result))"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tag_missing_from_offline_cache_is_one_line_before_any_model_is_built(tmp_path: Path) -> None:
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    result = run_offline(
        "import open_clip.model\n"
        "def _no_build(*a, **k):\n    raise AssertionError('a model was built before the error')\n"
        "open_clip.model.CLIP.__init__ = _no_build\n"
        "result = error_of(lambda: create_clip('RN50', 'openai'))\n",
        hf_home,
    )
    kind, message = result
    assert kind == "MissingInputError", message
    assert "'openai' of 'RN50'" in message and "HF_HUB_OFFLINE=1" in message and "run once online" in message
    assert "open_clip.create_model('RN50', pretrained='openai')" in message and "local weights file" in message
    assert "\n" not in message
    assert not [p for p in hf_home.rglob("*") if p.is_file()], "something was downloaded"


def test_offline_tag_through_the_entry_point_is_one_error_line(vqa_tree: dict, tmp_path: Path) -> None:
    """What a user sees: `train.py ... model.pretrained=openai` offline with an empty cache exits 2 in one line."""
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    overrides = smoke_budget("features_vqa", vqa_tree)  # the fixture's data; the weights are named below
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub")}
    proc = run_train(
        ["experiment=features_vqa", *overrides, "model.arch=RN50", "model.pretrained=openai"],
        tmp_path / "root",
        check=False,
        env=env,
        fresh=True,
    )  # fresh: huggingface_hub reads env at import
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert "'openai' of 'RN50'" in error and "run once online" in error and str(hf_home) in error


def write_hub_repo(
    cache: Path, repo_id: str, model_cfg: dict, weights: dict[str, torch.Tensor], preprocess_cfg: dict
) -> None:
    """An open_clip model repo in the standard huggingface_hub cache layout, as a download leaves it."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    (snapshot / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})
    )
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in weights.items()}, str(snapshot / "open_clip_model.safetensors")
    )


IMAGES_SEED, TEXTS = 123, ["a red circle", "two squares"]


def outputs_script(pretrained: str, out: Path) -> str:
    """Script lines: create_clip(ARCH, pretrained) in the offline interpreter, its encode_image/encode_text of fixed
    inputs saved to `out`, and where its weights came from and its normalisation in `result`."""
    return (
        "import torch\n"
        f"bundle = create_clip({ARCH!r}, {pretrained!r})\n"
        f"torch.manual_seed({IMAGES_SEED})\n"
        "images = torch.randn(3, 3, bundle.image_size, bundle.image_size)\n"
        "with torch.no_grad():\n"
        "    out = {'image': bundle.model.eval().encode_image(images),\n"
        f"           'text': bundle.model.encode_text(bundle.tokenizer({TEXTS!r}))}}\n"
        f"torch.save(out, {str(out)!r})\n"
        "result = {'weights': [bundle.weights.kind, bundle.weights.name, str(bundle.weights.path)],\n"
        "          'mean': bundle.mean, 'std': bundle.std}\n"
    )


def assert_outputs_of(source: torch.nn.Module, out: Path) -> None:
    torch.manual_seed(IMAGES_SEED)
    images = torch.randn(3, 3, 48, 48)
    saved = torch.load(out, weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(saved["image"], source.encode_image(images))
        torch.testing.assert_close(saved["text"], source.encode_text(open_clip.get_tokenizer(ARCH)(TEXTS)))


def test_hub_repo_in_offline_cache_gives_the_same_model(tmp_path: Path) -> None:
    source = source_model()
    hf_home = tmp_path / "hf_home"
    model_cfg = open_clip.get_model_config(ARCH)
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    write_hub_repo(hf_home / "hub", "metadiff/tiny-clip", model_cfg, source.state_dict(), {"mean": mean, "std": std})
    write_hub_repo(hf_home / "hub", "metadiff/other-clip", {**model_cfg, "embed_dim": 64}, source.state_dict(), {})
    result = run_offline(
        outputs_script("hf-hub:metadiff/tiny-clip", tmp_path / "out.pt")
        + "result['other'] = error_of(lambda: create_clip('metadiff-tiny-vit', 'hf-hub:metadiff/other-clip'))\n"
        "result['absent'] = error_of(lambda: create_clip('metadiff-tiny-vit', 'hf-hub:metadiff/absent'))\n",
        hf_home,
    )
    kind, name, path = result["weights"]
    assert (kind, name) == ("hf-hub", "hf-hub:metadiff/tiny-clip") and path.startswith(str(hf_home / "hub"))
    assert (result["mean"], result["std"]) == (mean, std)  # the repo's normalisation
    assert_outputs_of(source, tmp_path / "out.pt")
    other_kind, other = result["other"]
    assert other_kind == "ConfigError" and "embed_dim: arch has 128, repo has 64" in other and "\n" not in other
    absent_kind, absent = result["absent"]
    assert absent_kind == "MissingInputError" and "'hf-hub:metadiff/absent'" in absent and "\n" not in absent
    assert "open_clip.create_model('hf-hub:metadiff/absent')" in absent


# --- the feature store's key ---------------------------------------------------------------------------------------


def _store_key(weights: Path) -> tuple[str, dict]:
    source = SimpleNamespace(name="synthvqa", fingerprint=lambda: "data-fp")  # all FeatureExtractor asks of it here
    extractor = FeatureExtractor(source=source, arch=ARCH, store_dir="unused-{fingerprint}", pretrained=str(weights))
    return extractor.store_fingerprint, extractor.description


def test_store_key_follows_the_weights_file_content(tmp_path: Path) -> None:
    path = tmp_path / "clip.pt"
    torch.save(source_model(seed=0).state_dict(), path)
    first, description = _store_key(path)
    assert set(description) == {"arch", "checkpoint_sha256", "data", "normalize", "precision"}  # as before the key
    torch.save(source_model(seed=1).state_dict(), path)  # other weights, same path (and same size)
    second, _ = _store_key(path)
    assert second != first
    moved = tmp_path / "elsewhere" / "renamed.pt"
    moved.parent.mkdir()
    path.rename(moved)
    assert _store_key(moved)[0] == second  # the same weights elsewhere: the same store


def test_tag_in_offline_cache_gives_the_same_model_with_the_tags_activation(tmp_path: Path) -> None:
    """open_clip's tag table names no tiny model, so the child process adds one tag for ARCH to it (public lookup
    functions, replaced); everything after the lookup (download_pretrained through the Hugging Face cache, loading,
    QuickGELU as the tag says, the tag's normalisation) is the real path that `openai` takes for ViT-L-14-336."""
    torch.manual_seed(0)
    source = open_clip.create_model(ARCH, pretrained_text=False, force_quick_gelu=True).eval()
    hf_home = tmp_path / "hf_home"
    write_hub_repo(hf_home / "hub", "metadiff/tiny-tag", open_clip.get_model_config(ARCH), source.state_dict(), {})
    tag_cfg = {"url": "", "hf_hub": "metadiff/tiny-tag/", "quick_gelu": True, "mean": [0.5] * 3, "std": [0.25] * 3}
    result = run_offline(
        "import open_clip\n"
        f"cfg = {tag_cfg!r}\n"
        f"open_clip.list_pretrained_tags_by_model = lambda arch: ['tinytag'] if arch == {ARCH!r} else []\n"
        f"open_clip.get_pretrained_cfg = lambda arch, tag: cfg if (arch, tag) == ({ARCH!r}, 'tinytag') else {{}}\n"
        + outputs_script("tinytag", tmp_path / "out.pt"),
        hf_home,
    )
    kind, name, path = result["weights"]
    assert (kind, name) == ("tag", "tinytag") and path.startswith(str(hf_home / "hub"))
    assert (result["mean"], result["std"]) == (tag_cfg["mean"], tag_cfg["std"])
    assert_outputs_of(source, tmp_path / "out.pt")
    gelu = source_model()  # the same weights with the architecture's own GELU compute other features
    gelu.load_state_dict(source.state_dict())
    with pytest.raises(AssertionError):
        assert_outputs_of(gelu, tmp_path / "out.pt")
