"""The two markdown tables `make gpu-check` prints (and writes beside its JSON): the sections, and the projection."""

from __future__ import annotations

from typing import Any

# section -> (what its throughput counts, the key holding it)
THROUGHPUT = {
    "clip_throughput": ("images/s", "images_per_s"),
    "features_pipeline": ("images/s", "images_per_s"),
    "hnet_step": ("tasks/s", "tasks_per_s"),
    "adm_step": ("images/s", "images_per_s"),
    "guided_ddim": ("images/s", "images_per_s"),
    "diffusionmix_step": ("images/s", "images_per_s"),
}


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/m"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/m"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def size(n_bytes: float | None) -> str:
    if n_bytes is None:
        return "n/m"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes:.0f} B"


def _detail(name: str, entry: dict[str, Any]) -> str:
    """The one figure of a section that is not a throughput (a ratio, an accuracy difference, a checkpoint)."""
    if name == "environment":
        return (
            f"{entry.get('device_name')}; torch {entry.get('torch')}, CUDA {entry.get('cuda')}, cuDNN "
            f"{entry.get('cudnn')}, NCCL {entry.get('nccl')}, bf16 {entry.get('bf16_supported')}, "
            f"{entry.get('cpu_cores_usable')} cores"
        )
    if name == "clip_throughput":
        return (
            f"{entry.get('arch')} image tower {_num(entry.get('image_tower_params'))} params, {entry.get('precision')}"
        )
    if name == "features_pipeline":
        runs = ", ".join(
            f"{w} workers {_num(r.get('over_bare'), 2)}"
            for w, r in (entry.get("workers") or {}).items()
            if "images_per_s" in r
        )
        return f"pipeline / bare: {runs}"
    if name == "hnet_step":
        acc = entry.get("bf16_vs_fp32") or {}
        return (
            f"{_num(entry.get('learner_params'))} params, {entry.get('adapter_weights')} adapter weights, "
            f"{entry.get('tasks')} tasks x {entry.get('inner_steps')} inner steps; bf16 - fp32: loss "
            f"{_num(acc.get('meta_loss_abs_diff'))}, logits max {_num(acc.get('logits_max_abs_diff'))}"
        )
    if name == "vqa_chain":
        stages = entry.get("stages") or {}
        return "; ".join(f"{k} {duration(v.get('run_seconds'))}" for k, v in stages.items())
    if name == "adm_step":
        ckpt = entry.get("checkpoint") or {}
        bf16, fp32 = (entry.get("bf16-mixed") or {}), (entry.get("32-true") or {})
        return (
            f"{_num(entry.get('params'))} params, batch {entry.get('batch_size')}: fp32 "
            f"{_num(fp32.get('seconds_per_step'))} s/step, bf16 {_num(bf16.get('seconds_per_step'))} s/step; "
            f"checkpoint {size(ckpt.get('bytes'))} in {_num(ckpt.get('seconds'))} s"
        )
    if name == "guided_ddim":
        bf16 = entry.get("bf16-mixed") or {}
        return (
            f"{entry.get('members')} members in memory, batch {entry.get('batch_size')} x "
            f"{entry.get('ddim_steps')} steps; fp32 (the stage today), bf16 {_num(bf16.get('images_per_s'))} "
            "images/s"
        )
    if name == "diffusionmix_step":
        return f"batch {entry.get('batch_size')} x {entry.get('unet_passes')} ancestral steps from t = {entry.get('t')}"
    if name == "nccl_round":
        return (
            f"{entry.get('images')} images, equal to 1 rank: {entry.get('equal_to_one_rank')}, 2 ranks / 1 rank "
            f"time {_num(entry.get('two_ranks_over_one_time'))}"
        )
    return ""


def sections_table(report: dict[str, Any]) -> str:
    device = report.get("device")
    memory_key = "peak_cuda_mib" if device == "cuda" else "peak_rss_mib"
    memory_name = "peak CUDA memory" if device == "cuda" else "peak process RSS (run so far)"
    lines = [f"| section | status | seconds | throughput | {memory_name} | details |", "|---|---|---|---|---|---|"]
    for name, entry in (report.get("sections") or {}).items():
        status = entry["status"]
        if status == "failed":
            status = f"failed: {entry.get('error')}"
        elif status == "skipped":
            status = f"skipped: {entry.get('reason')}"
        unit, key = THROUGHPUT.get(name, ("", ""))
        value = entry.get(key) if key else None
        throughput = f"{_num(value)} {unit}" if value is not None else ""
        memory = entry.get(memory_key)
        detail = _detail(name, entry) if entry["status"] == "ok" or value is not None else ""
        lines.append(
            f"| {name} | {status} | {_num(entry.get('seconds'))} | {throughput} | "
            f"{size(memory * 2**20) if memory else ''} | {detail} |"
        )
    return "\n".join(lines)


def projection_table(projection: dict[str, Any]) -> str:
    device = projection.get("device")
    caption = (
        "Projection on this GPU"
        if device == "cuda"
        else "Projection on this CPU (computed as on a GPU, from the CPU's own measurements: useless in absolute "
        "terms, it checks the projection runs)"
    )
    lines = [
        f"{caption}: every stage at its configured budget (one run; `runs` = how many the chain needs).",
        "",
        "| stage | runs | time (one run) | checkpoint writes (bytes) | checkpoint I/O (share) | disk | memory | "
        "basis | not measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for chain in ("chain_a", "chain_b"):
        for row in projection.get(chain, []):
            share = row.get("io_share")
            io = duration(row.get("checkpoint_seconds")) + (f" ({share:.1%})" if share is not None else "")
            memory = row.get("memory_mib")
            written = row.get("checkpoint_bytes_written")
            writes = _num(row.get("checkpoint_writes")) + (f" ({size(written)})" if written else "")
            lines.append(
                f"| {row['stage']} | {row['runs']} | {duration(row.get('seconds'))} | "
                f"{writes} | {io} | {size(row.get('disk_bytes'))} | "
                f"{size(memory * 2**20) if memory else 'n/m'} | {row['basis']} | "
                f"{', '.join(row.get('missing') or []) or '-'} |"
            )
    totals = projection.get("totals", {})
    lines += [
        "",
        f"Chain A on one device: {duration(totals.get('chain_a_one_device_s'))} (target on one H100: "
        f"{duration(projection['targets']['chain_a_one_gpu_s'])}). Chain B on one device: "
        f"{duration(totals.get('chain_b_one_device_s'))}; on 8: "
        f"{duration(totals.get('chain_b_eight_devices_s'))} ({totals.get('chain_b_eight_devices_basis')}; "
        f"target on 8 H100s: {duration(projection['targets']['chain_b_eight_gpus_s'])}).",
    ]
    if "meets" in projection:
        lines.append(f"Targets met: {projection['meets']}.")
    return "\n".join(lines)
