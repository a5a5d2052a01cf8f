"""`python -m metadiff.bench.gpu_check [--quick] [--out DIR]`: run the sections in order, rewriting
`<out>/gpu_check.json` after each (a killed run still reports), then project both real chains and print (and write
to `<out>/gpu_check.md`) the sections' table and the projection's.

Sections: environment; ViT-L-14-336 on preloaded tensors; the features_vqa pipeline against it at several worker
counts; a real-size HNET meta-step (bf16 vs fp32 on one batch); chain A through the run loop at token budgets; the
ADM UNet's training step in bf16 and fp32 and its checkpoint; a guided DDIM batch of dfml's pseudo data; a
DiffusionMix call; with two or more GPUs a 2-rank NCCL round equal to one rank's."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from metadiff.bench.gpu_check.chain import section_chain
from metadiff.bench.gpu_check.clip import section_clip, section_features
from metadiff.bench.gpu_check.config import load_settings
from metadiff.bench.gpu_check.context import Context
from metadiff.bench.gpu_check.environment import environment
from metadiff.bench.gpu_check.fewshot import section_hnet
from metadiff.bench.gpu_check.projection import project
from metadiff.bench.gpu_check.runner import Section, run_sections
from metadiff.bench.gpu_check.tables import projection_table, sections_table
from metadiff.bench.gpu_check.unet import section_unet
from metadiff.bench.gpu_check.zoo import section_diffusionmix, section_guided, section_nccl
from metadiff.logs import quiet_third_party
from metadiff.utils.io import write_json

REPORT, TABLES = "gpu_check.json", "gpu_check.md"


def sections(ctx: Context) -> list[Section]:
    shared: dict[str, Any] = {}
    return [
        Section("environment", lambda r: environment(ctx.device, ctx.settings.work)),
        Section("clip_throughput", lambda r: section_clip(ctx)),
        Section(
            "features_pipeline",
            lambda r: section_features(
                ctx, r["clip_throughput"] if r.get("clip_throughput", {}).get("status") == "ok" else None
            ),
        ),
        Section("hnet_step", lambda r: section_hnet(ctx)),
        Section("vqa_chain", lambda r: section_chain(ctx)),
        Section("adm_step", lambda r: section_unet(ctx)),
        Section("guided_ddim", lambda r: section_guided(ctx, shared)),
        Section("diffusionmix_step", lambda r: section_diffusionmix(ctx, shared)),
        Section("nccl_round", lambda r: section_nccl(ctx)),
    ]


def run(
    quick: bool, out: Path, work: Path | None = None, device: str | None = None, only: list[str] | None = None
) -> dict[str, Any]:
    """Run the check into `out` (`work`: where generated data and outputs go, a temporary folder by default);
    `only`: a subset of the sections (the others are not run; the projection marks what they would measure)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="metadiff-gpu-check-", dir=work) as tmp:
        from metadiff.run import train  # the stage runner: entry points hand it down (tests/test_layers.py)

        ctx = Context(load_settings(quick, device, Path(tmp)), runner=train)
        report: dict[str, Any] = {"mode": ctx.settings.mode, "device": device, "started": time.time()}
        chosen = [s for s in sections(ctx) if only is None or s.name in only]
        start = time.perf_counter()
        run_sections(chosen, report, out / REPORT)
        report["sections_seconds"] = time.perf_counter() - start
        try:
            report["projection"] = project(ctx.settings, report["sections"], lambda experiment: ctx.compose(experiment))
        except Exception as error:  # noqa: BLE001 - the sections' results stand without it
            from metadiff.bench.gpu_check.runner import one_line

            logging.getLogger(__name__).exception("projection failed")
            report["projection"] = {"error": one_line(error)}
        write_json(out / REPORT, report, sort_keys=False)
    tables = [
        f"## make gpu-check{' --quick' if quick else ''} on {device} "
        f"({report['sections'].get('environment', {}).get('device_name', '')})",
        "",
        sections_table(report),
    ]
    if "error" in report["projection"]:
        tables += ["", f"projection failed: {report['projection']['error']}"]
    else:
        tables += ["", projection_table(report["projection"])]
    text = "\n".join(tables) + "\n"
    (out / TABLES).write_text(text)
    print(text, flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="tiny counts on the CPU (CI): conf/gpu_check.yaml sizes.quick"
    )
    parser.add_argument("--out", type=Path, default=Path("bench"), help="where gpu_check.json/.md go")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="parent of the temporary work folder (generated data, outputs, ~2 GB of weights; default: $TMPDIR)",
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--only", nargs="*", default=None, help="run only these sections")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s")
    quiet_third_party()
    report = run(args.quick, args.out, args.work, args.device, args.only)
    failed = [name for name, entry in report["sections"].items() if entry["status"] == "failed"]
    if failed:
        raise SystemExit(f"gpu-check: {len(failed)} section(s) failed: {', '.join(failed)} (see {args.out / REPORT})")


if __name__ == "__main__":
    main()
