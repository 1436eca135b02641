"""``Problem``: one thing wrong with a dataset, naming the case (or ``(dataset)``) it is about."""

from __future__ import annotations

from dataclasses import dataclass

DATASET = "(dataset)"  # the case id of a problem about the whole dataset (dataset.json, counts)


@dataclass(frozen=True)
class Problem:
    case_id: str
    message: str

    def line(self) -> str:
        """``case 'BRATS_003': channel 1 (T1c) missing: ...`` (or the message alone for the dataset)."""
        return self.message if self.case_id == DATASET else f"case '{self.case_id}': {self.message}"
