"""The reference documents made from the code, so that they cannot drift from it:

* `schema/job.schema.json`, the job's JSON Schema, from the pydantic models of job.py;
* the job-field table of docs/job.md, from that schema;
* the settings table of docs/settings.md, from the declarations of settings.py.

    python -m s2v_worker.reference           # write them (run from the repository's root)
    python -m s2v_worker.reference --check   # exit 1 if one differs from what the code makes

In the Markdown pages the table sits between `<!-- NAME:start -->` and `<!-- NAME:end -->` lines;
tests/test_reference.py fails when a committed document differs from what this module makes.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from pydantic.json_schema import GenerateJsonSchema

from .job import MAX_SEED, Job
from .settings import GROUPS, SETTINGS

SCHEMA_PATH = Path("schema/job.schema.json")
JOB_PAGE, JOB_MARKER = Path("docs/job.md"), "job-fields"
SETTINGS_PAGE, SETTINGS_MARKER = Path("docs/settings.md"), "settings"


class _SchemaGenerator(GenerateJsonSchema):
    def field_title_should_be_set(self, schema: Any) -> bool:
        return False  # "Sample Steps" above `sample_steps` tells a reader nothing

    def generate(self, schema: Any, mode: Any = "validation") -> dict:
        def one_line(node: Any) -> Any:  # the docstrings' line breaks are not the text's
            if isinstance(node, dict):
                return {key: " ".join(value.split()) if key == "description" and isinstance(value, str)
                        else one_line(value) for key, value in node.items()}
            return [one_line(item) for item in node] if isinstance(node, list) else node

        return {"$schema": self.schema_dialect, **one_line(super().generate(schema, mode))}


def job_json_schema() -> dict:
    return Job.model_json_schema(schema_generator=_SchemaGenerator)


def job_schema_text() -> str:
    """schema/job.schema.json, as committed: stable key order, two-space indent, final newline."""
    return json.dumps(job_json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _table_row(name: str, prop: dict, required: bool) -> str:
    """One field: its type, its default, and its rule (the schema's limits, then its description)."""
    of = next((p for p in prop.get("anyOf", ()) if p.get("type") != "null"), prop)  # X of X | None
    if "enum" in of:
        kind = " or ".join(f"`{json.dumps(choice)}`" for choice in of["enum"])
    elif of["type"] == "array":
        kind = "list of objects"
    else:
        kind = of["type"] + (" (URL)" if of.get("format") == "uri" else "")
    if required:
        default = "required"
    else:
        default = f"`{json.dumps(prop['default'], ensure_ascii=False)}`" if "default" in prop else "see rule"
    limits = []
    if "minimum" in of:
        high = "2^62" if of["maximum"] == MAX_SEED else f"{of['maximum']:g}"
        limits.append(f"{of['minimum']:g}..{high}")
    if "multipleOf" in of:
        limits.append(f"a multiple of {of['multipleOf']}")
    if "maxLength" in of:
        limits.append(f"at most {of['maxLength']} characters")
    if of.get("minLength"):
        limits.append("not empty")
    if "maxItems" in of:
        limits.append(f"at most {of['maxItems']}")
    rule = ". ".join(filter(None, ["; ".join(limits), prop["description"]])).replace("|", "\\|")
    return f"| `{name}` | {kind} | {default} | {rule} |"


def job_table_markdown() -> str:
    """The job-field table of docs/job.md, from the JSON Schema: `input`'s fields, a LoRA's, s3Config's."""
    models = job_json_schema()["$defs"]
    rows = ["| field | type | default | rule |", "| --- | --- | --- | --- |"]
    for prefix, model in (("", "JobInput"), ("loras[i].", "LoraEntry"), ("s3Config.", "StorageOverride")):
        schema = models[model]
        rows += [_table_row(prefix + name, prop, name in schema.get("required", ()))
                 for name, prop in schema["properties"].items()]
    return "\n".join(rows)


def settings_table_markdown() -> str:
    """docs/settings.md's table: every environment variable, by group, with its default."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for group in GROUPS:
        for s in (s for s in SETTINGS if s.group == group):
            default = "unset" if s.default is None and s.shown_default is None else f"`{s.default_text}`"
            rows.append(f"| `{s.env}` | {default} | {s.help} |")
    return "\n".join(rows)


def between_markers(text: str, marker: str) -> str:
    """The block of `text` between its `<!-- marker:start -->` and `<!-- marker:end -->` lines."""
    match = re.search(rf"<!-- {marker}:start -->\n(.*?)\n<!-- {marker}:end -->", text, re.S)
    if match is None:
        raise ValueError(f"no <!-- {marker}:start/end --> block")
    return match.group(1)


def with_block(text: str, marker: str, block: str) -> str:
    """`text` with the block between its `marker` lines replaced by `block`."""
    old = between_markers(text, marker)
    return text.replace(f"<!-- {marker}:start -->\n{old}\n", f"<!-- {marker}:start -->\n{block}\n", 1)


def documents(root: Path) -> dict[Path, str]:
    """Each generated document's path (under `root`) and the text it should have."""
    job_page, settings_page = root / JOB_PAGE, root / SETTINGS_PAGE
    return {
        root / SCHEMA_PATH: job_schema_text(),
        job_page: with_block(job_page.read_text(encoding="utf-8"), JOB_MARKER, job_table_markdown()),
        settings_page: with_block(settings_page.read_text(encoding="utf-8"), SETTINGS_MARKER,
                                  settings_table_markdown()),
    }


def main(argv: list[str]) -> int:
    root = Path.cwd()
    stale = []
    for path, text in documents(root).items():
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text:
            continue
        if "--check" in argv:
            stale.append(str(path.relative_to(root)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(root)}")
    if stale:
        print("out of date (python -m s2v_worker.reference): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
