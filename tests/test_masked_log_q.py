"""The masked proposal's log-probability: a dead-end row weighs zero, never NaN."""

import math

import torch

from smcgen.samplers.step import masked_log_q, token_weights


def test_dead_end_row_gets_zero_weight_and_live_rows_their_ratio():
    lp = torch.tensor([-1.0, -math.inf])  # second row: nothing allowed, so its draw has -inf log-prob
    ln = torch.tensor([-0.25, -math.inf])
    q = masked_log_q(lp, ln)
    assert q[0].item() == -0.75 and q[1].item() == math.inf
    w = token_weights(torch.tensor([[-2.0], [-3.0]]), q[:, None], None)
    assert w[0, 0].item() == -1.25 and w[1, 0].item() == -math.inf
    assert not torch.isnan(w).any()
