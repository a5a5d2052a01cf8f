"""How a zoo splits the meta-train classes: model k owns classes [k*m, (k+1)*m) (the original's model(i) = i // m,
spec §2.2). The map global class -> (model, local index) is what the pseudo-data stage labels with."""

from __future__ import annotations

from metadiff.config import ConfigError


def zoo_partition(n_classes: int, n_models: int, classes_per_model: int) -> list[list[int]]:
    """Class indices (within meta-train) owned by each model; disjoint, in order."""
    if n_models < 1 or classes_per_model < 1:
        raise ConfigError(f"zoo: n_models={n_models} and classes_per_model={classes_per_model} must be >= 1")
    if n_models * classes_per_model > n_classes:
        raise ConfigError(
            f"zoo: {n_models} models x {classes_per_model} classes = "
            f"{n_models * classes_per_model} > the {n_classes} meta-train classes"
        )
    return [list(range(k * classes_per_model, (k + 1) * classes_per_model)) for k in range(n_models)]


def class_map(partition: list[list[int]]) -> list[dict[str, int]]:
    """Pseudo class i -> {class (meta-train index), model, local} for every class the zoo covers."""
    return [{"class": c, "model": k, "local": j} for k, classes in enumerate(partition) for j, c in enumerate(classes)]
