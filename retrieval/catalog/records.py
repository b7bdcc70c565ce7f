"""The catalog's one-row JSON records (a Catalog mixin): the FAISS index type, how the vectors were computed, and
which images the network was fine-tuned on."""
from __future__ import annotations

import json

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from retrieval.catalog.schema import ExtractionRow, VectorIndexRow, WeightsTrainingRow


class RunRecords:
    """Mixed into Catalog: uses its Session."""

    def _json_row(self, row_type) -> dict | None:  # noqa: ANN001 - one of the one-row record tables
        """The record in row_type's one row, or None (none yet, or no such table: a catalog made before it, opened
        read-only)."""
        try:
            with self.Session() as s:
                text = s.scalar(select(row_type.record).where(row_type.id == 1))
        except OperationalError:
            return None
        return json.loads(text) if text else None

    def _save_json_row(self, row_type, record: dict) -> None:  # noqa: ANN001
        with self.Session.begin() as s:
            s.merge(row_type(id=1, record=json.dumps(record, sort_keys=True)))

    # the FAISS index type
    def vector_index_record(self) -> dict | None:
        """What retrieval.vectors.builder recorded of the FAISS file, or None (none yet, or a catalog made before)."""
        return self._json_row(VectorIndexRow)

    def save_vector_index_record(self, record: dict) -> None:
        self._save_json_row(VectorIndexRow, record)

    # how the vectors were computed
    def extraction_record(self) -> dict | None:
        """{"precisions": {precision: [devices]}, "last": {"precision", "device", "decode"}}, or None (none yet,
        or a catalog made before precisions were recorded)."""
        return self._json_row(ExtractionRow)

    def note_extraction(self, precision: str, device: str, decode: str) -> None:
        """Record that vectors are being added with this precision on this device (before the run's first batch)."""
        with self.Session.begin() as s:
            row = s.get(ExtractionRow, 1)
            record = json.loads(row.record) if row is not None else {"precisions": {}}
            devices = record["precisions"].setdefault(precision, [])
            if device not in devices:
                devices.append(device)
            record["last"] = {"precision": precision, "device": device, "decode": decode}
            s.merge(ExtractionRow(id=1, record=json.dumps(record, sort_keys=True)))

    # which images the network was fine-tuned on
    def training_record(self) -> dict | None:
        """What index-images recorded of the images its weights file was fine-tuned on
        (retrieval.learning.history.training_record, with "weights_identity"), or None: weights that are not a file,
        or an index made before this was recorded."""
        return self._json_row(WeightsTrainingRow)

    def save_training_record(self, record: dict) -> None:
        self._save_json_row(WeightsTrainingRow, record)
