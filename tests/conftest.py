import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    """The whole suite runs on one intra-op thread: its tensors are small, and on a 2-core machine where another
    process holds a core, two OpenMP threads spin on each other (measured: a group-lasso solve 80x slower, a
    float64 efficientnet forward minutes instead of seconds). Results are deterministic either way."""
    torch.set_num_threads(1)


class ConvBN1d(nn.Module):
    """Conv1d + BatchNorm1d and Linear + BatchNorm1d, the 1-D cases of fold_batchnorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8 * 16, 20)
        self.bn2 = nn.BatchNorm1d(20)
        self.out = nn.Linear(20, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.out(torch.relu(self.bn2(self.fc(x.flatten(1)))))


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics so folding it is a real test."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def trained():
    """LeNet-300-100 on 8x8 digits (64 inputs), trained for 15 epochs, and its test batches (tests copy it)."""
    from fxcompress.data import load_source
    from fxcompress.models import LeNet300
    from fxcompress.recipe import DataSource
    from fxcompress.training import accuracy, train
    torch.manual_seed(0)
    model = LeNet300(64)
    batches = load_source(DataSource(source="digits", split="train", batch_size=64, shuffle=True))
    test = load_source(DataSource(source="digits", split="test", batch_size=256))
    train(model, batches, epochs=15, lr=0.1, optimizer="sgd", progress=False)
    assert accuracy(model, test) > 0.95
    return model, test
