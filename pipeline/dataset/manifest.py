"""``dataset.json``: read it, and turn its label and channel declarations into plain Python values.

Two dialects are understood, told apart by the form of their values rather than by a name:

* nnU-Net v2: ``labels`` maps names to values (``{"background": 0, "edema": 1}``), ``channel_names``
  maps channel indices to names (``{"0": "FLAIR"}``);
* Medical Segmentation Decathlon: ``labels`` maps values to names (``{"0": "background"}``),
  ``modality`` maps channel indices to names.

Region-based nnU-Net labels (a value that is a list of values, or ``regions_class_order``) are refused:
the pipeline trains one class per value.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import InputError


def read_manifest(path: Path) -> dict:
    """The parsed ``dataset.json`` at ``path`` (a mapping), else an :class:`InputError` saying why."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read '{path}': {exc}. Check the file's permissions or re-create it") from None
    except ValueError as exc:
        raise InputError(
            f"'{path}' is not valid JSON ({exc}). Fix the file, or delete it to list imagesTr/ + labelsTr/ "
            "as a plain folder"
        ) from None
    if not isinstance(meta, dict):
        raise InputError(f"'{path}' must hold a JSON object (nnU-Net v2 or MSD dataset.json), "
                         f"found a {type(meta).__name__}")
    return meta


def parse_labels(meta: dict, path: Path) -> dict[str, int]:
    """``{name: value}`` from either dialect of ``labels``; ``{}`` when ``dataset.json`` has none."""
    if "regions_class_order" in meta:
        raise InputError(
            f"'{path}' defines region-based labels (regions_class_order): region-based labels are not "
            "supported yet. Give each class its own integer value in 'labels'"
        )
    raw = meta.get("labels")
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"'{path}': 'labels' must be a mapping such as {{\"background\": 0, \"lesion\": 1}}, "
                         f"found {raw!r}")
    if all(_is_index(k) for k in raw) and all(isinstance(v, str) for v in raw.values()):
        return {name: int(value) for value, name in raw.items()}  # MSD: value -> name
    labels: dict[str, int] = {}
    for name, value in raw.items():
        if isinstance(value, (list, tuple)):
            raise InputError(
                f"'{path}': label '{name}' is {list(value)}, a region-based definition: region-based labels "
                "are not supported yet. Give each class its own integer value"
            )
        if isinstance(value, bool) or not (isinstance(value, int) or _is_index(value)):
            raise InputError(f"'{path}': label '{name}' has value {value!r}: expected a non-negative integer")
        labels[str(name)] = int(value)
    return labels


def parse_channels(meta: dict, path: Path) -> list[str]:
    """Channel names in channel order from ``channel_names`` (nnU-Net v2) or ``modality`` (MSD)."""
    raw = meta.get("channel_names", meta.get("modality"))
    if raw is None:
        return []
    if not isinstance(raw, dict) or not all(_is_index(k) for k in raw):
        raise InputError(f"'{path}': channel names must map channel indices to names, e.g. "
                         f"{{\"0\": \"FLAIR\", \"1\": \"T1c\"}}; found {raw!r}")
    indices = sorted(int(k) for k in raw)
    if indices != list(range(len(indices))):
        raise InputError(f"'{path}': channel indices must be 0..{len(indices) - 1}, found {indices}")
    by_index = {int(k): str(v) for k, v in raw.items()}
    return [by_index[i] for i in indices]


def _is_index(value) -> bool:
    """A channel index or label value: ``"3"`` or ``3`` (not ``True``, not negative)."""
    if isinstance(value, str):
        return value.isdigit()
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
