"""`iisan export RUN_DIR --out DIR [--faiss]`: a trained run as files that load without this package.

    items.safetensors   `embeddings` [M, d] float32; metadata `item_ids` (JSON list, row r = item_ids[r])
    item_ids.txt        the same ids, one per line
    user_encoder.pt2    torch.export program: item rows [B, L] (int64, left-padded with -1) -> user vectors [B, d]
    meta.json           dataset, fingerprints, caches, dims, metric, commit, method, seed, test metrics
    items.flat.faiss    (--faiss) exact inner-product index over the rows
    items.hnsw.faiss    (--faiss) HNSW inner-product index (M = 32, efConstruction 200; efSearch 128 saved)

A user's scores are `user_vector @ embeddings.T`; their top-k are the recommendations (exclude the history as
`iisan recommend` does). The user program takes *row numbers* of items.safetensors (0-based, -1 = padding) so
that a client needs only the ids file to build an input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from iisan.deploy.run import TrainedRun

HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 200, 128


class UserProgram(nn.Module):
    """The user side as one module: item rows -> embeddings (the table is inside) -> the user encoder's last
    position."""

    def __init__(self, run: TrainedRun):
        super().__init__()
        self.register_buffer("table", run.table.detach().clone().float())
        self.user = run.model.user
        self.twin_user = run.model.twin_user  # a --cold-merge hybrid: users merged as evaluation merges them
        self.cosine = run.model.objective.score == "cosine"  # scores are cos / temperature: users scaled so
        if self.cosine:
            self.register_buffer("temperature", run.model.temperature().detach().clone().float())

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        index = rows + 1                                   # row r is universe index r + 1; padding -1 -> 0
        if self.twin_user is not None:
            from iisan.train.model import merge_users

            return merge_users(self.user, self.twin_user, index, self.table)
        users = self.user(self.table[index], index != 0)[:, -1]
        return nn.functional.normalize(users, dim=-1) / self.temperature if self.cosine else users


def export_program(run: TrainedRun, path: Path) -> None:
    program = UserProgram(run).eval()
    example = torch.full((2, run.cfg.max_seq_len), -1, dtype=torch.long)
    example[:, -1] = 0
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with torch.no_grad():
        exported = torch.export.export(program, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(exported, str(path))


def faiss_indexes(embeddings: torch.Tensor, out: Path) -> dict[str, str]:
    try:
        import faiss
    except ImportError:
        from iisan.errors import IisanError

        raise IisanError("--faiss needs faiss-cpu: pip install 'iisan-versa[faiss]'") from None
    x = embeddings.detach().float().contiguous().numpy()
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    faiss.write_index(flat, str(out / "items.flat.faiss"))
    hnsw = faiss.IndexHNSWFlat(x.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    hnsw.add(x)
    hnsw.hnsw.efSearch = HNSW_EF_SEARCH
    faiss.write_index(hnsw, str(out / "items.hnsw.faiss"))
    return {"flat": "items.flat.faiss", "hnsw": "items.hnsw.faiss"}


def export_run(run: TrainedRun, out: Path, with_faiss: bool = False) -> dict[str, Any]:
    from safetensors.torch import save_file

    from iisan.runtime import git_commit

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids, embeddings = run.item_embeddings()
    save_file({"embeddings": embeddings.float().contiguous().cpu()}, str(out / "items.safetensors"),
              metadata={"item_ids": json.dumps(ids)})
    (out / "item_ids.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    export_program(run, out / "user_encoder.pt2")
    indexes = faiss_indexes(embeddings, out) if with_faiss else {}
    report = json.loads((run.run_dir / "report.json").read_text()) if (run.run_dir / "report.json").is_file() else {}
    meta = {
        "dataset": run.dataset.name,
        "dataset_fingerprint": run.dataset.fingerprint(["title"] if "title" in run.dataset.items.fields else []),
        "run_dir": str(run.run_dir), "method": run.cfg.method, "seed": run.seed,
        "caches": {slot: {"path": str(x.path), "model": x.manifest.model,
                          "dataset_fingerprint": x.manifest.dataset_fingerprint, "layers": x.layers,
                          "standardized": x.standardized}
                   for slot, x in run.setup.slots.items()},
        "items": len(ids), "dim": int(embeddings.shape[1]), "max_seq_len": run.cfg.max_seq_len,
        "metric": "inner product", "embeds_content": run.embeds_content,
        "user_program": {"file": "user_encoder.pt2", "input": "int64 [B, L] item rows, left-padded with -1",
                         "output": f"float32 [B, {int(embeddings.shape[1])}]"},
        "faiss": indexes and {**indexes, "hnsw_m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION,
                              "ef_search": HNSW_EF_SEARCH},
        "test": report.get("test"), "commit": git_commit(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    return meta
