"""README result tables generated from a study's JSON, never retyped.

A README marks each generated table by the JSON it comes from:

    <!-- study-table reports/study-cold-hybrid.json -->
    | setting | row | ... |            (written by `iisan study render`)
    <!-- end study-table -->

and the claims of a study, one line each with its verdict and numbers, the same way:

    <!-- study-claims reports/study-paper.json -->
    - **claim** (experiment): holds — ...  (written by `iisan study render`)
    <!-- end study-claims -->

`iisan study render reports/study-X.json` rewrites every block that names that JSON (paths are relative to the
README's folder); `update_readme(readme, check=True)` says which blocks differ from their JSON, which a test
runs on the committed README and reports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from iisan.errors import IisanError
from iisan.experiments.study import claim_line, percent

END = "<!-- end study-{kind} -->"
_BLOCK = re.compile(r"^(?P<begin><!-- study-(?P<kind>table|claims) (?P<path>\S+) -->\n)(?P<body>.*?)"
                    r"^(?P<end><!-- end study-(?P=kind) -->)$", re.S | re.M)
_MARKER = re.compile(r"^<!-- study-(?P<kind>table|claims) \S+ -->$", re.M)  # a marker is a line of its own


class ReadmeError(IisanError):
    """A README block that cannot be generated: an unclosed marker, a missing JSON."""


def _group(entry: dict[str, Any] | None) -> str:
    if not entry:
        return ""
    if entry.get("HR@10") is None:
        return f"n/a ({entry.get('users', 0):,})"
    low, high = entry.get("HR@10_ci95") or (None, None)
    interval = f" [{100 * low:.1f}, {100 * high:.1f}]" if low is not None else ""
    return f"{100 * entry['HR@10']['mean']:.2f}{interval} ({entry['users']:,})"


def study_table(study: dict[str, Any]) -> str:
    """One compact table of every experiment's rows: test HR@10 / NDCG@10 (mean ± std over seeds, the mean alone for one), the paired
    p-value of HR@10 against the experiment's reference row (* where p < 0.05), and warm / cold test HR@10
    with the 95 % bootstrap interval over users and the user count."""
    lines = ["| setting | row | test HR@10 | test NDCG@10 | p HR@10 | warm HR@10 [95% CI] (users) "
             "| cold HR@10 [95% CI] (users) |", "|---" * 7 + "|"]
    for exp in study["experiments"]:
        for row in exp["rows"]:
            label = row["label"] + (" (ref.)" if row["label"] == exp.get("reference") else "")
            if row.get("status") != "ok":
                lines.append(f"| {exp['name']} | {label} | {row.get('status', 'failed')} |  |  |  |  |")
                continue
            p = (row.get("paired_p") or {}).get("HR@10")
            mark = "" if p is None else f"{p:.3f}" + ("*" if p < 0.05 else "")
            groups = (row.get("groups") or {}).get("test") or {}
            lines.append(f"| {exp['name']} | {label} | {percent(row['test']['HR@10'], row['seeds'])} | {percent(row['test']['NDCG@10'], row['seeds'])} "
                         f"| {mark} | {_group(groups.get('warm'))} | {_group(groups.get('cold'))} |")
    return "\n".join(lines) + "\n"


def study_claims(study: dict[str, Any]) -> str:
    """Each of the study's claims in one line, as `reports/study-<plan>.md` states it."""
    return "".join(claim_line(c) + "\n" for c in study.get("claims") or [])


def _blocks(text: str, readme: Path) -> list[re.Match]:
    blocks = list(_BLOCK.finditer(text))
    markers = list(_MARKER.finditer(text))
    if len(markers) != len(blocks):
        opened = {b.start() for b in blocks}
        unclosed = next(m for m in markers if m.start() not in opened)
        line = text[:unclosed.start()].count("\n") + 1
        raise ReadmeError(f"{readme}:{line}: a '<!-- study-{unclosed['kind']} PATH -->' marker without its "
                          f"'{END.format(kind=unclosed['kind'])}' line")
    return blocks


def update_readme(readme: Path, only: Path | None = None, check: bool = False) -> list[str]:
    """Regenerate the README's study blocks (those of `only`, a study JSON, or all). Returns the JSON paths
    whose blocks changed, each once; with `check` the README is left as it is."""
    text = readme.read_text(encoding="utf-8")
    changed: list[str] = []
    pieces, last = [], 0
    for block in _blocks(text, readme):
        source = readme.parent / block["path"]
        body = block["body"]
        if only is None or source.resolve() == Path(only).resolve():
            if not source.is_file():
                line = text[:block.start()].count("\n") + 1
                raise ReadmeError(f"{readme}:{line}: the study table's JSON {block['path']} does not exist "
                                  f"(run the study, or `iisan study run --plan NAME`)")
            study = json.loads(source.read_text(encoding="utf-8"))
            body = study_table(study) if block["kind"] == "table" else study_claims(study)
            if body != block["body"] and block["path"] not in changed:
                changed.append(block["path"])
        pieces += [text[last:block.start()], block["begin"], body, block["end"]]
        last = block.end()
    pieces.append(text[last:])
    if changed and not check:
        readme.write_text("".join(pieces), encoding="utf-8")
    return changed
