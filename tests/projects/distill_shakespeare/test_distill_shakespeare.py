"""projects/distill_shakespeare: the validation metric by hand (the loop itself is moekit.recipes.distill,
tested in tests/test_distill.py)."""
import math

import torch
from torch import nn

from projects.distill_shakespeare.run import nats_per_char


class _Uniform(nn.Module):
    """Logits all zero: cross-entropy is exactly log V per character."""

    def __init__(self, V):
        super().__init__()
        self.V, self.w = V, nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return (torch.zeros(*x.shape, self.V) + 0 * self.w,)


def test_nats_per_char_of_a_uniform_model_is_log_vocab():
    batches = [(torch.zeros(2, 5, dtype=torch.long), torch.randint(0, 7, (2, 5)), None),
               (torch.zeros(1, 3, dtype=torch.long), torch.randint(0, 7, (1, 3)), None)]
    m = _Uniform(7)
    assert math.isclose(nats_per_char(m, batches), math.log(7), rel_tol=1e-6)
    assert m.training                                     # mode restored to train
