"""Tiny persistent classes for the persistence tests (registered on import)."""

import torch

from torch_utils import persistence


@persistence.persistent_class
class TinyNet(torch.nn.Module):
    """A two-layer network with a buffer, constructible from its init kwargs."""

    def __init__(self, channels=4, scale=2.0):
        super().__init__()
        self.scale = scale
        self.fc1 = torch.nn.Linear(channels, channels)
        self.fc2 = torch.nn.Linear(channels, 1)
        self.register_buffer('offset', torch.zeros([1]))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) * self.scale + self.offset


@persistence.persistent_class
class TinyWrapper(torch.nn.Module):
    """A persistent module holding another persistent module."""

    def __init__(self, channels=4):
        super().__init__()
        self.inner = TinyNet(channels=channels, scale=0.5)

    def forward(self, x):
        return self.inner(x) + 1
