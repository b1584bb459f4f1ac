"""Rankings in the labelling store → a preference dataset TRL trains on unchanged.

    align export --config configs/quickstart/export.yaml
    align export min_agreement=0.6 ties=margin0 jsonl=true
    align export combine=dawid_skene min_posterior=0.6

Writes <run.dir>/preferences/: a `datasets.DatasetDict` (train/test, split by prompt) with
TRL's `prompt`/`chosen`/`rejected` columns in conversational form plus provenance columns
(task, annotators, agreement, margin, votes each way, source checkpoint; with combine=dawid_skene the
posterior `p_chosen` and a `weight`; `flag`: the flags of the task's rankings, "" for none, plus
rejected_unsafe / chosen_unsafe where a side is a reply flagged unsafe). Each annotator's estimated reliability (accuracy, interval,
vote weight) goes to summary.json, the manifest and W&B (a table). The rules that turn K-wise rankings
from several annotators into pairs live in `align/labeling/export.py` (and docs/labeling.md). It never
deletes what it did not write: an output folder that is not a previous export is refused.
The labelling app's Export button runs this same recipe (align.cli.export_for_label_app).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from align import StageError, refuse_several_processes, report
from align.artifacts import print_done, stage_command, stage_dir, store_url, write_manifest
from align.config import ExportStageConfig, save_config, to_dict
from align.preflight import check_stage
from align.tracking import Tracker, log_artifact

log = logging.getLogger(__name__)

RELIABILITY_COLUMNS = ("annotator", "accuracy", "interval_low", "interval_high", "weight", "judgements", "checked",
                       "gold", "gold_accuracy")


def reliability_rows(people: dict[str, dict]) -> list[list]:
    """The per-annotator reliability table as rows of RELIABILITY_COLUMNS (W&B's table, the log)."""
    return [[name, r["accuracy"], r["interval"][0], r["interval"][1], r["weight"], r["judgements"], r["checked"],
             r["gold"], r.get("gold_accuracy")] for name, r in people.items()]


def main(cfg: ExportStageConfig) -> Path:
    from align.labeling.export import ExportError, check_batches, export_preferences
    from align.labeling.store import Store

    refuse_several_processes("export", "every process would write the same preferences folder")
    check_stage("export", cfg)  # the store and the paths before anything is written
    out = Path(cfg.output) if cfg.output else stage_dir(cfg.run.dir, "export")
    store = Store(store_url(cfg.store, cfg.run.dir))
    try:
        check_batches(store, cfg.batches)
    except ExportError as err:
        raise StageError(str(err)) from None
    label_first = f"(`align label --run-dir {cfg.run.dir}`, or `--simulate support_style`)"
    if not any(b["rankings"] for b in store.batch_counts() if not cfg.batches or b["batch"] in cfg.batches):
        raise StageError(f"the labelling store has no submitted rankings yet: label first {label_first}")
    # Rankings that make no pair: the A/B verdicts of align eval human=true (its board reads them) and gold answers
    # (they score the annotators); with only these the refusal below blamed ties or min_agreement
    if not any(r["kind"] == "ranking" and not r["is_gold"] and not str(r["batch"]).startswith("eval-")
               for r in store.submitted_rankings() if not cfg.batches or r["batch"] in cfg.batches):
        raise StageError("the only submitted rankings are A/B verdicts of align eval human=true (batches eval-..., "
                         "read by align eval, not exported) or rankings of gold tasks (they score the annotators): "
                         f"no ranking to make pairs of; rank a batch of align sample first {label_first}")

    def finish(folder: Path, summary: dict) -> None:  # into the new export, before it replaces the old one
        save_config(cfg, folder / "config.yaml")
        write_manifest(folder, stage="export", config=to_dict(cfg), base_model=None,
                       parents={"store": store_url(cfg.store, cfg.run.dir)},
                       metrics={k: v for k, v in summary.items() if isinstance(v, (int, float))},
                       summary=summary, rankings_seen=summary["rankings_read"]["count"],
                       # the read the dataset was built from: the pipeline compares it to know whether to export again
                       rankings_sha256=summary["rankings_read"]["sha256"])

    # Opened before the export, whose manifest records it (resumed: no folder is made before the export's own)
    tracker = Tracker(cfg.run, "export", out, to_dict(cfg), resume=True)
    try:
        summary = export_preferences(
            store, out, batches=cfg.batches, ties=cfg.ties, combine=cfg.combine, min_agreement=cfg.min_agreement,
            min_posterior=cfg.min_posterior, test_fraction=cfg.test_fraction, seed=cfg.seed, jsonl=cfg.jsonl,
            finish=finish, reliability_batches=cfg.reliability_batches, flagged=cfg.flagged,
        )
    except ExportError as err:
        raise StageError(str(err)) from None
    if not summary.get("pairs"):
        dropped = ", ".join(f"{k.removeprefix('dropped_').replace('_', ' ')} {v}" for k, v in summary.items()
                            if k.startswith("dropped_") and v)
        raise StageError(f"no preference pairs came out of {summary.get('rankings', 0)} rankings of "
                         f"{summary.get('tasks', 0)} tasks (dropped: {dropped or 'none'}); were all responses "
                         "tied, or all tasks under min_agreement?")
    numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
    people = summary["reliability"]["annotators"]
    for name, row in people.items():  # W&B summary keys beside the table
        numbers.update({f"reliability/{name}/accuracy": row["accuracy"], f"reliability/{name}/weight": row["weight"]})
    tracker.table("reliability", list(RELIABILITY_COLUMNS), reliability_rows(people))
    sample_dir = stage_dir(cfg.run.dir, "sample")
    log_artifact("export", out, cfg.run.dir, {"samples": sample_dir}, run=tracker.run)
    tracker.finish(numbers)
    log.info("export summary: %s", json.dumps({k: v for k, v in summary.items() if k != "reliability"}))
    log.info("annotator reliability (%s):\n%s", summary["reliability"]["model"],
             "\n".join(f"  {r[0]}: accuracy {r[1]:.3f} [{r[2]:.2f}, {r[3]:.2f}], weight {r[4]:.2f}, "
                       f"{r[6]} of {r[5]} judgements checked ({r[7]} on gold"
                       + (f", {r[8]:.0%} of them right)" if r[8] is not None else ")") for r in reliability_rows(people)))
    for warning in summary["reliability"].get("warnings") or []:
        log.warning("annotator reliability: %s", warning)
    if Path(cfg.run.dir).is_dir():  # as every stage does (output= elsewhere: the run's report, if it has one)
        log.info("report: %s", report.write_report(cfg.run.dir))
    print_done("export", out, f"{stage_command('reward', cfg.run.dir, data=out)}   or   "
                              f"{stage_command('dpo', cfg.run.dir, data=out)}")
    return out

