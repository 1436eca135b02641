"""``plans.yaml``: the planned config, complete and readable, each planned value with its reason beside it.

The plan is a tree of sections whose leaves are :class:`Choice` (a value and why) or plain values (our
defaults, written so the file is the whole config). It is rendered as YAML in flow style per value
(``key: value  # reason``), validated by loading it back with :func:`pipeline.config.load_config`, and
written atomically (:func:`pipeline.io.atomic.atomic_path`), like ``fingerprint.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Union

from pipeline.io.atomic import atomic_path, write_json

INDENT = "  "


@dataclass(frozen=True)
class Choice:
    value: Any
    reason: str = ""


def flat_choices(plan: dict, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """``(dotted key, value, reason)`` of every :class:`Choice` with a reason, in file order."""
    for key, node in plan.items():
        if isinstance(node, dict):
            yield from flat_choices(node, f"{prefix}{key}.")
        elif isinstance(node, Choice) and node.reason:
            yield f"{prefix}{key}", plain(node.value), node.reason


def plain(value):
    """``value`` without the :class:`Choice` of its list items (a list of commented rules)."""
    if isinstance(value, list):
        return [plain(v.value if isinstance(v, Choice) else v) for v in value]
    return value


def render(plan: dict, header: str = "") -> str:
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for key, node in plan.items():
        if lines and not isinstance(node, Choice) and isinstance(node, dict):
            lines.append("")
        lines.extend(_lines(key, node, 0))
    return "\n".join(lines) + "\n"


def write_plans(plan: dict, target: Union[str, Path], header: str = ""):
    """Write ``plan`` as ``target`` (atomically) and return the :class:`~pipeline.config.Config` it loads as."""
    from pipeline.config import load_config

    text = render(plan, header)
    target = Path(target)
    with atomic_path(target, suffix=".tmp.yaml") as tmp:
        tmp.write_text(text)
        config = load_config(tmp)  # a plan the schema refuses is never written
    return config


def write_fingerprint(fingerprint: dict, target: Union[str, Path]) -> Path:
    return write_json(fingerprint, target)


def _lines(key: str, node, level: int) -> list[str]:
    pad = INDENT * level
    if isinstance(node, dict):
        out = [f"{pad}{key}:"]
        for child_key, child in node.items():
            out.extend(_lines(child_key, child, level + 1))
        return out
    value, reason = (node.value, node.reason) if isinstance(node, Choice) else (node, "")
    if isinstance(value, list) and value and all(isinstance(v, dict) or isinstance(v, Choice) for v in value):
        out = [f"{pad}{key}:" + (f"  # {_one_line(reason)}" if reason else "")]
        for item in value:  # an item may be a Choice: a dict with its own comment
            note = item.reason if isinstance(item, Choice) else ""
            out.append(f"{pad}{INDENT}- {flow(plain([item])[0])}" + (f"  # {_one_line(note)}" if note else ""))
        return out
    return [f"{pad}{key}: {flow(value)}" + (f"  # {_one_line(reason)}" if reason else "")]


def flow(value) -> str:
    """``value`` as one line of YAML (flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot plan a non-finite value {value!r}")
        text = repr(value)
        return f"{value:.12f}".rstrip("0") if "e" in text else text  # PyYAML reads 1e-05 as a string
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_string(str(k))}: {flow(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} in plans.yaml")


def _string(text: str) -> str:
    import json

    plain = text and all(c.isalnum() or c in "_-./" for c in text) and (text[0].isalpha() or text[0] in "/_") \
        and text.lower() not in ("true", "false", "null", "yes", "no", "on", "off", "y", "n", "~")
    return text if plain else json.dumps(text)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def record_postprocessing(plans: Union[str, Path], chosen: dict, source: str) -> Path:
    """Write post-processing rules chosen by ``medseg cv`` into ``plans`` (a ``plans.yaml``), keeping its
    comments: ``inference.min_component_mm3`` in place and a ``postprocess`` section at the end (replacing
    one written before), each with ``source`` as its reason. Loaded back before the atomic rename."""
    import re

    from pipeline.config import load_config

    plans = Path(plans)
    text = plans.read_text()
    reason = _one_line(f"chosen by {source}")
    text, found = re.subn(r"(?m)^(\s+)min_component_mm3:.*$",
                          lambda m: f"{m.group(1)}min_component_mm3: {flow(float(chosen['min_component_mm3']))}"
                                    f"  # {reason}", text, count=1)
    text = re.sub(r"(?ms)^postprocess:\n(?:[ #].*\n|\n)*", "", text)  # an earlier choice, up to the next section
    if not text.endswith("\n"):
        text += "\n"
    text += (f"\npostprocess:\n"
             f"{INDENT}keep_largest: {flow(list(chosen['keep_largest']))}  # {reason}\n"
             f"{INDENT}restrict_to_body: {flow(list(chosen['restrict_to_body']))}  # {reason}\n")
    if not found:
        text += f"\ninference:\n{INDENT}min_component_mm3: {flow(float(chosen['min_component_mm3']))}  # {reason}\n"
    with atomic_path(plans, suffix=".tmp.yaml") as tmp:
        tmp.write_text(text)
        load_config(tmp)  # never leave a plan the schema refuses
    return plans
