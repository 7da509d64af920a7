"""tools/cost_table.py: its parameter and FLOP counts agree with counts by hand on small modules."""
from pathlib import Path

import torch
from tests.helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "cost_table.py"


def _cost_table():
    return load_script(SCRIPT)


class Tiny(torch.nn.Module):
    """Linear 3->4 (trainable), Linear 4->2 (frozen, like the teacher), a tied copy and a buffer."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(3, 4)
        self.second = torch.nn.Linear(4, 2)
        self.second.requires_grad_(False)
        self.tied = torch.nn.Linear(3, 4)
        self.tied.weight = self.first.weight  # shared: counted once
        self.register_buffer("queue", torch.zeros(2, 7))

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_parameter_count_matches_a_count_by_hand():
    counts = _cost_table().count_parameters(Tiny())
    # first: 3*4 + 4; tied: its own bias 4 (the weight is first's); second (frozen): 4*2 + 2
    assert counts == {"trainable": 3 * 4 + 4 + 4, "total": 3 * 4 + 4 + 4 + 4 * 2 + 2, "buffers": 2 * 7}


def test_flop_count_matches_a_count_by_hand():
    cost_table = _cost_table()
    model, x = Tiny(), torch.randn(5, 3)
    # 2 FLOPs per multiply-add: (5x3)@(3x4) and (5x4)@(4x2); bias adds and the ReLU are not counted
    assert cost_table.count_flops(lambda: model(x)) == 2 * 5 * 3 * 4 + 2 * 5 * 4 * 2
    conv, image = torch.nn.Conv2d(2, 3, kernel_size=3), torch.randn(1, 2, 6, 6)
    # 3 output channels x 4x4 positions, each a 2x3x3 dot product
    assert cost_table.count_flops(lambda: conv(image)) == 2 * (3 * 4 * 4) * (2 * 3 * 3)
    # backward of x @ w with only w trainable: one more product of the same size (the gradient of w)
    w = torch.randn(3, 4, requires_grad=True)
    assert cost_table.count_flops(lambda: (x @ w).sum().backward()) == 2 * (2 * 5 * 3 * 4)
