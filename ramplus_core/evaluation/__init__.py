"""Tag quality and run inspection: mAP against annotations, threshold calibration, HTML report.

    metrics      AP/mAP and precision/recall/F1 (pure numpy): ours, and the official script's
    annotations  the paper's `image_id,tag,...` files, tag lists, image-id to URI matching
    results      the job's Delta tables as a committed run left them (time travel)
    benchmark    a run against annotations: the labelled sample evaluate and calibrate share
    calibrate    per-tag thresholds, written as the job's vocabulary.thresholds_file
    report       a self-contained HTML page of a run: the catalog, what the run changed, a sample

The command-line tools are jobs/evaluate.py, jobs/calibrate.py and jobs/report.py; see
docs/evaluation.md. Names are imported lazily so `import ramplus_core.evaluation` is cheap.
"""

_EXPORTS = {
    "average_precision": "metrics", "average_precisions": "metrics", "evaluate": "metrics",
    "official_average_precision": "metrics",
    "read_annotations": "annotations", "read_taglist": "annotations", "builtin_taglists": "annotations",
    "open_run": "results", "load_labelled": "benchmark", "evaluate_sample": "benchmark",
    "calibrate_sample": "calibrate", "write_thresholds": "calibrate", "build_report": "report",
    "EvaluationError": "common", "ScoreFloorWarning": "common",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
