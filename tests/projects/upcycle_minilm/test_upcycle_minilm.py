"""projects/upcycle_minilm: which parameters train (the model itself is an optional wheel)."""
import pytest
from torch import nn

from projects.upcycle_minilm.run import trainable


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.Module()
        self.attention.output = nn.Linear(2, 2)
        self.intermediate = nn.Linear(2, 2)
        self.output = nn.Linear(2, 2)


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = nn.Embedding(5, 2)
        self.layer = nn.ModuleList([_Layer()])


def test_ffn_mode_trains_only_ffn_layers_and_all_mode_trains_everything():
    m = _Encoder()
    keep = trainable(m, "ffn")
    on = {n for n, p in m.named_parameters() if p.requires_grad}
    assert on == {"layer.0.intermediate.weight", "layer.0.intermediate.bias", "layer.0.output.weight",
                  "layer.0.output.bias"} and len(keep) == 4
    assert len(trainable(m, "all")) == len(list(m.parameters())) and all(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="'all' or 'ffn'"):
        trainable(m, "attention")
