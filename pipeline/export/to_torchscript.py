"""``medseg export --format torchscript``: the traced network with the spec as ``_extra_files``
(``medseg.json``), verified after loading it back with ``torch.jit.load``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from pipeline.errors import ConfigError, first_line
from pipeline.export.network import Exportable, example_inputs, verify_outputs
from pipeline.export.spec import EXTRA_FILE
from pipeline.io.atomic import atomic_path


def trace(target: Exportable) -> torch.jit.ScriptModule:
    example = example_inputs(target)[0]
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings from the U-Net's shape checks: verified below
            return torch.jit.trace(target.module, (example,), check_trace=False)
    except Exception as exc:
        raise ConfigError(f"TorchScript export: expected the network to trace on windows {tuple(example.shape)}, "
                          f"found {type(exc).__name__}: {first_line(exc)}") from exc


def write_torchscript(target: Exportable, spec: dict, path: Path) -> float:
    """Write the TorchScript file atomically; the largest logit difference found by the verification."""
    traced = trace(target)
    spec = dict(spec, torchscript={"dynamic_spatial": target.dynamic_spatial, "spatial_multiple": target.step})
    with atomic_path(path, suffix=".tmp.ts") as tmp:
        torch.jit.save(traced, str(tmp), _extra_files={EXTRA_FILE: json.dumps(spec, sort_keys=True)})
        files = {EXTRA_FILE: ""}
        loaded = torch.jit.load(str(tmp), map_location="cpu", _extra_files=files)
        if json.loads(files[EXTRA_FILE]) != json.loads(json.dumps(spec)):
            raise ConfigError("export verification (torchscript): the embedded medseg.json did not read back")

        def run(x):
            with torch.no_grad():
                return loaded(x).numpy()
        return verify_outputs("torchscript", run, target)


def read_spec(path: Path) -> dict:
    """The spec embedded in a TorchScript export."""
    files = {EXTRA_FILE: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return json.loads(files[EXTRA_FILE])
