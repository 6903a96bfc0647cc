"""Corrupt images fail their own sample, not the job.

`datasets` decodes every image of a row whenever the row is read, and lmms-eval reads each row several times
(to build requests, then to score), so one undecodable image would abort the whole evaluation. The task's
image columns are switched to lazy bytes and decoded by a transform that turns a bad image into None; the
model wrapper then records that sample as failed.
"""

from __future__ import annotations

import io
import logging
from typing import Any

from datasets import Image, Sequence
from PIL import Image as PILImage

log = logging.getLogger(__name__)


def _is_image(feature: Any) -> bool:
    if isinstance(feature, Image):
        return True
    inner = getattr(feature, "feature", None)
    return isinstance(feature, (Sequence, list)) and (isinstance(inner, Image) or
                                                       (isinstance(feature, list) and isinstance(feature[0], Image)))


def _lazy(feature: Any) -> Any:
    if isinstance(feature, Image):
        return Image(decode=False)
    if isinstance(feature, list):
        return [Image(decode=False)]
    return Sequence(Image(decode=False))


def _open(value: Any) -> PILImage.Image | None:
    if value is None:
        return None
    try:
        image = PILImage.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        image.load()
        return image
    except Exception as exc:  # noqa: BLE001 - any undecodable image
        log.warning("undecodable image (%s): its sample will fail", exc)
        return None


def _decode(batch: dict[str, list], columns: list[str]) -> dict[str, list]:
    for col in columns:
        batch[col] = [[_open(v) for v in item] if isinstance(item, list) else _open(item) for item in batch[col]]
    return batch


def make_image_decoding_safe(task) -> None:
    """Rewires an lmms-eval task's dataset splits in place (see the module docstring)."""
    for split in list(task.dataset):
        ds = task.dataset[split]
        columns = [name for name, feature in ds.features.items() if _is_image(feature)]
        if not columns:
            continue
        for col in columns:
            ds = ds.cast_column(col, _lazy(ds.features[col]))
        ds.set_transform(lambda batch, cols=columns: _decode(batch, cols))
        task.dataset[split] = ds
