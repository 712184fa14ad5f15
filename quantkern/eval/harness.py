"""lm-evaluation-harness tasks on a quantized (or dense) model (issue #17).

The model stays what quantkern loaded (its QuantLinear / W8A8 / fp8 modules and kernels): lm-eval's
own Hugging Face adapter (``lm_eval.models.huggingface.HFLM``) takes the model object and its
tokenizer, so loglikelihood, rolling loglikelihood and generation requests run as lm-eval runs them
for any transformers model, and the scores compare with published ones. ``include_path`` adds task
YAML files of a local directory (e.g. a task over a local JSON file, where no dataset hub is reachable).
``lm-eval`` is an optional dependency (``pip install quantkern[eval]``), imported only here.
"""

from __future__ import annotations

from pathlib import Path


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(f"quantkern eval --tasks needs lm-eval (pip install lm-eval): {e}") from e
    return lm_eval, HFLM, TaskManager


def evaluate_tasks(model, tokenizer, tasks, include_path=None, limit: int | float | None = None,
                   num_fewshot: int | None = None, batch_size: int = 1, max_length: int | None = None) -> dict:
    """Run lm-eval ``tasks`` (names or a comma-separated string) on ``model`` and return
    ``{task: {metric: value}}`` (lm-eval's metric keys, e.g. ``"acc,none"``).

    Raises ``ValueError`` for unknown task names (before any request runs) and for an
    ``include_path`` that is not a directory."""
    lm_eval, HFLM, TaskManager = _lm_eval()
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [t for t in names if t]
    if not names:
        raise ValueError("no lm-eval task named")
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"include_path {include_path!r} is not a directory")
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}" + ("" if include_path else
                         " (a local task file needs include_path / --include-path)"))
    kw = {} if max_length is None else {"max_length": max_length}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kw)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=False)
    return {task: {k: v for k, v in metrics.items() if k != "alias"} for task, metrics in out["results"].items()}
