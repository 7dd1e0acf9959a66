"""``fpedit eval``: edit every dataset item, score it, keep a resumable ``results.csv`` and a summary.

Rows are appended (one write and a flush per item), so an interrupted run leaves a valid file and the next run
skips the items already there. An item that fails (a missing or corrupt image, a bad prompt, out of memory)
does not stop the run: its row carries the reason in the ``error`` column and no scores, the summary counts it
apart from the means, and the next run retries it. With several settings (``--sweep``) each gets its own
folder; one item is inverted once and edited with every setting.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fpedit.engine.errors import FpeditError

from .datasets import Item
from .masks import resize_mask
from .metrics import ALL_METRICS, LOWER_IS_BETTER, Scorer

FIXED_COLUMNS = ("id", "edit_type", "edit_seconds")
#: ``--blend``: edit only inside PIE-Bench's mask, or where its ``blended_word`` attends, or everywhere.
BLEND_MODES = ("none", "mask", "words")
COLUMNS = (*FIXED_COLUMNS, *ALL_METRICS, "error")
#: Longest reason kept in the ``error`` column (one line).
MAX_ERROR_CHARS = 300


@dataclass
class Setting:
    """One point of a sweep: a name for its folder and table row, and the edit options."""

    name: str
    options: Any  # EditOptions
    blend: str = "none"  # one of BLEND_MODES, applied per item (blend_for)


@dataclass
class RunConfig:
    items: list[Item]
    out: Path
    settings: list[Setting]
    inversion: dict[str, Any] = field(default_factory=dict)  # method, source_prompt rule, null-text options
    describe: dict[str, Any] = field(default_factory=dict)  # model, dataset, ... for the summary
    blend: dict[str, Any] = field(default_factory=dict)  # Blend's start and threshold (--blend-start ...)
    progress: bool = True


def read_rows(path: Path) -> list[dict[str, str]]:
    """The complete rows of ``results.csv`` (a last line cut short by a crash is dropped). A file written
    before the ``error`` column existed reads as rows without errors."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row.setdefault("error", "")
    return [
        row
        for row in rows
        if None not in row and row.get("id") and all(row.get(c) is not None for c in COLUMNS)
    ]


def _header(path: Path) -> list[str]:
    with path.open(newline="") as f:
        return next(csv.reader(f), [])


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


