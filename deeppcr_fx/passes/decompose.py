"""Ops without vmap batching rules, replaced in a chain's step template so every step is evaluated in one batched call.

``torch.gru_cell``, ``lstm_cell``, ``rnn_tanh_cell`` and ``rnn_relu_cell`` (what ``nn.GRUCell``,
``nn.LSTMCell`` and ``nn.RNNCell`` call) have no ``torch.func.vmap`` batching rule: vmap falls
back to a loop over the steps, one kernel launch per step, and the parallel solve loses to the
plain loop by a wide margin. In a chain's step template they are replaced by the same
arithmetic in ops vmap batches (``linear``, ``chunk``, ``sigmoid``, ``tanh``), in the order
ATen computes it (``aten/src/ATen/native/RNN.cpp``), so results agree to rounding.

``torch.nn.functional.scaled_dot_product_attention`` (CPU) has no batching rule either; it becomes
``runtime/attention.py``'s version, which calls eager's own kernels with vmap's dimension folded into
the kernel's batch (equal to eager's results bit for bit, gradients included).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..runtime.attention import scaled_dot_product_attention


def gru_cell(input: torch.Tensor, hx: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
             b_ih: Optional[torch.Tensor] = None, b_hh: Optional[torch.Tensor] = None) -> torch.Tensor:
    i_r, i_z, i_n = F.linear(input, w_ih, b_ih).chunk(3, -1)
    h_r, h_z, h_n = F.linear(hx, w_hh, b_hh).chunk(3, -1)
    reset = torch.sigmoid(i_r + h_r)
    update = torch.sigmoid(i_z + h_z)
    new = torch.tanh(i_n + reset * h_n)
    return (hx - new) * update + new


def lstm_cell(input: torch.Tensor, hx: tuple, w_ih: torch.Tensor, w_hh: torch.Tensor,
              b_ih: Optional[torch.Tensor] = None, b_hh: Optional[torch.Tensor] = None) -> tuple:
    h, c = hx
    i, f, g, o = (F.linear(input, w_ih, b_ih) + F.linear(h, w_hh, b_hh)).chunk(4, -1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_next), c_next


def rnn_tanh_cell(input: torch.Tensor, hx: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                  b_ih: Optional[torch.Tensor] = None, b_hh: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.tanh(F.linear(input, w_ih, b_ih) + F.linear(hx, w_hh, b_hh))


def rnn_relu_cell(input: torch.Tensor, hx: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                  b_ih: Optional[torch.Tensor] = None, b_hh: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.relu(F.linear(input, w_ih, b_ih) + F.linear(hx, w_hh, b_hh))


# the op -> its batched form (torch._VF.gru_cell is torch.gru_cell, F.scaled_dot_product_attention is
# torch._C._nn.scaled_dot_product_attention, and so on)
DECOMPOSITIONS = {torch.gru_cell: gru_cell, torch.lstm_cell: lstm_cell,
                  torch.rnn_tanh_cell: rnn_tanh_cell, torch.rnn_relu_cell: rnn_relu_cell,
                  F.scaled_dot_product_attention: scaled_dot_product_attention}
