"""Generate ``docs/configuration-reference.md`` from the config models themselves.

The same field declarations validate the config and document it, so the reference cannot
drift: ``tests/core/test_docs.py`` fails when the committed file is stale. Regenerate with
``python -m logstack._docs > docs/configuration-reference.md``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ._config import SECTIONS, ApiKey, KeyMaskingOverride, PartialRule, StageSpec, ValueDetector


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not hasattr(annotation, "__args__") else None
    text = text or str(annotation)
    for noise in ("typing.", "pathlib.", "logstack._config."):
        text = text.replace(noise, "")
    return text.replace("|", "or").replace("PosixPath", "Path")


def _default(info: Any) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "(required)"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, dict):
        value = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in value.items()}
    return f"`{json.dumps(value, default=str)}`"


def _table(model: type[BaseModel], env_prefix: str | None) -> list[str]:
    header = "| key | type | default | meaning |"
    rows = [header, "|---|---|---|---|"]
    if env_prefix is not None:
        rows[0] = "| key | type | default | environment variable | meaning |"
        rows[1] = "|---|---|---|---|---|"
    for name, info in model.model_fields.items():
        cells = [f"`{name}`", _type_name(info.annotation).replace("|", "or"), _default(info)]
        if env_prefix is not None:
            cells.append(f"`{env_prefix}{name.upper()}`")
        cells.append((info.description or "").replace("|", "\\|"))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from the config models by `python -m logstack._docs`; do not edit by hand.",
        "Every key can be set in `config.yaml` or by its environment variable (values are parsed",
        "as YAML scalars, so `true`, `10` and JSON lists/objects work). Server keys are also",
        "accepted without the section: `LOGSTACK_HOST`, `LOGSTACK_PORT`, ...",
        "",
    ]
    for section, model in SECTIONS.items():
        out += [f"## `{section}`", "", *_table(model, f"LOGSTACK_{section.upper()}_"), ""]
    for title, model in (
        ("An API key (`security.api_keys.<token>`)", ApiKey),
        ("A partial masking rule (`masking.partial_rules.<key>`)", PartialRule),
        ("A per-key masking override (`masking.overrides.<key name>`)", KeyMaskingOverride),
        ("A value detector (`masking.detectors[]`)", ValueDetector),
        ("A pipeline element (`pipeline[]`)", StageSpec),
    ):
        out += [f"## {title}", "", *_table(model, None), ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
