"""Build open_clip models with pretrained weights the way researchers have them (config key `model.pretrained`).

`pretrained` is one of
    None                   random init (e.g. the small CPU model that the `clip_synthvqa` stage trains)
    an open_clip tag       e.g. `openai`, `laion2b_s32b_b82k`: one of open_clip.list_pretrained_tags_by_model(arch)
    `hf-hub:org/repo`      an open_clip model repo (open_clip_config.json + weights) on the Hugging Face Hub
    a local file           its format is detected from its bytes, not its name:
                           - an open_clip state dict (torch.save; also `{"state_dict": ...}` training checkpoints and
                             `module.`-prefixed keys), read with torch.load(weights_only=True);
                           - safetensors, read with safetensors.torch.load_file;
                           - one of OpenAI's original TorchScript archives (e.g. `ViT-L-14-336px.pt`). This is the ONE
                             format that cannot be read with weights_only: torch.jit.load runs the archive's
                             TorchScript loader, so only use archives from a source you trust.
Tags and hub repos are resolved by open_clip through the Hugging Face cache ($HF_HOME/hub). With HF_HUB_OFFLINE=1
nothing is downloaded, and weights that are not cached are reported in one line saying how to fetch them, before
any model is built. Local files are never downloaded. A corrupt file, a file that does not fit the architecture and
an unknown tag are each reported in one line naming the file or tag and what was expected.

`arch` always names the architecture: its tokenizer and image size come from it, and the weights must fit it (the
image normalisation too, unless a tag or hub repo brings its own, e.g. SigLIP's 0.5).
Tags whose weights were trained with QuickGELU (e.g. `openai`) get it whatever the arch name; OpenAI archives are
rebuilt by open_clip from their own state dict (QuickGELU, as OpenAI trained them) and checked against `arch`.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import huggingface_hub
import open_clip
import open_clip.model
import safetensors.torch
import torch

from metadiff.config import ConfigError
from metadiff.errors import InputFileError, MissingInputError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
HF_HUB_PREFIX = "hf-hub:"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")  # only to tell a missing file from a tag
OPENAI_ARCHIVE_SCALARS = ("input_resolution", "context_length", "vocab_size")  # ints stored as tensors in the archive
WeightsKind = Literal["random", "tag", "hf-hub", "file"]
FileFormat = Literal["torchscript", "safetensors", "torch"]
_registered = False

CLIP_WEIGHTS = "open_clip_model.pt"  # the open_clip state dict a `clip` artifact holds (stages.clip_pretrain)


def register_model_configs() -> None:
    """Make metadiff's own architectures (e.g. `metadiff-tiny-vit`) known to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


@dataclass(frozen=True)
class Weights:
    """Where a model's weights came from: `name` is the tag, hub id or path as configured, `path` the local file that
    was read (in the Hugging Face cache for tags and hub repos; None for random init)."""

    kind: WeightsKind
    name: str | None
    path: Path | None


@dataclass
class ClipBundle:
    """A model with the pieces needed to feed it: tokenizer and image normalisation, and where its weights came from."""

    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    image_size: int
    mean: tuple[float, ...]  # per image channel (RGB: three), as `image_preprocessing` reads them
    std: tuple[float, ...]
    arch: str
    weights: Weights


def create_clip(arch: str, pretrained: str | Path | None = None) -> ClipBundle:
    """Instantiate `arch` (any open_clip architecture) with the weights named by `pretrained` (see the module doc)."""
    check_arch(arch)
    weights = resolve_weights(arch, pretrained)  # before any model is built: a missing download fails fast
    if weights.kind == "random":
        model = _random_model(arch)
    elif weights.kind == "tag":
        model = _model_from_tag(arch, str(weights.name), _path(weights))
    else:
        model = load_weights_file(arch, _path(weights), what=_describe(weights))
    size, mean, std = image_preprocessing(arch, pretrained)
    return ClipBundle(
        model=model,
        tokenizer=open_clip.get_tokenizer(arch),
        image_size=size,
        mean=mean,
        std=std,
        arch=arch,
        weights=weights,
    )


def check_arch(arch: str) -> None:
    register_model_configs()
    if arch not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip architecture '{arch}' (see open_clip.list_models())")


def _path(weights: Weights) -> Path:
    assert weights.path is not None, weights
    return weights.path


def _describe(weights: Weights) -> str:
    """How an error names the weights: the file, and for hub repos the repo it was resolved from."""
    if weights.kind == "file":
        return f"weights file {weights.path}"
    return f"weights file {weights.path} (model.pretrained={weights.name})"


