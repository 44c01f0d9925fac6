"""Commands that run whole jobs: run (pipeline files) and demo."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from ssv2prep.cli.app import main, out

# ----------------------------------------------------------------------------------------------------------- demo


@main.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Output folder: synthetic data, downloads, shards, runs, report.md.",
)
@click.option("--small", is_flag=True, help="A very small run (for tests and a quick look); targets do not apply.")
@click.option("--set", "overrides", multiple=True, help="Override a pipeline option: STAGE.OPTION=value.")
def demo(out_dir: Path, small: bool, overrides: tuple[str, ...]) -> None:
    """Run the main job on built-in synthetic data, end to end through the real code paths.

    synth --package, served from a loopback HTTP server, download, extract, shard, verify; then a TSM and a TSN of
    the same small backbone are trained, evaluated on validation and on test, and compared (pipelines/demo.toml).

    \b
    Example:
      ssv2prep demo --out demo-out
    """
    from ssv2prep.demo import run_demo

    log = logging.getLogger("ssv2prep.demo")
    report, _ = run_demo(
        out_dir,
        small=small,
        overrides=list(overrides),
        on_stage=lambda stage, status: log.info("stage %s (%s)", stage.key, status),
    )
    text = report.read_text()
    out.print(text.split("\n\n![comparison]")[0], markup=False)
    out.print(f"report: {report}")


# ------------------------------------------------------------------------------------------------------------ run


@main.command("run")
@click.argument("pipeline_file", metavar="PIPELINE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, help="Override an option: STAGE.OPTION=value (repeatable).")
@click.option("--from", "from_stage", default=None, help="Re-run from this stage on.")
@click.option("--only", default=None, help="Run only this stage.")
@click.option("--dry-run", is_flag=True, help="Print the plan (stages, commands, what is done) and stop.")
def run_cmd(
    pipeline_file: Path, overrides: tuple[str, ...], from_stage: str | None, only: str | None, dry_run: bool
) -> None:
    """Run a pipeline: its stages in order, skipping the ones already finished.

    PIPELINE is a pipeline file, or the name of a shipped one (the repository's pipelines/ folder, also in the
    installed package): demo, ssv2-tsm-r50-8f, ...; an unknown name lists them all.

    \b
    Examples:
      ssv2prep run ssv2-tsm-r50-8f --set download.base_url=https://example.org/ssv2
      ssv2prep run ssv2-shift-study --dry-run
      ssv2prep run demo --only train@tsm --set train.epochs=2
      ssv2prep run my-pipeline.toml
    """
    import shlex

    from ssv2prep.pipeline import load_pipeline, run_pipeline, select_stages, stage_status

    pipeline = load_pipeline(pipeline_file, list(overrides))
    if dry_run:
        out.print(f"pipeline {pipeline.name}: work folder {pipeline.work_dir}")
        for stage in select_stages(pipeline, from_stage=from_stage, only=only):
            status = stage_status(pipeline, stage)
            out.print(f"  [{status:>7}] {stage.key}: {shlex.join(stage.argv())}", soft_wrap=True, markup=False)
        return
    log = logging.getLogger("ssv2prep.run")

    def on_stage(stage: Any, status: str) -> None:
        forced = from_stage is not None or only is not None
        verb = "skipping (done)" if status == "done" and not forced else f"running ({status})"
        log.info("stage %s: %s", stage.key, verb)

    results = run_pipeline(pipeline, from_stage=from_stage, only=only, on_stage=on_stage)
    if pipeline.variants and any(s.variant for s, _ in results):
        from ssv2prep.sweep import compare_variants

        compare_variants(pipeline.run_dir(), pipeline.variants)
        out.print((pipeline.run_dir() / "comparison.md").read_text())
    ran = sum(1 for _, what in results if what == "ran")
    out.print(f"run: {ran} stages ran, {len(results) - ran} already done; outputs in {pipeline.work_dir}")
