"""2-D toy datasets of the DDPM codebase: gaussian8, gaussian25, swissroll (tqch/ddpm-torch toy/toy_data.py).

Every dataset is float32 [size, 2], divided by its total standard deviation so that both coordinates
have about unit variance. The arithmetic and the order of the random draws are the reference's, so
for the same numpy version the points are bit-identical:

- gaussian8: noise from numpy.random.default_rng(seed); the mode of each point from numpy's *global*
  RNG in the reference. We draw the modes from numpy.random.RandomState(seed) instead, which equals the
  reference run right after numpy.random.seed(seed) and leaves the global RNG alone.
- gaussian25: noise from default_rng(seed); point n sits at mode n % 25.
- swissroll: scikit-learn's make_swiss_roll(size, noise=0.25, random_state=seed), columns x and z,
  written out here with the same RandomState draws (scikit-learn is not needed).

The reference's train_toy.py builds its datasets with random_state=None (fresh OS entropy); we take a
seed (default 1234), so a toy run is reproducible; seed=None gives the reference's behaviour.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

TOY_DATASETS = ('gaussian8', 'gaussian25', 'swissroll')
DEFAULT_NOISE = {'gaussian8': 0.02, 'gaussian25': 0.05, 'swissroll': 0.25} # reference constructor defaults
MODE_SCALE = 2 # gaussian8 / gaussian25: distance unit of the mode grid

#----------------------------------------------------------------------------
# The modes and normalising standard deviations.

def gaussian8_modes() -> np.ndarray:
    """The 8 modes 2 (cos(k pi/4), sin(k pi/4)), k = 0..7, as float32 [8, 2]."""
    unit = [(math.cos(0.25 * k * math.pi), math.sin(0.25 * k * math.pi)) for k in range(8)]
    return MODE_SCALE * np.array(unit, dtype=np.float32)

def gaussian25_modes() -> np.ndarray:
    """The 25 modes 2 (i, j), i = -2..2 (outer), j = -2..2 (inner), as float32 [25, 2]."""
    grid = [(i, j) for i in range(-2, 3) for j in range(-2, 3)]
    return MODE_SCALE * np.array(grid, dtype=np.float32)

def toy_stdev(name: str, noise: float | None = None) -> float | np.ndarray:
    """Total standard deviation of a dataset: noise variance + variance of the mode (law of total variance).
    Swiss roll: var(t cos t) and var(t sin t) for t ~ U(1.5 pi, 4.5 pi), per coordinate, [1, 2]."""
    check_toy_name(name)
    noise = DEFAULT_NOISE[name] if noise is None else noise
    if name == 'gaussian8':
        return math.sqrt(noise ** 2 + MODE_SCALE ** 2 * 0.5)
    if name == 'gaussian25':
        return math.sqrt(noise ** 2 + MODE_SCALE ** 2 * 2.0)
    return np.sqrt(np.full([1, 2], 39 * math.pi ** 2 / 8 - 4) + (np.array([[-1, 1]]) * 0.25 + noise ** 2))

def check_toy_name(name: str) -> None:
    """ValueError naming the valid datasets."""
    if name not in TOY_DATASETS:
        raise ValueError(f'--dataset={name} is not a toy dataset; choose from {", ".join(TOY_DATASETS)}')

#----------------------------------------------------------------------------
# Sampling.

def make_toy_dataset(name: str, size: int, seed: int | None = 1234, noise: float | None = None) -> np.ndarray:
    """`size` points of a 2-D toy dataset as float32 [size, 2] (ddpm-torch Gaussian8/Gaussian25/SwissRoll);
    seed None = fresh OS entropy, as the reference's random_state=None."""
    check_toy_name(name)
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f'--size={size} must be a positive integer')
    noise = DEFAULT_NOISE[name] if noise is None else float(noise)
    if noise < 0:
        raise ValueError(f'toy noise std {noise} must be >= 0')
    stdev = toy_stdev(name, noise)
    if name == 'swissroll':
        data = _swiss_roll(size, noise, np.random.RandomState(seed))[:, [0, 2]].astype(np.float32)
        data /= stdev
        return data
    data = noise * np.random.default_rng(seed).standard_normal((size, 2), dtype=np.float32)
    if name == 'gaussian8':
        data += gaussian8_modes()[np.random.RandomState(seed).choice(np.arange(8), size=size, replace=True)]
    else:
        data += gaussian25_modes()[np.arange(size) % 25]
    data /= stdev
    return data

def _swiss_roll(size: int, noise: float, rng: np.random.RandomState) -> np.ndarray:
    """scikit-learn make_swiss_roll(hole=False) points [size, 3]: (t cos t, h, t sin t) + noise."""
    t = 1.5 * np.pi * (1 + 2 * rng.uniform(size=size))
    height = 21 * rng.uniform(size=size)
    points = np.vstack((t * np.cos(t), height, t * np.sin(t)))
    points += noise * rng.standard_normal(size=(3, size))
    return points.T

#----------------------------------------------------------------------------
# Batches for training.

class ToyDataStream:
    """Batches of a toy dataset (ddpm-torch DataStreamer): one draw of batch_size * num_batches points
    served in order, num_batches batches per epoch; with resample, a fresh draw after every epoch."""

    def __init__(self,
        name:        str,                   # One of TOY_DATASETS.
        batch_size:  int,                   # Points per batch.
        num_batches: int,                   # Batches per epoch; the dataset holds batch_size * num_batches points.
        seed:        int | None   = 1234,   # Seed of epoch 0's draw; later ones derive from (seed, epoch). None = OS entropy.
        resample:    bool         = False,  # Draw new points after each epoch? False = the reference default.
        noise:       float | None = None,   # Noise std. None = the dataset's default.
    ):
        if not isinstance(batch_size, int) or batch_size < 1 or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f'--batch-size={batch_size} and the number of batches ({num_batches}) must be positive integers')
        self.name, self.batch_size, self.num_batches = name, batch_size, num_batches
        self.seed, self.resample, self.noise = seed, resample, noise
        self.set_epoch(0)

    def epoch_seed(self, epoch: int) -> int:
        """Seed of the draw used in `epoch`: `seed` itself for epoch 0 (or without resampling)."""
        if epoch == 0 or not self.resample or self.seed is None:
            return self.seed
        return int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration serve `epoch`'s points (for resuming)."""
        self.epoch = epoch
        self.data = make_toy_dataset(self.name, self.batch_size * self.num_batches, self.epoch_seed(epoch), self.noise)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(self.num_batches):
            yield torch.from_numpy(self.data[i * self.batch_size:(i + 1) * self.batch_size])
        if self.resample:
            self.set_epoch(self.epoch + 1)
