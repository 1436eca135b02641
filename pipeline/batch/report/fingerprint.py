"""Case fingerprints: what decides whether an existing mask can be kept on a re-run.

``sha256`` of the model identity (checkpoint sha256; an ensemble's: of its members' sha256s in order),
the inference (TTA included), preprocessing and input settings, the label names, the package version,
the source's identity (each file's path, size and modification time) and, when asked for, the extra
outputs that change what a case holds (``--save-probabilities`` and its dtype). The device is left
out: it does not change what a mask should be.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from typing import Iterable, Optional

from pipeline.config import Config


def settings_identity(config: Config) -> dict:
    """The part of the config that decides a mask (everything but where and how fast the network runs)."""
    inference = asdict(config.inference)
    for key in ("device", "backend"):  # backends agree to float rounding (tested)
        inference.pop(key, None)
    if inference.get("tta") == "none":  # no TTA: the fingerprint of the versions before TTA existed
        inference.pop("tta", None), inference.pop("tta_axes", None)
    return {"inference": inference, "preprocess": asdict(config.preprocess), "labels": dict(config.data.labels),
            "model": asdict(config.model), "input": asdict(config.input)}


def source_identity(files: Iterable[str]) -> list[list]:
    """``[path, size, mtime_ns]`` per file, sorted by path; a missing file gets size and mtime -1."""
    out = []
    for path in sorted(str(f) for f in files):
        try:
            st = os.stat(path)
            out.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([os.path.abspath(path), -1, -1])
    return out


def case_fingerprint(model_id: str, config: Config, files: Iterable[str], outputs: Optional[dict] = None) -> str:
    """``outputs``: extra outputs asked for (e.g. ``{"probabilities": "uint8"}``); none leaves the
    fingerprint as it was before such outputs existed."""
    from pipeline import __version__

    payload = {"model": model_id, "settings": settings_identity(config), "medseg": __version__,
               "source": source_identity(files)}
    if outputs:
        payload["outputs"] = dict(outputs)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def state_dict_sha256(state_dict: dict) -> str:
    """A model's identity when it did not come from a checkpoint file (e.g. a network built in code)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(state_dict[name].shape)}:{tensor.dtype}".encode())
        if tensor.numel():
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
