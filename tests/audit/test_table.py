"""labelsieve.audit.table: the audit table built from a detector's result."""

from __future__ import annotations

import numpy as np
import pandas as pd

from labelsieve.audit.schema import COLUMNS
from labelsieve.audit.table import build_table
from labelsieve.audit.writers import write_csv
from labelsieve.data import LabeledImages
from labelsieve.detectors import DetectionResult


def test_a_detector_column_reaches_audit_csv(tmp_path):
    """docs/architecture.md, "Add an audit column": a column a detector returns in ``DetectionResult.columns``
    lands in audit.csv after the standard columns, aligned with the input rows, empty on unreadable rows."""
    images = LabeledImages(root=tmp_path, paths=["a.jpg", "b.jpg", "c.jpg"], labels=np.array([0, 1, 1]),
                           classes=["cat", "dog"], classnames=["cat", "dog"], source="test")
    readable = np.array([True, False, True])
    result = DetectionResult(p_clean=[0.9, 0.2], probs=[[0.9, 0.1], [0.8, 0.2]],
                             columns={"my_score": np.array([1.5, 2.5])})
    table = build_table(images, readable, result)
    write_csv(table, tmp_path / "audit.csv")
    back = pd.read_csv(tmp_path / "audit.csv", keep_default_na=False, dtype=str)
    assert list(back.columns[: len(COLUMNS)]) == COLUMNS and "my_score" in back.columns
    by_path = back.set_index("path")["my_score"]
    assert (by_path["a.jpg"], by_path["c.jpg"], by_path["b.jpg"]) == ("1.5", "2.5", "")
    assert back.set_index("path").loc["b.jpg", "issue"] == "unreadable"
