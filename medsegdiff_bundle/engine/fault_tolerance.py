"""Batch inference that reports a bad case and carries on with the rest.

A case whose files are missing or corrupt, or whose transforms fail, is turned into a *failure record* by
:class:`FaultTolerantDataset` (works inside DataLoader worker processes), dropped from its batch by
:func:`collate_skip_failed`, and collected by :class:`SkipFailedCases`, the evaluator's ``iteration_update``, which
runs the normal MONAI iteration on the remaining cases and, when the run completes, logs the failures and writes
``failed_cases.csv``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from monai.data import Dataset, list_data_collate

from ..utils import atomic_open

__all__ = ["FAILED_KEY", "FaultTolerantDataset", "collate_skip_failed", "SkipFailedCases"]

FAILED_KEY = "__failed__"
logger = logging.getLogger(__name__)


def _case_name(item: Any) -> str:
    value = item.get("image") if isinstance(item, dict) else item
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return str(value)


class FaultTolerantDataset(Dataset):
    """``monai.data.Dataset`` whose items become ``{FAILED_KEY: (case, error)}`` instead of raising."""

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as e:  # any load/transform error of one case must not end the batch job
            cause = e
            while cause.__cause__ is not None:  # MONAI wraps transform errors; the root cause is what users need
                cause = cause.__cause__
            return {FAILED_KEY: (_case_name(self.data[index]), f"{type(cause).__name__}: {cause}")}


def collate_skip_failed(batch: Sequence[Any]) -> dict:
    """Collate the good items (MONAI's ``list_data_collate``) and keep the failure records under ``FAILED_KEY``."""
    flat: list[Any] = []
    for item in batch:  # random-crop transforms return lists of samples
        flat.extend(item if isinstance(item, list) else [item])
    failed = [item[FAILED_KEY] for item in flat if isinstance(item, dict) and FAILED_KEY in item]
    good = [item for item in flat if not (isinstance(item, dict) and FAILED_KEY in item)]
    out = list_data_collate(good) if good else {}
    out[FAILED_KEY] = failed
    return out


class SkipFailedCases:
    """Evaluator ``iteration_update`` that skips failure records, plus the handler that reports them.

    Args:
        report_path: CSV written at the end of the run (``case, error``; header only when nothing failed).

    Use the same object as ``iteration_update`` and in the evaluator's handlers (``attach`` registers the report).
    """

    def __init__(self, report_path: str | Path) -> None:
        self.report_path = Path(report_path)
        self.failures: list[tuple[str, str]] = []

    def __call__(self, engine: Any, batchdata: dict) -> Any:
        batch = dict(batchdata)
        for case, error in batch.pop(FAILED_KEY, []):
            logger.error(f"case {case} failed and is skipped: {error}")
            self.failures.append((case, error))
        if not batch:
            engine.state.output = []
            return engine.state.output
        return engine._iteration(engine, batch)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda _: self.failures.clear())
        engine.add_event_handler(Events.COMPLETED, self.write_report)

    def write_report(self, engine: Any = None) -> Path:
        """Write the CSV atomically and log the list of failed cases."""
        with atomic_open(self.report_path, newline="") as f:
            pd.DataFrame(self.failures, columns=["case", "error"]).to_csv(f, index=False)
        if self.failures:
            lines = "\n".join(f"  {case}: {error}" for case, error in self.failures)
            logger.warning(f"{len(self.failures)} case(s) failed and were skipped (see {self.report_path}):\n{lines}")
        return self.report_path
