"""DDPM on 2-D toy data, as tqch/ddpm-torch train_toy.py: the `Decoder` MLP, its trainer, sampling,
the 2-D histogram KL of its evaluation and a scatter plot.

The data come from any iterable of float32 [batch, 2] tensors per epoch; `toy_example.py ddpm`
passes training/toy_data.py's ToyDataStream (train_toy.py's DataStreamer).
"""

from typing import Callable, Iterable

import numpy as np
import torch

import dnnlib
from training import ddpm
from training.networks_ddpm import get_timestep_embedding


class TemporalLayer(torch.nn.Module):
    """Pre-norm residual MLP block with an additive timestep encoding (ddpm-torch toy_model.py)."""

    def __init__(self, features: int):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(features)
        self.fc1 = torch.nn.Linear(features, features, bias=False)
        self.norm2 = torch.nn.LayerNorm(features)
        self.fc2 = torch.nn.Linear(features, features, bias=False)
        self.enc = torch.nn.Linear(features, features)

    def forward(self, h, t_emb):
        out = self.fc1(torch.nn.functional.leaky_relu(self.norm1(h), 0.02)) + self.enc(t_emb)
        out = self.fc2(torch.nn.functional.leaky_relu(self.norm2(out), 0.02))
        return out + h


class Decoder(torch.nn.Module):
    """The toy denoiser: ONE TemporalLayer applied num_temporal_layers times (shared weights, as the reference)."""

    def __init__(self,
        in_features:         int = 2,     # Data dimension (also the output width).
        mid_features:        int = 128,   # Hidden width and timestep-embedding width.
        num_temporal_layers: int = 3,     # Repeats of the shared TemporalLayer.
    ):
        super().__init__()
        self.in_features, self.mid_features = in_features, mid_features
        self.in_fc = torch.nn.Linear(in_features, mid_features, bias=False)
        layer = TemporalLayer(mid_features)
        self.temp_fc = torch.nn.ModuleList([layer] * num_temporal_layers)
        self.out_norm = torch.nn.LayerNorm(mid_features)
        self.out_fc = torch.nn.Linear(mid_features, in_features)
        self.t_proj = torch.nn.Sequential(torch.nn.Linear(mid_features, mid_features), torch.nn.LeakyReLU(0.02))

    def forward(self, x, t):
        t_emb = self.t_proj(get_timestep_embedding(t, self.mid_features))
        h = self.in_fc(x)
        for layer in self.temp_fc:
            h = layer(h, t_emb)
        return self.out_fc(self.out_norm(h))


def toy_diffusion(timesteps=100, beta_schedule='linear', beta_start=1e-3, beta_end=0.2, model_mean_type='eps',
                  model_var_type='fixed-large', loss_type='mse') -> ddpm.GaussianDiffusion:
    """The toy GaussianDiffusion (train_toy.py defaults): no clipping, continuous Gaussian decoder at t = 0."""
    betas = ddpm.get_beta_schedule(beta_schedule, beta_start, beta_end, timesteps)
    return ddpm.GaussianDiffusion(betas, model_mean_type, model_var_type, loss_type, continuous=True)


def train_toy_ddpm(
    data:           Iterable,               # Iterable of float32 [batch, D] tensors, one pass = one epoch.
    diffusion:      ddpm.GaussianDiffusion, # The toy diffusion (toy_diffusion()).
    epochs:         int = 100,              # Passes over `data`.
    lr:             float = 1e-3,           # Adam learning rate (betas 0.9, 0.999, no clipping).
    mid_features:   int = 128,              # Decoder width.
    num_layers:     int = 3,                # Decoder repeats of its shared layer.
    seed:           int = 1234,             # torch.manual_seed before building the model (seed_all).
    device:         torch.device = torch.device('cpu'),
    log:            Callable | None = None, # Called with a line per epoch; None = quiet.
) -> dnnlib.EasyDict:
    """Train a Decoder: per batch t ~ U{0..T-1}, then the noise, loss mean, Adam step (train_toy.py Trainer)."""
    torch.manual_seed(seed)
    in_features = None
    losses = []
    model = optimizer = None
    for epoch in range(epochs):
        total, count = 0.0, 0
        for x in data:
            x = torch.as_tensor(x, dtype=torch.float32).to(device)
            if model is None:
                in_features = x.shape[1]
                out_features = 2 * in_features if diffusion.learned_var else in_features
                model = Decoder(in_features, mid_features, num_layers)
                if out_features != in_features:  # The reference Decoder has no output width; learned needs 2 D.
                    model.out_fc = torch.nn.Linear(mid_features, out_features)
                model.to(device).train()
                optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))
            t = torch.randint(diffusion.timesteps, (x.shape[0],), device=device)
            loss = diffusion.train_losses(model, x, t, torch.randn_like(x)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * x.shape[0], count + x.shape[0]
        if count == 0:
            raise ValueError('the toy data stream yielded no batches')
        losses.append(total / count)
        if log is not None:
            log(f'epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}')
    return dnnlib.EasyDict(model=model.eval(), losses=np.array(losses), in_features=in_features)


@torch.no_grad()
def sample_toy_ddpm(model, diffusion: ddpm.GaussianDiffusion, num_samples: int, seed: int = 0,
                    device: torch.device = torch.device('cpu')) -> torch.Tensor:
    """Ancestral samples [num_samples, D] from one seeded generator (x_T first, then one draw per step)."""
    g = torch.Generator(device).manual_seed(seed)
    noise = torch.randn([num_samples, model.in_features], generator=g, device=device)
    return diffusion.p_sample(model, noise, randn_like=lambda x: torch.randn(x.shape, generator=g, device=device))


def histogram_kl(samples, data, bins: int = 100, extent: float = 3.0, eps: float = 1e-10) -> float:
    """KL(data histogram || sample histogram) over a bins x bins grid of [-extent, extent]^2 (train_toy.py evaluation)."""
    edges = np.linspace(-extent, extent, bins + 1)
    p = np.histogram2d(*np.asarray(data, dtype=np.float64).T, bins=[edges, edges])[0].ravel() + eps
    q = np.histogram2d(*np.asarray(samples, dtype=np.float64).T, bins=[edges, edges])[0].ravel() + eps
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * (np.log(p) - np.log(q))))


def plot_toy_ddpm(data, samples, path: str, title: str = '') -> None:
    """Side-by-side scatter of the data and the samples, saved atomically as PNG/PDF."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    for ax, points, name in zip(axes, (data, samples), ('data', 'DDPM samples')):
        points = np.asarray(points)
        ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.5)
        ax.set_title(name)
        ax.set_aspect('equal')
    if title:
        fig.suptitle(title)
    suffix = path.rsplit('.', 1)[-1].lower() if '.' in path else 'png'
    with dnnlib.util.atomic_write(path, 'wb') as f:
        fig.savefig(f, format=suffix, dpi=100)
    plt.close(fig)
