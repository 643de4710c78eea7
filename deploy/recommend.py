"""`iisan recommend`: which users, and the records it writes (JSONL or CSV)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterable, Sequence, TextIO

from iisan.deploy.run import Recommendation, RecommendError, TrainedRun


def parse_users(spec: str) -> list[str] | None:
    """`all` -> None (every user); a file of ids (one per line, blank lines and #-comments skipped); or
    ID,ID,..."""
    spec = spec.strip()
    if spec == "all":
        return None
    path = Path(spec)
    if path.is_file():
        users = []
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                users.append(line)
        if not users:
            raise RecommendError(f"{path}: no user ids in it")
        return users
    users = [u.strip() for u in spec.split(",") if u.strip()]
    if not users:
        raise RecommendError(f"--users '{spec}': all, a file of user ids, or ID,ID,...")
    return users


def records(users: Sequence[str], lists: Sequence[list[Recommendation]]) -> Iterable[dict]:
    for user, items in zip(users, lists):
        yield {"user": str(user), "items": [{"id": r.id, "title": r.title, "score": r.score} for r in items]}


def write(recs: Iterable[dict], fmt: str, out: TextIO) -> int:
    """JSONL (one record per user) or CSV (user, rank, id, title, score); returns the records written."""
    n = 0
    if fmt == "jsonl":
        for rec in recs:
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    elif fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(["user", "rank", "id", "title", "score"])
        for rec in recs:
            for rank, item in enumerate(rec["items"], 1):
                writer.writerow([rec["user"], rank, item["id"], item["title"], repr(item["score"])])
            n += 1
    else:
        raise RecommendError(f"format '{fmt}': jsonl or csv")
    return n


def run_recommend(run: TrainedRun, users: str = "all", history: str | None = None, k: int = 10,
                  split: str = "next", include_history: bool = False) -> list[dict]:
    """The records `iisan recommend` prints: for an ad-hoc `history` (item ids separated by spaces or commas)
    one record with user "history"; else one per dataset user."""
    if history is not None:
        items = [i for i in history.replace(",", " ").split() if i]
        return list(records(["history"], run.recommend([items], k, include_history)))
    ids, windows, exclude = run.dataset_requests(parse_users(users), split)
    return list(records(ids, run.rank(windows, [] if include_history else exclude, k)))


def to_text(recs: list[dict], fmt: str) -> str:
    buffer = io.StringIO()
    write(recs, fmt, buffer)
    return buffer.getvalue()
