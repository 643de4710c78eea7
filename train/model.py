"""The recommender: an item encoder (IISAN side networks, the frozen-backbone baseline, or ID embeddings),
the SASRec user encoder, the loss and full-ranking scoring, RecBole-style (`calculate_loss`,
`item_table`, `user_vectors`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from iisan.train.distributed import BatchShard, current_window, global_uniform, sample_window
from iisan.train.loss import full_softmax_loss, inbatch_debiased_loss, sampled_debiased_loss
from iisan.train.san import SANConfig, SideNetwork, Slot
from iisan.train.user_encoder import UserEncoder


class CachedItems(nn.Module):
    """Base for item encoders over cached states held as buffers (not parameters, not in checkpoints)."""

    table_batch_size = 4096  # items per call when the whole item table is encoded for evaluation

    def __init__(self, states: dict[str, torch.Tensor]):
        super().__init__()
        self.slots = list(states)
        for slot, tensor in states.items():
            self.register_buffer(f"states_{slot}", tensor, persistent=False)

    def gather(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        # States may be held in fp16 (the cache's dtype); only the gathered rows are cast, exactly.
        return {slot: getattr(self, f"states_{slot}")[index].float() for slot in self.slots}


class IISANItems(CachedItems):
    def __init__(self, states: dict[str, torch.Tensor], cfg: SANConfig):
        super().__init__(states)
        self.side = SideNetwork({s: t.shape[1] for s, t in states.items()},
                                {s: t.shape[2] for s, t in states.items()}, cfg)

    def lr_groups(self, cfg) -> list[tuple[list[nn.Parameter], float]]:
        """SAN blocks, gates and DTLs at lr_san (the rest at the recipe's default, lr)."""
        return [(self.side.san_parameters(), cfg.lr_san)]

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.embed_states(self.gather(index), index)

    def embed_states(self, states: dict[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        """Embeddings of items given their cached states (rows as `gather` returns them) and their training
        index (0 for an item the run never trained on): how recommendations embed every item of a store."""
        return self.side(states)


class LastStateHeads(nn.Module):
    """docs/method.md §7's heads: each modality's final output through GELU(Linear(D -> d)), the parts (the
    second slot first) fused by Linear(parts * d -> d). Shared by the frozen-backbone baseline and the
    end-to-end ones."""

    def __init__(self, dims: dict[str, int], dim: int):
        super().__init__()
        self.order = [s for s in dims if s != Slot.TEXT.value] + [Slot.TEXT.value]
        self.heads = nn.ModuleDict({s: nn.Linear(dims[s], dim) for s in self.order})
        self.fusion = nn.Linear(len(self.order) * dim, dim)

    def forward(self, last: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fusion(torch.cat([nn.functional.gelu(self.heads[s](last[s])) for s in self.order], -1))


class FrozenItems(CachedItems):
    """docs/method.md §7 "Frozen backbone": each modality's final output (after the model's final norm, read
    from the cache as one state per item) through the baseline heads."""

    def __init__(self, states: dict[str, torch.Tensor], dim: int):
        super().__init__(states)
        self.head = LastStateHeads({s: t.shape[2] for s, t in states.items()}, dim)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.embed_states(self.gather(index), index)

    def embed_states(self, states: dict[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        return self.head({s: t[:, -1] for s, t in states.items()})


class IDItems(nn.Module):
    """SASRec with ID embeddings, no content."""

    table_batch_size = 1 << 20

    def __init__(self, n_items: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_items + 1, dim, padding_idx=0)
        nn.init.xavier_normal_(self.embedding.weight)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.embedding(index)


class HybridItems(IISANItems):
    """IISAN's fused content embedding plus a learned item-ID embedding of the same width d, added after the
    fusion layer (docs/method.md §7.1). In training each item occurrence's ID part is zeroed with probability
    `id_dropout` (`dropout_unit` "occurrence"), or each item's everywhere in the step ("item": the step then
    holds items with no ID part, as evaluation holds cold ones), so that the content path alone stays a good
    embedding; an item that never occurs in
    training (`seen` false: its ID vector never received a gradient) always gets its content embedding
    alone. The ID table starts at zero (`id_init="zero"`, the model then starts as plain IISAN) or Xavier
    normal as SASRec's (`"xavier"`)."""

    def __init__(self, states: dict[str, torch.Tensor], cfg: SANConfig, seen: torch.Tensor, id_dropout: float,
                 id_init: str = "zero", content_loss: float = 0.0, twin: bool = False,
                 dropout_unit: str = "occurrence"):
        super().__init__(states, cfg)
        if dropout_unit not in ("occurrence", "item"):
            raise ValueError(f"dropout_unit '{dropout_unit}': occurrence or item")
        self.dropout_unit = dropout_unit
        self.kept: torch.Tensor | None = None  # "item": this training step's items that keep their ID part
        # twin (--cold-merge): a content-only recommender trained alongside; an item row of the table is then
        # [content + ID | content | seen] (docs/method.md §7.1) and Recommender ranks unseen items by the twin
        self.twin = twin
        if not 0.0 <= id_dropout < 1.0:
            raise ValueError(f"id_dropout {id_dropout}: a probability in [0, 1)")
        if content_loss < 0:
            raise ValueError(f"content_loss {content_loss}: a weight >= 0")
        self.id_dropout = id_dropout
        self.content_loss = content_loss
        self.last_content: torch.Tensor | None = None  # the last training batch's content part, per occurrence
        self.ids = nn.Embedding(len(seen), cfg.embedding_dim, padding_idx=0)
        if id_init == "zero":
            nn.init.zeros_(self.ids.weight)
        elif id_init == "xavier":
            nn.init.xavier_normal_(self.ids.weight)
            with torch.no_grad():
                self.ids.weight[0] = 0
        else:
            raise ValueError(f"id_init '{id_init}': zero or xavier")
        self.register_buffer("seen", seen.bool(), persistent=False)

    def lr_groups(self, cfg) -> list[tuple[list[nn.Parameter], float]]:
        """IISAN's groups, and the ID table at lr_id (0: the default lr)."""
        return super().lr_groups(cfg) + ([(list(self.ids.parameters()), cfg.lr_id)] if cfg.lr_id else [])

    def content(self, index: torch.Tensor) -> torch.Tensor:
        """The content part alone (what `content_loss` trains as a recommender of its own)."""
        return self.side(self.gather(index))

    def id_part(self, index: torch.Tensor) -> torch.Tensor:
        return self.ids(index) * self.seen[index].unsqueeze(-1)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """The item table's rows (evaluation; no dropout): content + ID, or with a twin [content + ID | content
        | seen]."""
        return self.embed_states(self.gather(index), index)

    def embed(self, index: torch.Tensor) -> torch.Tensor:
        """Content + ID: what the loss scores as a catalogue column (no per-occurrence dropout; with whole items
        dropped, the step's dropped items have their content alone here too)."""
        ids = self.id_part(index)
        if self.training and self.kept is not None:
            ids = ids * self.kept[index].unsqueeze(-1)
        return self.side(self.gather(index)) + ids

    def embed_states(self, states: dict[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        """Content + ID; an item with index 0 (never trained on) gets its content alone. With a twin, the row
        [content + ID | content | seen (1.0 / 0.0)]."""
        content = self.side(states)
        hybrid = content + self.id_part(index)
        if not self.twin:
            return hybrid
        return torch.cat([hybrid, content, self.seen[index].to(content.dtype).unsqueeze(-1)], dim=-1)

    def encode_occurrences(self, unique: torch.Tensor, inverse: torch.Tensor, per_sample: int = 1) -> torch.Tensor:
        """A training batch's embeddings, one per occurrence [occurrences, d]: the content of each unique item
        computed once, the ID part dropped per occurrence while training (`per_sample`: occurrences per user,
        for drawing the dropout per global sample inside `sample_window`)."""
        content = self.side(self.gather(unique)).index_select(0, inverse)
        self.last_content = content if self.training and (self.content_loss or self.twin) else None
        ids = self.id_part(unique).index_select(0, inverse)
        self.kept = None
        if self.training and self.id_dropout > 0 and self.dropout_unit == "item":
            # one draw per catalogue item and step: the same shape, so the same draw, on every distributed rank
            self.kept = torch.rand(self.ids.num_embeddings, device=ids.device) >= self.id_dropout
            ids = ids * self.kept[unique].index_select(0, inverse).unsqueeze(-1)
        elif self.training and self.id_dropout > 0:
            window = current_window()
            draw = (torch.rand(len(inverse), 1, device=ids.device) if window is None else
                    global_uniform(len(inverse), window, per_sample, ids.device))
            ids = ids * (draw >= self.id_dropout)
        return content + ids


@dataclass(frozen=True)
class Objective:
    """What the training loss scores (docs/method.md §3): `loss` in-batch | sampled (in-batch plus catalogue
    columns the step draws) | full (every training item); `score` dot, or cosine / temperature (the temperature
    fixed, or learned from `temperature`, kept >= 0.01); `chunk`: items the item tower encodes at once for the
    full softmax (each chunk recomputed in the backward pass, so memory holds one chunk's activations)."""

    loss: str = "in-batch"
    score: str = "dot"
    temperature: float = 0.1
    learn_temperature: bool = False
    chunk: int = 4096

    def __post_init__(self) -> None:
        if self.loss not in ("in-batch", "sampled", "full"):
            raise ValueError(f"loss '{self.loss}': in-batch, sampled or full")
        if self.score not in ("dot", "cosine"):
            raise ValueError(f"score '{self.score}': dot or cosine")
        if self.score == "cosine" and not self.temperature > 0:
            raise ValueError(f"temperature {self.temperature}: > 0")
        if self.chunk < 1:
            raise ValueError(f"chunk {self.chunk}: >= 1")


MIN_TEMPERATURE = 0.01


class Recommender(nn.Module):
    def __init__(self, items: nn.Module, n_items: int, dim: int = 64, heads: int = 2, blocks: int = 2,
                 max_len: int = 10, dropout: float = 0.1, objective: Objective = Objective()):
        super().__init__()
        self.items = items
        self.n_items = n_items
        self.user = UserEncoder(dim, heads, blocks, max_len, dropout)
        self.objective = objective
        self.twin_user = None
        if getattr(items, "twin", False):  # the hybrid's content-only twin: its own user encoder
            if objective.score != "dot":
                raise ValueError("--cold-merge ranks by dot products: give --score dot")
            self.twin_user = UserEncoder(dim, heads, blocks, max_len, dropout)
        if objective.score == "cosine":  # (a dot-product model has no temperature: its checkpoints stay as they were)
            log_t = torch.tensor(math.log(objective.temperature))
            if objective.learn_temperature:
                self.log_temperature = nn.Parameter(log_t)
            else:
                self.register_buffer("log_temperature", log_t, persistent=False)

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(min=MIN_TEMPERATURE)

    def scored(self, vectors: torch.Tensor, users: bool = False) -> torch.Tensor:
        """Vectors as the score compares them: unchanged for dot; for cosine unit length, and users' divided by
        the temperature (so that a dot product of the two is cos / temperature)."""
        if self.objective.score == "dot":
            return vectors
        unit = nn.functional.normalize(vectors, dim=-1)
        return unit / self.temperature().to(unit.dtype) if users else unit

    def ranking_table(self, table: torch.Tensor) -> torch.Tensor:
        """The item table users are ranked against: for cosine, unit rows (a user's own scale does not change
        their ranking, so user vectors are ranked as they are); with a twin, `twin_ranking_table`."""
        if self.twin_user is not None:
            return twin_ranking_table(table)
        return table if self.objective.score == "dot" else nn.functional.normalize(table, dim=-1)

    def encode_slots(self, ids: torch.Tensor) -> torch.Tensor:
        """Item embeddings of every slot, the unique items of the batch encoded once: [b, L + 1, d]."""
        unique, inverse = torch.unique(ids, return_inverse=True)
        # index_select, not `[inverse]`: the backward of advanced indexing accumulates with parallel atomic
        # adds on CPU, whose order (and so the last bits of the gradient) changes from run to run;
        # index_select's backward (index_add) is deterministic.
        if hasattr(self.items, "encode_occurrences"):  # an encoder with a per-occurrence part (hybrid IDs)
            out = self.items.encode_occurrences(unique, inverse.reshape(-1), ids.shape[1])
        else:
            out = self.items(unique).index_select(0, inverse.reshape(-1))
        return out.view(*ids.shape, out.shape[-1])  # (a distributed rank's share may be empty)

    def forward(self, ids: torch.Tensor, log_popularity: torch.Tensor, shard: BatchShard | None = None,
                columns: torch.Tensor | None = None, log_count: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss (what DistributedDataParallel calls)."""
        return self.calculate_loss(ids, log_popularity, shard, columns, log_count)

    def calculate_loss(self, ids: torch.Tensor, log_popularity: torch.Tensor, shard: BatchShard | None = None,
                       columns: torch.Tensor | None = None, log_count: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of a batch of train sequences ids [b, L + 1] under the objective: `columns` are the
        catalogue columns the step gives (sampled: M drawn item ids, `log_count` their log(M q); full: every
        training item). With `shard` (distributed training: ids are this rank's rows of a global batch), this
        rank's part of the global batch's loss: its rows scored against every rank's items (gathered with
        gradients) and the same catalogue columns, divided by the global count of valid rows, randomness drawn
        per global sample; the parts sum to the loss of the whole batch in one process."""
        if shard is None:
            return self._loss(ids, log_popularity, None, columns, log_count)
        with sample_window(shard.offset, shard.total):
            return self._loss(ids, log_popularity, shard, columns, log_count)

    def column_embeddings(self, columns: torch.Tensor, content_only: bool = False) -> torch.Tensor:
        """The catalogue columns' embeddings with gradients [K, d] (no per-occurrence dropout): in chunks of
        `objective.chunk` items, each recomputed in the backward pass when there are several."""
        encode = self.items.content if content_only else getattr(self.items, "embed", self.items)
        chunk = self.objective.chunk
        if len(columns) <= chunk:
            return encode(columns)
        return torch.cat([checkpoint(encode, columns[i:i + chunk], use_reentrant=False)
                          for i in range(0, len(columns), chunk)])

    def _loss(self, ids: torch.Tensor, log_popularity: torch.Tensor, shard: BatchShard | None,
              columns: torch.Tensor | None, log_count: torch.Tensor | None) -> torch.Tensor:
        loss_kind = self.objective.loss
        if (columns is None) != (loss_kind == "in-batch"):
            raise ValueError(f"loss {loss_kind}: " + ("the step gives no catalogue columns" if columns is None
                                                      else "catalogue columns given to the in-batch loss"))
        embeddings = self.encode_slots(ids)
        inputs = ids[:, :-1]
        mask = (inputs != 0) & (ids[:, 1:] != 0)
        count = None if shard is None else shard.world.sum(mask.sum())

        def loss_of(items: torch.Tensor, content_only: bool = False, user: nn.Module | None = None) -> torch.Tensor:
            states = self.scored((user or self.user)(items[:, :-1], inputs != 0), users=True)
            if loss_kind == "full":
                return full_softmax_loss(states, ids, mask, columns,
                                         self.scored(self.column_embeddings(columns, content_only)), count)
            slots = self.scored(items)
            every = (slots, ids) if shard is None else (shard.gather(slots, grad=True), shard.gather(ids))
            rows = {} if shard is None else {"row_ids": ids, "row_offset": shard.offset, "count": count}
            if loss_kind == "sampled":
                return sampled_debiased_loss(states, *every, mask, log_popularity, columns,
                                             self.scored(self.column_embeddings(columns, content_only)), log_count,
                                             **rows)
            return inbatch_debiased_loss(states, *every, mask, log_popularity, **rows)

        loss = loss_of(embeddings)
        content = getattr(self.items, "last_content", None)
        if content is not None:
            content = content.view(*ids.shape, content.shape[-1])
            if self.items.content_loss:  # hybrid with content_loss: the same loss with every ID part off
                loss = loss + self.items.content_loss * loss_of(content, content_only=True)
            if self.twin_user is not None:  # the twin: the same loss, content only, through its own user encoder
                loss = loss + loss_of(content, content_only=True, user=self.twin_user)
        return loss

    @torch.no_grad()
    def item_table(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Embeddings of items 0..N, once per evaluation: [N + 1, d] (rows start..stop of it, in the chunks
        one call on the whole table forms when start is a multiple of the chunk)."""
        device = next(self.parameters()).device
        batch_size = getattr(self.items, "table_batch_size", 4096)
        index = torch.arange(start, self.n_items + 1 if stop is None else stop, device=device)
        first = self.items(index[:batch_size])  # (an empty share, distributed evaluation: [0, d])
        # filled chunk by chunk: the table is held once, not as chunks and their concatenation (1M items x 64:
        # 256 MB less at the peak)
        table = first.new_empty((len(index), first.shape[1]))
        table[:len(first)] = first
        for i in range(batch_size, len(index), batch_size):
            table[i:i + batch_size] = self.items(index[i:i + batch_size])
        return table

    @torch.no_grad()
    def user_vectors(self, inputs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """The last position of the user encoder over left-padded windows [U, L] -> [U, d] (a copy: a view of
        the last position would keep the whole [U, L, d] output alive, 10x the memory of what is kept). With a
        twin, `merge_users`' [U, 2d + 1]."""
        if self.twin_user is not None:
            return merge_users(self.user, self.twin_user, inputs, table)
        return self.user(table[inputs], inputs != 0)[:, -1].clone()


def _score_moments(users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user's mean and standard deviation of u . e over the rows `items` [M, d], in closed form (the items'
    mean and covariance), without the [U, M] scores."""
    mean = items.mean(dim=0)
    centred = items - mean
    cov = centred.T @ centred / max(len(items), 1)
    return users @ mean, ((users @ cov) * users).sum(dim=1).clamp(min=1e-12).sqrt()


def merge_users(user: nn.Module, twin_user: nn.Module, inputs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """A twin hybrid's user vectors [U, 2d + 1] over the table [N + 1, 2d + 1] ([content + ID | content | seen]):
    [u | a u' | b], u the hybrid's user vector (over content + ID), u' the twin's (over content), and a, b the
    affine map of the user's twin scores onto the hybrid's that matches their mean and spread over the seen
    items (a = sd / sd', b = mean - a mean'). Against `twin_ranking_table` a seen item scores u . e_i, an unseen
    one a u' . c_i + b: its twin score, calibrated per user."""
    d = (table.shape[1] - 1) // 2
    hybrid, content, seen = table[:, :d], table[:, d:2 * d], table[:, -1] > 0.5
    mask = inputs != 0
    u = user(hybrid[inputs], mask)[:, -1]
    u_twin = twin_user(content[inputs], mask)[:, -1]
    mean, sd = _score_moments(u, hybrid[seen])
    mean_twin, sd_twin = _score_moments(u_twin, content[seen])
    a = sd / sd_twin
    return torch.cat([u, a[:, None] * u_twin, (mean - a * mean_twin)[:, None]], dim=1)


def twin_ranking_table(table: torch.Tensor) -> torch.Tensor:
    """[N + 1, 2d + 1]: a seen item's row [content + ID | 0 | 0], an unseen one's [0 | content | 1], padding 0."""
    d = (table.shape[1] - 1) // 2
    seen = table[:, -1:]
    out = torch.cat([table[:, :d] * seen, table[:, d:2 * d] * (1 - seen), 1 - seen], dim=1)
    out[0] = 0
    return out
