"""Heads: turn the depth-ordered sequence of projected block features into one raw score.

The sequence heads take a (batch, taps, dim) tensor and return a (batch,) tensor. The paper's head is
`lstm`; `bilstm` and `transformer` are its future work; `last` is the baseline it argues against
(only the deepest block, as MemNet-style models do).

`linear-ensemble` (a `POOLED_HEADS` member) reads the pooled taps themselves, with no projection:
(batch, sum(channels)) -> (batch, members), one linear read-out per ensemble member. It is fitted in
closed form (ridge regression per expert group, bootstrap members: resmemnet.train.ridge), and the
spread of its members is the score's uncertainty. `gated-ensemble` adds a second set of read-outs, the
fallback, and a gate: a logistic read-out that says how much a photo looks like the training photos.
The score is gate * in-domain + (1 - gate) * fallback, so photos unlike the training set lean on
experts that keep the trunk's general knowledge (resmemnet-large: LNSIM's outdoor scenes vs the rest).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from resmemnet.model.config import ENSEMBLE_HEADS
from resmemnet.model.registry import Registry

__all__ = ["HEADS", "POOLED_HEADS", "GatedEnsemble", "LinearEnsemble", "PeepholeLSTM", "create_head"]

HEADS: Registry[Callable[..., nn.Module]] = Registry("head")
POOLED_HEADS = frozenset(ENSEMBLE_HEADS)  # heads that read the pooled taps, not a projected sequence


def create_head(name: str, *, in_dim: int, seq_len: int, hidden_dim: int, dropout: float, peephole: bool,
                members: int = 1) -> nn.Module:
    return HEADS.get(name)(in_dim=in_dim, seq_len=seq_len, hidden_dim=hidden_dim, dropout=dropout, peephole=peephole,
                           members=members)


def _he_state(layers: int, hidden_dim: int) -> nn.Parameter:
    # The paper initialises h0 and c0 with He initialisation; learnable here so training can adapt them.
    state = torch.empty(layers, hidden_dim)
    nn.init.kaiming_normal_(state)
    return nn.Parameter(state.unsqueeze(1))


class PeepholeLSTM(nn.Module):
    """The paper's pseudocode cell (Greff et al.'s vanilla LSTM): gates also see the cell state.

    i = s(Wx x + Wh h + wci*c_prev + b), f likewise, c = f*c_prev + i*tanh(...),
    o = s(Wx x + Wh h + wco*c + b), h = o*tanh(c). Peephole weights are diagonal (vectors).
    """

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.x2gates = nn.Linear(in_dim, 4 * hidden_dim)
        self.h2gates = nn.Linear(hidden_dim, 4 * hidden_dim, bias=False)
        self.w_ci = nn.Parameter(torch.zeros(hidden_dim))
        self.w_cf = nn.Parameter(torch.zeros(hidden_dim))
        self.w_co = nn.Parameter(torch.zeros(hidden_dim))
        bound = 1 / math.sqrt(hidden_dim)
        for p in (self.x2gates.weight, self.h2gates.weight, self.x2gates.bias):
            nn.init.uniform_(p, -bound, bound)

    def forward(self, seq: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_gates = self.x2gates(seq)  # all time steps at once; only the recurrence is sequential
        for t in range(seq.shape[1]):
            gi, gf, gg, go = (x_gates[:, t] + self.h2gates(h)).chunk(4, dim=1)
            i = torch.sigmoid(gi + self.w_ci * c)
            f = torch.sigmoid(gf + self.w_cf * c)
            c = f * c + i * torch.tanh(gg)
            o = torch.sigmoid(go + self.w_co * c)
            h = o * torch.tanh(c)
        return h, c


class LSTMHead(nn.Module):
    """LSTM over the taps, learnable He-initialised (h0, c0), last hidden state -> linear."""

    def __init__(self, in_dim: int, hidden_dim: int, dropout: float, bidirectional: bool, peephole: bool):
        super().__init__()
        if peephole and bidirectional:
            raise ValueError("The peephole cell is unidirectional; use head='lstm' with peephole=True")
        directions = 2 if bidirectional else 1
        self.peephole = peephole
        self.rnn = PeepholeLSTM(in_dim, hidden_dim) if peephole else nn.LSTM(
            in_dim, hidden_dim, batch_first=True, bidirectional=bidirectional
        )
        self.h0 = _he_state(directions, hidden_dim)
        self.c0 = _he_state(directions, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(directions * hidden_dim, 1)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        batch = seq.shape[0]
        h0 = self.h0.expand(-1, batch, -1).contiguous()
        c0 = self.c0.expand(-1, batch, -1).contiguous()
        if self.peephole:
            last, _ = self.rnn(seq, h0[0], c0[0])
        else:
            _, (h_n, _) = self.rnn(seq, (h0, c0))
            # h_n holds each direction's final state: forward after the deepest tap, backward after the first.
            last = h_n.transpose(0, 1).reshape(batch, -1)
        return self.fc(self.dropout(last)).squeeze(1)


class TransformerHead(nn.Module):
    """A small pre-norm Transformer encoder over the taps, read out through a [CLS] token."""

    def __init__(self, in_dim: int, seq_len: int, hidden_dim: int, dropout: float, layers: int = 2, heads: int = 4):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, in_dim))
        self.pos = nn.Parameter(torch.zeros(1, seq_len + 1, in_dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            in_dim, heads, dim_feedforward=2 * hidden_dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(in_dim)
        self.fc = nn.Linear(in_dim, 1)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        if seq.shape[1] + 1 != self.pos.shape[1]:
            raise ValueError(f"Transformer head built for {self.pos.shape[1] - 1} taps, got {seq.shape[1]}")
        x = torch.cat([self.cls.expand(seq.shape[0], -1, -1), seq], dim=1) + self.pos
        return self.fc(self.norm(self.encoder(x)[:, 0])).squeeze(1)


class LastHead(nn.Module):
    """Baseline: only the deepest block's features -> linear (what the paper argues against)."""

    def __init__(self, in_dim: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, 1)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(seq[:, -1])).squeeze(1)