class ResultsFile:
    """``results.csv``: header once, then one complete line per item, written and flushed in one call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        rows = read_rows(path)
        self.rows = [row for row in rows if not row["error"]]  # failed items are retried
        self.done = {row["id"] for row in self.rows}
        path.parent.mkdir(parents=True, exist_ok=True)
        rewrite = path.is_file() and (
            len(self.rows) != _count_lines(path) - 1 or _header(path) != list(COLUMNS)
        )
        if rewrite or not path.is_file():  # fresh, or drop a torn last line or failed rows before appending
            with path.open("w", newline="") as f:
                f.write(_line(COLUMNS) + "".join(_line([row[c] for c in COLUMNS]) for row in self.rows))

    def append(self, row: dict[str, Any]) -> None:
        text = _line([_format(row.get(c)) for c in COLUMNS])
        with self.path.open("a", newline="") as f:
            f.write(text)
            f.flush()
        self.rows.append({c: _format(row.get(c)) for c in COLUMNS})
        self.done.add(str(row["id"]))


def _line(values: Sequence[str]) -> str:
    buffer = StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def _count_lines(path: Path) -> int:
    with path.open(newline="") as f:
        return sum(1 for _ in csv.reader(f))


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def summarize(rows: list[dict[str, str]]) -> dict[str, Any]:
    """Means of every metric column (NaN and empty cells skipped) overall and per edit type, and timings, over
    the items that succeeded; failed items are counted (``failed``, ``failed_ids``) and nothing else."""
    failed = [r for r in rows if r.get("error")]
    rows = [r for r in rows if not r.get("error")]

    def means(subset: list[dict[str, str]]) -> dict[str, float]:
        out = {}
        for name in ALL_METRICS:
            values = [float(r[name]) for r in subset if r.get(name) not in (None, "")]
            mean = _mean(values)
            if mean is not None:
                out[name] = mean
        return out

    seconds = [float(r["edit_seconds"]) for r in rows if r.get("edit_seconds")]
    types = sorted(
        {r["edit_type"] for r in [*rows, *failed] if r.get("edit_type")}, key=lambda t: (len(t), t)
    )
    return {
        "items": len(rows),
        "failed": len(failed),
        "failed_ids": [r["id"] for r in failed],
        "means": means(rows),
        "per_edit_type": {
            t: {
                "items": sum(r["edit_type"] == t for r in rows),
                "failed": sum(r["edit_type"] == t for r in failed),
                "means": means([r for r in rows if r["edit_type"] == t]),
            }
            for t in types
        },
        "timing": {
            "edit_seconds_mean": float(np.mean(seconds)) if seconds else None,
            "edit_seconds_total": float(np.sum(seconds)) if seconds else 0.0,
        },
    }


def markdown_table(title: str, groups: dict[str, dict[str, Any]]) -> str:
    """One row per group (``{"items": n, "means": {...}}``, optionally ``"failed": n``), one column per
    metric present; a ``failed`` column when any group has failed items."""
    metrics = [m for m in ALL_METRICS if any(m in g["means"] for g in groups.values())]
    arrows = {m: ("↓" if m in LOWER_IS_BETTER else "↑") for m in metrics}
    with_failed = any(g.get("failed") for g in groups.values())
    header = ["", "items", *(["failed"] if with_failed else []), *(f"{m} {arrows[m]}" for m in metrics)]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, group in groups.items():
        cells = [name, str(group["items"]), *([str(group.get("failed", 0))] if with_failed else [])]
        cells += [f"{group['means'][m]:.4g}" if m in group["means"] else "" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(folder: Path, rows: list[dict[str, str]], settings: dict[str, Any]) -> dict[str, Any]:
    summary = {**summarize(rows), "settings": settings}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    groups = {"all": {"items": summary["items"], "failed": summary["failed"], "means": summary["means"]}}
    groups.update({f"edit type {t}": g for t, g in summary["per_edit_type"].items()})
    (folder / "summary.md").write_text(markdown_table(f"{folder.name}: means", groups))
    return summary


def _settings_record(setting: Setting, config: RunConfig) -> dict[str, Any]:
    o = setting.options
    return {
        **config.describe,
        "setting": setting.name,
        "steps": o.steps,
        "guidance_scale": o.guidance_scale,
        "replace_window": list(o.replace_window),
        "layers": o.layers if isinstance(o.layers, str) else list(o.layers),
        "map_format": o.map_format,
        "blend": setting.blend,
        **({f"blend_{k}": v for k, v in config.blend.items()} if setting.blend != "none" else {}),
        **{k: v for k, v in config.inversion.items() if k != "source_prompt"},
    }


def run(engine: Any, scorer: Scorer, config: RunConfig) -> dict[str, dict[str, Any]]:
    """Edit and score every item under every setting; returns the summary of each setting's folder."""
    from tqdm.auto import tqdm

    sweep = len(config.settings) > 1
    folders = {s.name: (config.out / s.name if sweep else config.out) for s in config.settings}
    files = {s.name: ResultsFile(folders[s.name] / "results.csv") for s in config.settings}
    todo = sum(1 for item in config.items for s in config.settings if item.id not in files[s.name].done)
    bar = tqdm(total=todo, desc="eval", unit="edit", disable=not config.progress, dynamic_ncols=True)
    try:
        for item in config.items:
            pending = [s for s in config.settings if item.id not in files[s.name].done]
            inversion = None
            for setting in pending:
                bar.set_postfix_str(f"{item.id} {setting.name}" if sweep else item.id)
                try:
                    row, inversion = _edit_and_score(
                        engine, scorer, item, setting, config, folders, inversion
                    )
                except Exception as exc:  # one bad item must not cost the rest of the run
                    row, inversion = _failed_row(item, exc), None
                    where = f"{item.id} ({setting.name})" if sweep else item.id
                    bar.write(f"fpedit: warning: item {where} failed: {row['error']}", file=sys.stderr)
                files[setting.name].append(row)
                bar.update(1)
    finally:
        bar.close()
        summaries = {
            s.name: write_summary(folders[s.name], files[s.name].rows, _settings_record(s, config))
            for s in config.settings
        }
        if sweep:
            write_sweep(config.out, summaries)
    return summaries


def _edit_and_score(
    engine: Any,
    scorer: Scorer,
    item: Item,
    setting: Setting,
    config: RunConfig,
    folders: dict[str, Path],
    inversion: Any,
) -> tuple[dict[str, Any], Any]:
    folder = folders[setting.name] / "images"
    folder.mkdir(parents=True, exist_ok=True)
    with_source = item.image is None or config.inversion.get("method", "ddim") != "ddim"
    blend = blend_for(engine, item, setting.blend, with_source, **config.blend)
    options = setting.options.replace(blend=blend)
    started = time.perf_counter()
    if item.image is not None:
        if inversion is not None and inversion.steps == options.steps:  # a sweep: invert once
            result = engine.edit_real(inversion, item.target_prompt, options=options)
        else:
            kwargs = inversion_kwargs(config.inversion, item)
            result = engine.edit_real(item.image, item.target_prompt, options=options, **kwargs)
        inversion = result.inversion
        source = result.inversion.image
    else:
        result = engine.edit_generated(
            item.source_prompt, item.target_prompt, options=options, seed=item.seed
        )
        source = result.source_image
        source.save(folder / f"{item.id}.source.png")
    seconds = time.perf_counter() - started
    result.edited_image.save(folder / f"{item.id}.png")
    mask = item.mask()
    if mask is not None:
        mask = resize_mask(mask, source.size)
    scores = scorer.score(source, result.edited_image, item.source_prompt, item.target_prompt, mask)
    return {
        "id": item.id,
        "edit_type": item.edit_type,
        "edit_seconds": round(seconds, 4),
        **scores,
    }, inversion


