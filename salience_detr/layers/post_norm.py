"""The post-norm transformer layer shared by the encoder, the decoder and the RoI head.

Each attention sublayer and the ReLU feed-forward network is closed by dropout, the residual add and a LayerNorm
(``x = norm(x + dropout(f(x)))``, as in the official Salience DETR and Deformable DETR). The three layers differ
only in their attention modules and in the names the official checkpoints give them, so the subclass names every
sublayer and this class registers the modules under exactly those names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class PostNormLayer(nn.Module):
    """Attention sublayers then an FFN, each with dropout, residual add and LayerNorm.

    ``attentions`` holds ``(name, module, norm_name)`` per attention sublayer in construction order; the FFN
    weights are ``linear1``/``linear2`` and its norm is ``ffn_norm``. Dropouts are ``dropout1``, ``dropout2``, ... in
    the same order (they hold no state). Registration follows that order, so parameter order and the random stream of
    a seeded initialisation stay those of a layer written out by hand. Subclasses write ``forward`` with
    :meth:`residual` after each attention call and :meth:`feed_forward` last.
    """

    #: True once ``linear1`` applies the FFN's ReLU itself (an inference-only layer with the ReLU fused into the matmul)
    relu_in_linear1: bool = False
    #: Rows per FFN call (None: all at once; an inference lever). Chunks keep the (rows, ffn_dim) hidden activations in
    #: cache; unchunked, 5,466 encoder tokens make a 45 MB hidden tensor that the allocator maps afresh on every call.
    ffn_chunk_rows: int | None = None

    def __init__(
        self,
        *,
        embed_dim: int,
        ffn_dim: int,
        dropout: float,
        attentions: Sequence[tuple[str, nn.Module, str]],
        ffn_norm: str,
    ) -> None:
        super().__init__()
        if embed_dim < 1 or ffn_dim < 1:
            raise ValueError(f"embed_dim and ffn_dim must be positive, got {embed_dim} and {ffn_dim}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}.")
        names = [name for attention, _, norm in attentions for name in (attention, norm)] + [ffn_norm]
        if len(set(names)) != len(names):
            raise ValueError(f"sublayer and norm names must be distinct, got {names}.")
        self.embed_dim = embed_dim
        self._residuals: dict[str, tuple[str, str]] = {}
        for index, (name, module, norm_name) in enumerate(attentions, start=1):
            self.add_module(name, module)
            self.add_module(f"dropout{index}", nn.Dropout(dropout))
            self.add_module(norm_name, nn.LayerNorm(embed_dim))
            self._residuals[name] = (f"dropout{index}", norm_name)
        first_ffn_dropout = len(attentions) + 1
        self.linear1 = nn.Linear(embed_dim, ffn_dim)
        self.add_module(f"dropout{first_ffn_dropout}", nn.Dropout(dropout))
        self.linear2 = nn.Linear(ffn_dim, embed_dim)
        self.add_module(f"dropout{first_ffn_dropout + 1}", nn.Dropout(dropout))
        self.add_module(ffn_norm, nn.LayerNorm(embed_dim))
        self._ffn = (f"dropout{first_ffn_dropout}", f"dropout{first_ffn_dropout + 1}", ffn_norm)

    def residual(self, name: str, query: Tensor, update: Tensor) -> Tensor:
        """``norm(query + dropout(update))`` with the dropout and norm of the attention sublayer ``name``."""
        dropout, norm = self._residuals[name]
        return getattr(self, norm)(query + getattr(self, dropout)(update))

    def feed_forward(self, query: Tensor) -> Tensor:
        """``norm(query + dropout(linear2(dropout(relu(linear1(query))))))``, by ``ffn_chunk_rows`` rows if set."""
        rows = query.reshape(-1, query.shape[-1])  # one reshape instead of one around each linear
        chunk = self.ffn_chunk_rows
        if chunk is None or rows.shape[0] <= chunk:
            return self._feed_forward_rows(rows).view(query.shape)
        return torch.cat([self._feed_forward_rows(part) for part in rows.split(chunk)]).view(query.shape)

    def _feed_forward_rows(self, rows: Tensor) -> Tensor:
        inner_dropout, outer_dropout, norm = self._ffn
        hidden = self.linear1(rows)
        if not self.relu_in_linear1:
            hidden = torch.relu(hidden)
        ffn = self.linear2(getattr(self, inner_dropout)(hidden))
        return getattr(self, norm)(rows + getattr(self, outer_dropout)(ffn))

    def xavier_init(self, attention: nn.MultiheadAttention) -> None:
        """Xavier-uniform projections of ``attention`` and FFN weights (biases keep theirs), as the official layers."""
        nn.init.xavier_uniform_(attention.in_proj_weight)
        nn.init.xavier_uniform_(attention.out_proj.weight)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)