# --- what `pretrained` names ---------------------------------------------------------------------------------------


def weights_kind(arch: str, pretrained: str | Path | None) -> WeightsKind:
    """Classify without I/O beyond a file check: hub prefix, then open_clip tag (as open_clip orders them), then file.

    A value that is neither an existing file nor a tag is a missing file if it looks like a path, else a bad tag."""
    if pretrained is None:
        return "random"
    value = str(pretrained)
    if value.startswith(HF_HUB_PREFIX):
        return "hf-hub"
    if not isinstance(pretrained, Path) and value in open_clip.list_pretrained_tags_by_model(arch):
        return "tag"
    path = Path(value).expanduser()
    if path.is_file():
        return "file"
    if (
        isinstance(pretrained, Path)
        or "/" in value
        or "\\" in value
        or value.startswith(("~", "."))
        or path.suffix.lower() in WEIGHT_SUFFIXES
    ):
        raise MissingInputError(
            f"weights file not found: {path} (model.pretrained must be an existing local file, an open_clip tag of "
            f"'{arch}' or hf-hub:org/repo; no download is attempted for files)"
        )
    tags = open_clip.list_pretrained_tags_by_model(arch)
    raise ConfigError(
        f"model.pretrained='{value}' is not a pretrained tag of '{arch}' nor an existing file; valid tags for "
        f"'{arch}': {', '.join(tags) if tags else 'none (open_clip has no pretrained weights for it)'}; "
        "or use hf-hub:org/repo or a path to a local weights file"
    )


def resolve_weights(arch: str, pretrained: str | Path | None) -> Weights:
    """The local file holding the weights: tags and hub repos through open_clip and the Hugging Face cache."""
    kind = weights_kind(arch, pretrained)
    if kind == "random":
        return Weights("random", None, None)
    value = str(pretrained)
    if kind == "file":
        from metadiff.features.pinned import check_if_pinned  # (pinned imports the store: not at module import)

        check_if_pinned(Path(value).expanduser())
        return Weights("file", value, Path(value).expanduser())
    if kind == "tag":
        cfg = open_clip.get_pretrained_cfg(arch, value)
        howto = f"open_clip.create_model('{arch}', pretrained='{value}')"
        what = f"'{value}' of '{arch}' ({cfg['hf_hub'].rstrip('/')})"
        path = _from_hub_cache(lambda: open_clip.download_pretrained(cfg), what, howto)
        return Weights("tag", value, path)
    model_id = value[len(HF_HUB_PREFIX) :]
    _check_hub_architecture(arch, model_id)  # from the small config file, before fetching the weights
    path = _from_hub_cache(
        lambda: open_clip.pretrained.download_pretrained_from_hf(model_id),
        f"'{value}'",
        f"open_clip.create_model('{value}')",
    )
    return Weights("hf-hub", value, path)


def _from_hub_cache(fetch: Callable[[], str], what: str, howto: str) -> Path:
    """Run an open_clip download, which reads the Hugging Face cache first; turn "not there" into one line."""
    try:
        return Path(fetch())
    except (OSError, RuntimeError, ValueError) as err:  # hub, HTTP and offline errors are OSError subclasses
        hf_cache = huggingface_hub.constants.HF_HUB_CACHE
        why = (
            "and HF_HUB_OFFLINE=1 forbids downloading"
            if huggingface_hub.is_offline_mode()
            else f"and could not be downloaded ({type(err).__name__}: {_one_line(str(err))})"
        )
        raise MissingInputError(
            f"pretrained weights {what} are not in the Hugging Face cache {hf_cache} "
            f'{why}: run once online: python -c "import open_clip; {howto}" (or set HF_HOME to a cache that has '
            "them), or set model.pretrained to a local weights file"
        ) from None


def _hub_config(model_id: str) -> dict[str, Any]:
    """The repo's open_clip_config.json (model_cfg + preprocess_cfg), from the Hugging Face cache."""
    path = _from_hub_cache(
        lambda: open_clip.pretrained.download_pretrained_from_hf(model_id, filename="open_clip_config.json"),
        f"'{HF_HUB_PREFIX}{model_id}'",
        f"open_clip.create_model('{HF_HUB_PREFIX}{model_id}')",
    )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputFileError(
            f"open_clip config {path} of '{HF_HUB_PREFIX}{model_id}' is not valid JSON ({_one_line(str(err))})"
        ) from None
    if not isinstance(config, dict) or "model_cfg" not in config:
        raise InputFileError(f"open_clip config {path} of '{HF_HUB_PREFIX}{model_id}' has no 'model_cfg' entry")
    return config