def blend_for(engine: Any, item: Item, mode: str, with_source: bool, **settings: Any) -> Any:
    """The item's :class:`~fpedit.engine.blend.Blend` under ``mode`` (``None``: edit everywhere).

    ``mask``: PIE-Bench's edit mask (white = may change). ``words``: its ``blended_word`` words that the edit's
    prompts contain (the target prompt's, and the source prompt's where the edit has one: null-text and
    negative-prompt inversions, generated items), as PIE-Bench's own LocalBlend runs use them. An item with
    no mask (no such words) is edited without a blend, as PIE-Bench does for its empty ``blended_word``.
    ``settings``: the Blend's ``start`` and ``threshold``."""
    from fpedit.engine.blend import Blend

    if mode == "mask":
        mask = item.mask()
        if mask is None:
            return None
        return Blend(mask=Image.fromarray((mask > 0).astype(np.uint8) * 255), **settings)
    if mode == "words":
        from fpedit.engine.local_blend import word_positions

        prompts = [item.target_prompt, *([item.source_prompt] if with_source else [])]
        length = engine.spec.text_max_length
        words = tuple(
            dict.fromkeys(
                w
                for w in item.blended_words
                if any(word_positions(engine.tokenizer, p, w, length) for p in prompts)
            )
        )
        return Blend(words=words, **settings) if words else None
    return None


def _failed_row(item: Item, exc: Exception) -> dict[str, Any]:
    """The row of an item that failed: no scores, the reason on one line."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, FpeditError):  # not one of ours: the type says more than the text alone
        reason = f"{type(exc).__name__}: {reason}"
    if len(reason) > MAX_ERROR_CHARS:
        reason = reason[: MAX_ERROR_CHARS - 1] + "…"
    return {"id": item.id, "edit_type": item.edit_type, "error": reason}


def inversion_kwargs(inversion: dict[str, Any], item: Item) -> dict[str, Any]:
    """The inversion options of a real item: null-text and negative-prompt take the item's source prompt."""
    method = inversion.get("method", "ddim")
    kwargs = {k: v for k, v in inversion.items() if k != "source_prompt"}
    if method != "ddim":
        kwargs["source_prompt"] = item.source_prompt
    return kwargs


def write_sweep(out: Path, summaries: dict[str, dict[str, Any]]) -> None:
    """``sweep.json`` and ``sweep.md``: one row of means per setting."""
    (out / "sweep.json").write_text(json.dumps(summaries, indent=2) + "\n")
    groups = {
        name: {"items": s["items"], "failed": s["failed"], "means": s["means"]}
        for name, s in summaries.items()
    }
    (out / "sweep.md").write_text(markdown_table("sweep: means per setting", groups))


def contact_sheet(out: Path, items: list[Item], settings: list[Setting], max_items: int = 6) -> Path | None:
    """``contact_sheet.png``: a row per item (the first ``max_items`` done), the source then each setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for item in items:
        paths = [out / s.name / "images" / f"{item.id}.png" for s in settings]
        if not all(p.is_file() for p in paths):
            continue
        source = (
            item.image
            if item.image is not None
            else out / settings[0].name / "images" / f"{item.id}.source.png"
        )
        rows.append((item, source, paths))
        if len(rows) == max_items:
            break
    if not rows:
        return None
    columns = 1 + len(settings)
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.0 * columns, 2.3 * len(rows)), squeeze=False)
    for r, (item, source, paths) in enumerate(rows):
        for c, path in enumerate([source, *paths]):
            ax = axes[r][c]
            with Image.open(path) as image:
                ax.imshow(np.asarray(image.convert("RGB")))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                title = "source" if c == 0 else settings[c - 1].name.replace("__", "\n").replace("_", " ")
                ax.set_title(title, fontsize=8)
            if c == 0:
                ax.set_ylabel(_wrap(item.target_prompt), fontsize=7)
    fig.tight_layout()
    path = out / "contact_sheet.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _wrap(text: str, width: int = 22) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:3])