class LinearEnsemble(nn.Module):
    """`members` linear read-outs of the pooled taps: (batch, in_dim) -> (batch, members)."""

    def __init__(self, in_dim: int, members: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, members)
        nn.init.zeros_(self.fc.weight)  # fitted in closed form, never by gradient steps from a random start
        nn.init.zeros_(self.fc.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)

    def readouts(self) -> list[nn.Linear]:
        """The layers whose outputs are member logits (calibration rescales each of them the same way)."""
        return [self.fc]


class GatedEnsemble(LinearEnsemble):
    """In-domain and fallback read-outs mixed by a gate: g * fc(x) + (1 - g) * fallback(x), g = sigmoid(gate(x))."""

    def __init__(self, in_dim: int, members: int):
        super().__init__(in_dim, members)
        self.fallback = nn.Linear(in_dim, members)
        self.gate = nn.Linear(in_dim, 1)
        for layer in (self.fallback, self.gate):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(pooled))
        return g * self.fc(pooled) + (1 - g) * self.fallback(pooled)

    def readouts(self) -> list[nn.Linear]:
        return [self.fc, self.fallback]


@HEADS.register("lstm")
def lstm(*, in_dim: int, hidden_dim: int, dropout: float, peephole: bool = False, **_: object) -> nn.Module:
    return LSTMHead(in_dim, hidden_dim, dropout, bidirectional=False, peephole=peephole)


@HEADS.register("bilstm")
def bilstm(*, in_dim: int, hidden_dim: int, dropout: float, peephole: bool = False, **_: object) -> nn.Module:
    return LSTMHead(in_dim, hidden_dim, dropout, bidirectional=True, peephole=peephole)


@HEADS.register("transformer")
def transformer(*, in_dim: int, seq_len: int, hidden_dim: int, dropout: float, **_: object) -> nn.Module:
    return TransformerHead(in_dim, seq_len, hidden_dim, dropout)


@HEADS.register("last")
def last(*, in_dim: int, dropout: float, **_: object) -> nn.Module:
    return LastHead(in_dim, dropout)


@HEADS.register("linear-ensemble")
def linear_ensemble(*, in_dim: int, members: int, **_: object) -> nn.Module:
    return LinearEnsemble(in_dim, members)


@HEADS.register("gated-ensemble")
def gated_ensemble(*, in_dim: int, members: int, **_: object) -> nn.Module:
    return GatedEnsemble(in_dim, members)