def _check_hub_architecture(arch: str, model_id: str) -> None:
    """A hub repo defines its own architecture; it must be `arch`, which the tokenizer and the data loaders use."""
    differences = _differences(open_clip.get_model_config(arch), _hub_config(model_id)["model_cfg"])
    if differences:
        raise ConfigError(
            f"model.pretrained={HF_HUB_PREFIX}{model_id} holds another architecture than model.arch='{arch}' "
            f"({'; '.join(differences[:3])}); set model.arch to the architecture in the repo's open_clip_config.json"
        )


def _differences(ours: Mapping[str, Any], theirs: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Config entries that differ, as 'key: arch has A, repo has B' (nested keys dotted)."""
    out = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key, "<absent>"), theirs.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, list | tuple) and isinstance(b, list | tuple) and list(a) == list(b)):
            out.append(f"{prefix}{key}: arch has {a!r}, repo has {b!r}")
    return out


def _one_line(text: str, limit: int = 200) -> str:
    """An error message from a library as one line of plain text (no newlines, no terminal colour codes)."""
    line = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --- building the model --------------------------------------------------------------------------------------------


def _random_model(arch: str) -> torch.nn.Module:
    return open_clip.create_model(arch, pretrained=None, pretrained_text=False, output_dict=True)


def _model_from_tag(arch: str, tag: str, path: Path) -> torch.nn.Module:
    """open_clip loads its own tags (it knows their conversions); QuickGELU follows the weights, not the arch name,
    since a model built without the activation its weights were trained with computes different features."""
    quick_gelu = bool(open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False))
    try:  # the resolved file, not the tag: open_clip would otherwise ask the hub a second time
        return open_clip.create_model(
            arch, pretrained=str(path), pretrained_text=False, output_dict=True, force_quick_gelu=quick_gelu
        )
    except (RuntimeError, OSError, ValueError, KeyError) as err:
        raise InputFileError(
            f"weights file {path} of tag '{tag}' for '{arch}' could not be loaded "
            f"({type(err).__name__}: {_one_line(str(err))}); delete it from the Hugging Face cache "
            "and fetch it again"
        ) from None


def detect_format(path: Path) -> FileFormat:
    """The weights format from the file's bytes: TorchScript is a zip with `constants.pkl`/`code/` entries,
    safetensors starts with an 8-byte little-endian header length followed by JSON, anything else goes to torch.load
    (which then reports a corrupt file)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "torch"
        inner = [name.split("/", 1)[-1] for name in names]
        return "torchscript" if any(n == "constants.pkl" or n.startswith("code/") for n in inner) else "torch"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
        return "safetensors"
    return "torch"


def load_weights_file(arch: str, path: Path, what: str | None = None) -> torch.nn.Module:
    """`arch` with the weights of a local file in any of the three formats; `what` names it in errors."""
    what = what or f"weights file {path}"
    fmt = detect_format(path)
    if fmt == "torchscript":
        return _model_from_openai_archive(arch, path, what)
    state_dict = read_state_dict(path, fmt, what)
    model = _random_model(arch)
    problem = _fit_problem(_shapes(model.state_dict()), _shapes(state_dict))
    if problem:
        raise InputFileError(f"{what} ({_FORMAT_NAMES[fmt]}) does not fit architecture '{arch}': {problem}")
    model.load_state_dict(state_dict, strict=True)
    return model


_FORMAT_NAMES = {
    "torchscript": "OpenAI TorchScript archive",
    "safetensors": "safetensors file",
    "torch": "torch checkpoint",
}


def read_state_dict(path: Path, fmt: FileFormat, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a state-dict file, never unpickling code: torch.load(weights_only=True) or safetensors.
    Unwraps `{"state_dict": ...}` and strips `module.` (DataParallel) prefixes, as open_clip.load_checkpoint does."""
    try:
        if fmt == "safetensors":
            loaded: Any = safetensors.torch.load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated/corrupt files raise many types (pickle, zip, safetensors)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if isinstance(err, pickle.UnpicklingError) and found:  # torch's own advice (weights_only=False) is not ours
            raise InputFileError(
                f"{what} holds pickled Python objects ({found.group(1)}), which are never unpickled "
                "here; save the model's state_dict() instead"
            ) from None
        detail = (
            "refused by the weights_only unpickler" if isinstance(err, pickle.UnpicklingError) else _one_line(str(err))
        )
        raise InputFileError(
            f"{what} is not a readable {_FORMAT_NAMES[fmt]}, truncated or corrupt ({type(err).__name__}: {detail})"
        ) from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if (
        not isinstance(loaded, Mapping)
        or not loaded
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items())
    ):
        raise InputFileError(
            f"{what} holds a {type(loaded).__name__} that is not a state dict of tensors "
            "(expected an open_clip model's state_dict())"
        )
    if all(k.startswith("module.") for k in loaded):
        loaded = {k[len("module.") :]: v for k, v in loaded.items()}
    return dict(loaded)


def _model_from_openai_archive(arch: str, path: Path, what: str) -> torch.nn.Module:
    """OpenAI's TorchScript archive rebuilt by open_clip from its state dict, as open_clip.load_openai_model does
    (fp32). NOT weights_only: torch.jit.load is the only way to open these archives; trust the file's source."""
    try:
        archive = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - corrupt archives raise RuntimeError or zip errors
        raise InputFileError(
            f"{what} is not a readable OpenAI TorchScript archive, truncated or corrupt "
            f"({type(err).__name__}: {_one_line(str(err))})"
        ) from None
    state_dict = {k: v for k, v in archive.state_dict().items() if k not in OPENAI_ARCHIVE_SCALARS}
    del archive
    needed = ("text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight")
    absent = [k for k in needed if k not in state_dict]
    if not ("visual.proj" in state_dict or "visual.attnpool.positional_embedding" in state_dict):
        absent.append("visual.proj")  # a ViT's, or a ResNet's attention pool
    if absent:
        raise InputFileError(
            f"{what} is a TorchScript archive without OpenAI CLIP's layout (no '{absent[0]}'); "
            f"expected one of OpenAI's CLIP archives for '{arch}'"
        )
    problem = _fit_problem(_architecture_shapes(arch), _shapes(state_dict))
    if problem:
        raise InputFileError(f"{what} ({_FORMAT_NAMES['torchscript']}) does not fit architecture '{arch}': {problem}")
    model = open_clip.model.build_model_from_openai_state_dict(state_dict, cast_dtype=None).float()
    model.output_dict = True
    return model


def _architecture_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of `arch`, built on the meta device: no memory, no init cost."""
    with torch.device("meta"):
        model = open_clip.create_model(arch, pretrained=None, pretrained_text=False, device="meta")
    return _shapes(model.state_dict())


def _shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _fit_problem(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> str | None:
    """What keeps `found` from loading strictly into `expected`, in a few words (None if it fits)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and expected[k] != found[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. '{missing[0]}')")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. '{unexpected[0]}')")
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} wrong shapes (e.g. '{k}' is {list(found[k])} in the file, {list(expected[k])} "
            "in the architecture)"
        )
    return "; ".join(parts) or None


# --- what feeds the model ------------------------------------------------------------------------------------------


def image_preprocessing(
    arch: str, pretrained: str | Path | None = None
) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Input size and normalisation of `arch`'s image tower (no model is built). Tags and hub repos carry their own
    normalisation (e.g. SigLIP's 0.5), which overrides the architecture's; local files carry none."""
    check_arch(arch)
    cfg = open_clip.get_model_config(arch)
    vision = cfg["vision_cfg"]
    pp = {
        **vision.get("preprocess_cfg", {}),
        **cfg.get("preprocess_cfg", {}),
        **_weights_preprocessing(arch, pretrained),
    }
    size = pp.get("size", vision.get("image_size", 224))
    size = size[0] if isinstance(size, list | tuple) else size
    return (
        int(size),
        tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        tuple(pp.get("std", open_clip.OPENAI_DATASET_STD)),
    )


def _weights_preprocessing(arch: str, pretrained: str | Path | None) -> dict[str, Any]:
    kind = weights_kind(arch, pretrained)
    if kind == "tag":
        cfg = open_clip.get_pretrained_cfg(arch, str(pretrained))
    elif kind == "hf-hub":
        cfg = _hub_config(str(pretrained)[len(HF_HUB_PREFIX) :]).get("preprocess_cfg", {})
    else:
        return {}
    return {k: cfg[k] for k in ("size", "mean", "std") if k in cfg}


def context_length(arch: str) -> int:
    register_model_configs()
    cfg = open_clip.get_model_config(arch) or {}
    return int(cfg.get("text_cfg", {}).get("context_length", 77))
