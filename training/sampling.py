"""Samplers for denoisers D(x; sigma) and the batched, seed-deterministic image generator.

Every sampler here takes the same arguments, `(net, noise, labels, gnet, randn_like, ...)`,
where `net(x, sigma, labels)` returns the denoised image D(x; sigma) in the EDM formulation
x = y + sigma n (EDM Eq. 1). It returns the final sample as a float tensor in the network's
output space (pixels in [-1, 1], or latents that the pickle's encoder decodes).

- `edm_sampler`: Heun's 2nd order method with optional churn (EDM Algorithm 2), exactly as
  NVlabs/edm generate.py runs it (float64, `net.round_sigma`, the net's sigma range), plus guidance.
- `edm2_sampler`: the same method as NVlabs/edm2 generate_images.py runs it (float32, 32 steps,
  churn noise drawn only where it applies), with classifier-free guidance / autoguidance.
- `ablation_sampler`: the generalised sampler of EDM Sec. 3 / Table 1 (solver, {t_i}, sigma(t), s(t)).
- `ddim_sampler` (and DDPM ancestral = DDIM with eta=1), `dpmpp2m_sampler` (DPM-Solver++(2M) and
  its SDE variant): classic samplers rewritten on the same denoiser interface.

Random numbers come from `randn_like` in a fixed order, so with a `StackedRandomGenerator`
each seed produces the same image whatever the batch it is drawn in.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import os
import re
from typing import Callable, Iterator, Sequence

import numpy as np
import PIL.Image
import torch

import dnnlib
from training import networks

#----------------------------------------------------------------------------
# Random numbers: one generator per image.

class StackedRandomGenerator:
    """Batch of torch.Generators, one per seed, so each image's draws ignore its batch (EDM generate.py)."""

    def __init__(self, device: torch.device | str, seeds: Sequence[int]):
        # Seeds wrap modulo 2^32 like the reference, so huge seeds stay valid.
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size: Sequence[int], **kwargs) -> torch.Tensor:
        """Normal draws of shape `size`; row i comes from the generator of seed i."""
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=g, **kwargs) for g in self.generators])

    def randn_like(self, input: torch.Tensor) -> torch.Tensor:
        """`randn` with the shape, dtype, layout and device of `input`."""
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size: Sequence[int], **kwargs) -> torch.Tensor:
        """Integer draws like torch.randint; row i comes from the generator of seed i."""
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=g, **kwargs) for g in self.generators])

#----------------------------------------------------------------------------
# Shared pieces.

def guided_denoiser(net, gnet, labels, guidance: float, dtype: torch.dtype) -> Callable:
    """D_w(x; sigma) = D_0 + w (D_1 - D_0), D_1 = net, D_0 = gnet (Autoguidance Eq. 1; CFG when gnet is unconditional)."""
    if guidance != 1 and gnet is None:
        raise ValueError(f'guidance={guidance} needs a guiding network (gnet); pass gnet or use guidance=1')

    def denoise(x, sigma):
        denoised = net(x, sigma, labels).to(dtype)
        if guidance == 1:   # No guidance: the guiding network is never evaluated.
            return denoised
        return gnet(x, sigma, labels).to(dtype).lerp(denoised, guidance)
    return denoise


def round_sigma(net, sigma):
    """Noise levels the net supports (EDM nets, e.g. iDDPM's discrete set); other nets take any sigma."""
    if hasattr(net, 'round_sigma'):
        return net.round_sigma(sigma)
    return torch.as_tensor(sigma)


def net_sigma_range(net) -> tuple[float, float]:
    """The (sigma_min, sigma_max) the net was trained for; nets that do not say take any sigma."""
    return getattr(net, 'sigma_min', 0), getattr(net, 'sigma_max', float('inf'))


def edm_sigma_steps(num_steps: int, sigma_min, sigma_max, rho, dtype, device) -> torch.Tensor:
    """sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (EDM Eq. 5)."""
    if num_steps < 2:
        raise ValueError(f'num_steps={num_steps}: the samplers need at least 2 steps')
    step_indices = torch.arange(num_steps, dtype=dtype, device=device)
    return (sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def heun_step(denoise, x_hat, t_hat, t_next, second_order: bool):
    """One Euler step along dx/dt = (x - D(x; t)) / t, with Heun's correction (EDM Algorithm 2, lines 5-8)."""
    d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
    x_next = x_hat + (t_next - t_hat) * d_cur
    if second_order:
        d_prime = (x_next - denoise(x_next, t_next)) / t_next
        x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next

#----------------------------------------------------------------------------
# EDM sampler (EDM Algorithm 2), in the EDM and the EDM2 flavour.

def edm_sampler(
    net, noise, labels=None, gnet=None, randn_like=torch.randn_like,
    num_steps   = 18,           # Number of noise levels N (NFE = 2N - 1).
    sigma_min   = 0.002,        # Lowest noise level; raised to net.sigma_min.
    sigma_max   = 80,           # Highest noise level; lowered to net.sigma_max.
    rho         = 7,            # Time step exponent (EDM Eq. 5).
    guidance    = 1,            # Guidance weight w; 1 = no guidance, gnet unused.
    S_churn     = 0,            # Stochasticity strength; 0 = deterministic ODE.
    S_min       = 0,            # Churn only for sigma in [S_min, S_max].
    S_max       = float('inf'), # See S_min.
    S_noise     = 1,            # Inflation of the fresh noise's std.
    dtype       = torch.float64,# Precision of the sampler state.
):
    """Heun sampler with churn (EDM Algorithm 2), as NVlabs/edm generate.py runs it, plus guidance."""
    denoise = guided_denoiser(net, gnet, labels, guidance, dtype)
    net_min, net_max = net_sigma_range(net)
    sigma_min, sigma_max = max(sigma_min, net_min), min(sigma_max, net_max)
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype, noise.device)
    t_steps = torch.cat([round_sigma(net, t_steps), torch.zeros_like(t_steps[:1])])  # t_N = 0

    x_next = noise.to(dtype) * t_steps[0]
    churned = [S_min <= t <= S_max for t in t_steps[:-1].tolist()]  # one device read, not one wait per step
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # The reference draws the churn noise at every step, also where gamma = 0, so we do too:
        # that keeps the random stream, and thus the images, identical for any S_min/S_max.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if churned[i] else 0
        t_hat = round_sigma(net, t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        x_next = heun_step(denoise, x_hat, t_hat, t_next, second_order=(i < num_steps - 1))
    return x_next


def edm2_sampler(
    net, noise, labels=None, gnet=None, randn_like=torch.randn_like,
    num_steps   = 32,           # Number of noise levels N (NFE = 2N - 1).
    sigma_min   = 0.002,        # Lowest noise level (not clamped to the net).
    sigma_max   = 80,           # Highest noise level.
    rho         = 7,            # Time step exponent (EDM Eq. 5).
    guidance    = 1,            # Guidance weight w; 1 = no guidance, gnet unused.
    S_churn     = 0,            # Stochasticity strength; 0 = deterministic ODE.
    S_min       = 0,            # Churn only for sigma in [S_min, S_max].
    S_max       = float('inf'), # See S_min.
    S_noise     = 1,            # Inflation of the fresh noise's std.
    dtype       = torch.float32,# Precision of the sampler state.
):
    """Heun sampler (EDM Algorithm 2) with guidance, as NVlabs/edm2 generate_images.py runs it."""
    denoise = guided_denoiser(net, gnet, labels, guidance, dtype)
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype, noise.device)
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])  # t_N = 0

    x_next = noise.to(dtype) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_hat, t_hat = x_next, t_cur
        if S_churn > 0 and S_min <= t_cur <= S_max:  # Noise is drawn only where churn applies.
            gamma = min(S_churn / num_steps, np.sqrt(2) - 1)
            t_hat = t_cur + gamma * t_cur
            x_hat = x_next + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_next)
        x_next = heun_step(denoise, x_hat, t_hat, t_next, second_order=(i < num_steps - 1))
    return x_next

#----------------------------------------------------------------------------
# Time step discretizations and schedules of EDM Table 1.

def vp_sigma(beta_d, beta_min):
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM Table 1, VP)."""
    return lambda t: (np.e ** (0.5 * beta_d * (t ** 2) + beta_min * t) - 1) ** 0.5


def vp_sigma_inv(beta_d, beta_min):
    """t(sigma), the inverse of `vp_sigma` (EDM Table 1, VP)."""
    return lambda sigma: ((beta_min ** 2 + 2 * beta_d * (sigma ** 2 + 1).log()).sqrt() - beta_min) / beta_d


VP_BETA_D, VP_BETA_MIN = 19.9, 0.1     # VP SDE of Song et al. (EDM Table 1), the constants of VPPrecond/VPLoss.


def default_sigma_range(discretization: str, sigma_min=None, sigma_max=None, epsilon_s=1e-3):
    """Noise range each discretization of EDM Table 1 uses unless told otherwise.

    VP spans sigma(epsilon_s)..sigma(1) of the VP SDE with beta_d = 19.9, beta_min = 0.1 (sigma_max 152.2).
    NVlabs/edm's generate.py writes beta_d = 19.1 here (NVlabs/edm issue 5; sigma_max 124.6); pass
    --sigma_min=0.010467 --sigma_max=124.58 to reproduce that script exactly.
    """
    vp_reference = vp_sigma(beta_d=VP_BETA_D, beta_min=VP_BETA_MIN)
    if sigma_min is None:
        sigma_min = {'vp': vp_reference(epsilon_s), 've': 0.02, 'iddpm': 0.002, 'edm': 0.002}[discretization]
    if sigma_max is None:
        sigma_max = {'vp': vp_reference(1), 've': 100, 'iddpm': 81, 'edm': 80}[discretization]
    return sigma_min, sigma_max


def vp_betas(sigma_min, sigma_max, epsilon_s):
    """(beta_d, beta_min) making the VP schedule span [sigma_min, sigma_max] over t in [epsilon_s, 1]."""
    beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * beta_d
    return beta_d, beta_min


def iddpm_noise_levels(M: int, C_1: float, C_2: float, device) -> torch.Tensor:
    """u_0..u_M of the improved DDPM cosine schedule, u_M = 0 (EDM Table 1, iDDPM; Nichol & Dhariwal)."""
    u = torch.zeros(M + 1, dtype=torch.float64, device=device)
    alpha_bar = lambda j: (0.5 * np.pi * j / M / (C_2 + 1)).sin() ** 2
    for j in torch.arange(M, 0, -1, device=device):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u


def sigma_steps(num_steps: int, discretization: str, sigma_min, sigma_max, rho=7,
                epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000, device=None) -> torch.Tensor:
    """Decreasing noise levels sigma_0..sigma_{N-1} of one discretization (EDM Table 1, 'time steps')."""
    if num_steps < 2:
        raise ValueError(f'num_steps={num_steps}: the samplers need at least 2 steps')
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
    if discretization == 'vp':
        orig_t_steps = 1 + step_indices / (num_steps - 1) * (epsilon_s - 1)
        return vp_sigma(*vp_betas(sigma_min, sigma_max, epsilon_s))(orig_t_steps)
    if discretization == 've':
        orig_t_steps = (sigma_max ** 2) * ((sigma_min ** 2 / sigma_max ** 2) ** (step_indices / (num_steps - 1)))
        return orig_t_steps.sqrt()
    if discretization == 'iddpm':
        u = iddpm_noise_levels(M, C_1, C_2, device)
        u_filtered = u[torch.logical_and(u >= sigma_min, u <= sigma_max)]
        return u_filtered[((len(u_filtered) - 1) / (num_steps - 1) * step_indices).round().to(torch.int64)]
    if discretization == 'edm':
        return edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, torch.float64, device)
    raise ValueError(f'discretization={discretization!r}: expected one of vp, ve, iddpm, edm')


@dataclasses.dataclass
class Schedule:
    """sigma(t), sigma'(t), t(sigma), s(t), s'(t) of one row of EDM Table 1 (Eq. 4 uses them)."""
    sigma: Callable
    sigma_deriv: Callable
    sigma_inv: Callable
    s: Callable
    s_deriv: Callable


def make_schedule(schedule: str, scaling: str, beta_d: float, beta_min: float) -> Schedule:
    """Noise schedule sigma(t) ('vp', 've', 'linear') and signal scaling s(t) ('vp', 'none') of EDM Table 1."""
    if schedule == 'vp':
        sigma, sigma_inv = vp_sigma(beta_d, beta_min), vp_sigma_inv(beta_d, beta_min)
        sigma_deriv = lambda t: 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))
    elif schedule == 've':
        sigma, sigma_deriv, sigma_inv = (lambda t: t.sqrt()), (lambda t: 0.5 / t.sqrt()), (lambda sigma: sigma ** 2)
    elif schedule == 'linear':
        sigma, sigma_deriv, sigma_inv = (lambda t: t), (lambda t: 1), (lambda sigma: sigma)
    else:
        raise ValueError(f'schedule={schedule!r}: expected one of vp, ve, linear')
    if scaling == 'vp':
        s = lambda t: 1 / (1 + sigma(t) ** 2).sqrt()
        s_deriv = lambda t: -sigma(t) * sigma_deriv(t) * (s(t) ** 3)
    elif scaling == 'none':
        s, s_deriv = (lambda t: 1), (lambda t: 0)
    else:
        raise ValueError(f'scaling={scaling!r}: expected one of vp, none')
    return Schedule(sigma, sigma_deriv, sigma_inv, s, s_deriv)

#----------------------------------------------------------------------------
# Generalised ablation sampler (EDM Sec. 3, Algorithm 1 with the churn of Algorithm 2).

def ablation_sampler(
    net, noise, labels=None, gnet=None, randn_like=torch.randn_like,
    num_steps       = 18,           # Number of time steps N.
    sigma_min       = None,         # Lowest noise level; None = the discretization's default.
    sigma_max       = None,         # Highest noise level; None = the discretization's default.
    rho             = 7,            # Time step exponent of the 'edm' discretization.
    solver          = 'heun',       # ODE solver: 'euler' or 'heun'.
    discretization  = 'edm',        # Time steps {t_i}: 'vp', 've', 'iddpm' or 'edm'.
    schedule        = 'linear',     # Noise schedule sigma(t): 'vp', 've' or 'linear'.
    scaling         = 'none',       # Signal scaling s(t): 'vp' or 'none'.
    epsilon_s       = 1e-3,         # Smallest t of the VP discretization.
    C_1             = 0.001,        # Clamp of the iDDPM alpha-bar ratios.
    C_2             = 0.008,        # Offset of the iDDPM cosine schedule.
    M               = 1000,         # Number of iDDPM noise levels.
    alpha           = 1,            # Where the 2nd order solver evaluates (1 = Heun, 0.5 = midpoint).
    guidance        = 1,            # Guidance weight w; 1 = no guidance, gnet unused.
    S_churn         = 0,            # Stochasticity strength; 0 = deterministic ODE.
    S_min           = 0,            # Churn only for sigma in [S_min, S_max].
    S_max           = float('inf'), # See S_min.
    S_noise         = 1,            # Inflation of the fresh noise's std.
    dtype           = torch.float64,# Precision of the sampler state.
):
    """Sampler of the EDM design-space ablations (EDM Table 1, Algorithms 1-2), as NVlabs/edm generate.py."""
    if solver not in ('euler', 'heun'):
        raise ValueError(f'solver={solver!r}: expected euler or heun')
    denoise = guided_denoiser(net, gnet, labels, guidance, dtype)
    sigma_min, sigma_max = default_sigma_range(discretization, sigma_min, sigma_max, epsilon_s)
    net_min, net_max = net_sigma_range(net)
    sigma_min, sigma_max = max(sigma_min, net_min), min(sigma_max, net_max)
    sigmas = sigma_steps(num_steps, discretization, sigma_min, sigma_max, rho, epsilon_s, C_1, C_2, M, noise.device)
    sched = make_schedule(schedule, scaling, *vp_betas(sigma_min, sigma_max, epsilon_s))
    t_steps = sched.sigma_inv(round_sigma(net, sigmas))
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])  # t_N = 0

    # dx/dt of EDM Eq. 4, with D evaluated on the unscaled x / s(t).
    def ode_slope(x, t):
        denoised = denoise(x / sched.s(t), sched.sigma(t))
        sig, sig_d, s, s_d = sched.sigma(t), sched.sigma_deriv(t), sched.s(t), sched.s_deriv(t)
        return (sig_d / sig + s_d / s) * x - sig_d * s / sig * denoised

    t_next = t_steps[0]
    x_next = noise.to(dtype) * (sched.sigma(t_next) * sched.s(t_next))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur, sigma_cur = x_next, sched.sigma(t_cur)
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= sigma_cur <= S_max else 0
        t_hat = sched.sigma_inv(round_sigma(net, sigma_cur + gamma * sigma_cur))
        noise_std = (sched.sigma(t_hat) ** 2 - sigma_cur ** 2).clip(min=0).sqrt() * sched.s(t_hat)
        x_hat = sched.s(t_hat) / sched.s(t_cur) * x_cur + noise_std * S_noise * randn_like(x_cur)

        h = t_next - t_hat
        d_cur = ode_slope(x_hat, t_hat)
        if solver == 'euler' or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            x_prime, t_prime = x_hat + alpha * h * d_cur, t_hat + alpha * h
            d_prime = ode_slope(x_prime, t_prime)
            x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x_next

#----------------------------------------------------------------------------
# Classic samplers on the denoiser interface.

def sampler_sigmas(net, num_steps, sigma_min, sigma_max, rho, discretization, device) -> torch.Tensor:
    """sigma_0 > ... > sigma_{N-1} > sigma_N = 0 for the samplers below, rounded to the net's levels."""
    sigma_min, sigma_max = default_sigma_range(discretization, sigma_min, sigma_max)
    net_min, net_max = net_sigma_range(net)
    sigma_min, sigma_max = max(sigma_min, net_min), min(sigma_max, net_max)
    sigmas = round_sigma(net, sigma_steps(num_steps, discretization, sigma_min, sigma_max, rho, device=device))
    return torch.cat([torch.as_tensor(sigmas, dtype=torch.float64), torch.zeros_like(sigmas[:1])])


def ddim_sampler(
    net, noise, labels=None, gnet=None, randn_like=torch.randn_like,
    num_steps       = 50,           # Number of time steps N (NFE = N).
    sigma_min       = None,         # Lowest noise level; None = the discretization's default.
    sigma_max       = None,         # Highest noise level; None = the discretization's default.
    rho             = 7,            # Time step exponent of the 'edm' discretization.
    discretization  = 'edm',        # Time steps: 'vp', 've', 'iddpm' or 'edm' (EDM Table 1).
    eta             = 0,            # Stochasticity: 0 = deterministic DDIM, 1 = DDPM ancestral.
    guidance        = 1,            # Guidance weight w; 1 = no guidance, gnet unused.
    dtype           = torch.float64,# Precision of the sampler state.
):
    """DDIM (Song et al. 2021, Eq. 12) in the x = y + sigma n form; eta = 1 is DDPM ancestral sampling.

    With y_hat = D(x; s), n_hat = (x - y_hat) / s and tau = eta * s' * sqrt(1 - s'^2 / s^2), one step
    from s to s' is x' = y_hat + sqrt(s'^2 - tau^2) n_hat + tau z. eta = 0 equals Euler on EDM Eq. 4.
    """
    denoise = guided_denoiser(net, gnet, labels, guidance, dtype)
    sigmas = sampler_sigmas(net, num_steps, sigma_min, sigma_max, rho, discretization, noise.device).to(dtype)
    x = noise.to(dtype) * sigmas[0]
    for sigma_cur, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoise(x, sigma_cur)
        tau = eta * sigma_next * (1 - sigma_next ** 2 / sigma_cur ** 2).clip(min=0).sqrt()
        eps = (x - denoised) / sigma_cur
        x = denoised + (sigma_next ** 2 - tau ** 2).clip(min=0).sqrt() * eps
        if eta != 0 and sigma_next > 0:  # No fresh noise on the last step to sigma = 0.
            x = x + tau * randn_like(x)
    return x


def ddpm_sampler(net, noise, labels=None, gnet=None, randn_like=torch.randn_like, num_steps=256, **kwargs):
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) = `ddim_sampler` with eta = 1."""
    return ddim_sampler(net, noise, labels, gnet, randn_like, num_steps=num_steps, eta=1, **kwargs)


def dpmpp2m_sampler(
    net, noise, labels=None, gnet=None, randn_like=torch.randn_like,
    num_steps       = 32,           # Number of time steps N (NFE = N).
    sigma_min       = None,         # Lowest noise level; None = the discretization's default.
    sigma_max       = None,         # Highest noise level; None = the discretization's default.
    rho             = 7,            # Time step exponent of the 'edm' discretization.
    discretization  = 'edm',        # Time steps: 'vp', 've', 'iddpm' or 'edm' (EDM Table 1).
    eta             = 0,            # 0 = DPM-Solver++(2M) ODE; 1 = the 2M SDE variant.
    S_noise         = 1,            # Inflation of the fresh noise's std (SDE only).
    guidance        = 1,            # Guidance weight w; 1 = no guidance, gnet unused.
    dtype           = torch.float64,# Precision of the sampler state.
):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) and its SDE variant, with lambda = -log sigma.

    Per step h = log(s / s'): x' = (s'/s) e^{-eta h} x + (1 - e^{-(1+eta) h}) (D + (h / 2h_prev)(D - D_prev))
    plus s' sqrt(1 - e^{-2 eta h}) z; the first step has no D_prev, the last one returns D.
    """
    denoise = guided_denoiser(net, gnet, labels, guidance, dtype)
    sigmas = sampler_sigmas(net, num_steps, sigma_min, sigma_max, rho, discretization, noise.device).to(dtype)
    x = noise.to(dtype) * sigmas[0]
    old_denoised, h_last = None, None
    for sigma_cur, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoise(x, sigma_cur)
        if sigma_next == 0:
            x = denoised
            break
        h = (sigma_cur / sigma_next).log()
        phi = -torch.expm1(-(1 + eta) * h)  # 1 - e^{-(1+eta) h}, accurate for small h.
        x = sigma_next / sigma_cur * torch.exp(-eta * h) * x + phi * denoised
        if old_denoised is not None and h_last > 0:  # h_last = 0 where rounding repeated a noise level.
            x = x + 0.5 * phi * (h / h_last) * (denoised - old_denoised)
        if eta != 0:
            x = x + sigma_next * (-torch.expm1(-2 * eta * h)).sqrt() * S_noise * randn_like(x)
        old_denoised, h_last = denoised, h
    return x


def dpmpp2m_sde_sampler(net, noise, labels=None, gnet=None, randn_like=torch.randn_like, num_steps=64, **kwargs):
    """DPM-Solver++(2M) SDE (Lu et al. 2022): `dpmpp2m_sampler` with eta = 1."""
    return dpmpp2m_sampler(net, noise, labels, gnet, randn_like, num_steps=num_steps, **{'eta': 1, **kwargs})

#----------------------------------------------------------------------------
# The CIFAR EDM2 reimplementation's sampler (FutureXiang/edm2 EDM.edm_sample).

class ClippedDenoiser(torch.nn.Module):
    """The network with its denoised output clipped to [-1, 1] (FutureXiang/edm2 pred_eps_, clip_x=True)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.img_resolution, self.img_channels, self.label_dim = net.img_resolution, net.img_channels, net.label_dim

    def forward(self, x, sigma, class_labels=None, **kwargs):
        return self.net(x, sigma, class_labels, **kwargs).clip(-1, 1)


def cifar_edm2_sampler(
    net, noise, labels=None, gnet=None, randn_like=torch.randn_like,
    num_steps   = 18,           # Noise levels (NFE 2 N - 1).
    sigma_min   = 0.002,        # Lowest noise level.
    sigma_max   = 80,           # Highest noise level.
    rho         = 7,            # Time step exponent (EDM Eq. 5).
    guidance    = 1,            # Guidance weight w; 1 = no guidance, gnet unused.
    eta         = 0.0,          # Churn gamma = (sqrt(2) - 1) eta in [S_min, S_max], eta in [0, 1]; 0 = deterministic.
    S_min       = 0.01,         # Churn range, lower end.
    S_max       = 1,            # Churn range, upper end.
    S_noise     = 1.007,        # Noise inflation of the churn.
    dtype       = torch.float64,# Precision of the sampler state.
):
    """EDM Heun sampler with the reference's settings and every denoised image clipped to [-1, 1]."""
    if not 0 <= eta <= 1:
        raise ValueError(f'eta={eta} must be in [0, 1] (gamma = (sqrt(2) - 1) eta)')
    return edm_sampler(ClippedDenoiser(net), noise, labels, gnet=gnet and ClippedDenoiser(gnet), randn_like=randn_like,
                       num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, guidance=guidance,
                       S_churn=(np.sqrt(2) - 1) * eta * num_steps, S_min=S_min, S_max=S_max, S_noise=S_noise, dtype=dtype)

#----------------------------------------------------------------------------
# Sampler registry.

SAMPLERS = {
    'edm':          None,               # edm_sampler for EDM nets, edm2_sampler for the others.
    'edm1':         edm_sampler,
    'edm2':         edm2_sampler,
    'ablation':     ablation_sampler,
    'ddim':         ddim_sampler,
    'ddpm':         ddpm_sampler,
    'dpmpp2m':      dpmpp2m_sampler,
    'dpmpp2m-sde':  dpmpp2m_sde_sampler,
    'cifar-edm2':   cifar_edm2_sampler,
}

_WRAPPED = {ddpm_sampler: ddim_sampler, dpmpp2m_sde_sampler: dpmpp2m_sampler}
_FIXED = {ddpm_sampler: {'eta'}, dpmpp2m_sde_sampler: set()}


def resolve_sampler(name: str, net) -> Callable:
    """Sampler function for a name of SAMPLERS ('edm' follows the codebase the net comes from); functions pass through."""
    if callable(name):
        return name
    if name not in SAMPLERS:
        raise ValueError(f'sampler={name!r}: expected one of {", ".join(SAMPLERS)}')
    if getattr(net, 'discrete_time', False):  # A DDPM network: --sampler=ddpm|ddim are its discrete samplers.
        from training.sampling_ddpm import discrete_sampler
        return discrete_sampler(name)
    if name == 'edm':
        if getattr(net, 'default_sampler', None) in SAMPLERS:  # e.g. the CIFAR EDM2 nets: 'cifar-edm2'
            return SAMPLERS[net.default_sampler]
        return edm_sampler if hasattr(net, 'round_sigma') else edm2_sampler
    return SAMPLERS[name]


def sampler_options(fn: Callable) -> list[str]:
    """Keyword options a sampler function accepts (besides net, noise, labels, gnet, randn_like)."""
    params = inspect.signature(fn).parameters
    names = [name for name, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    if fn in _WRAPPED:
        names += [n for n in sampler_options(_WRAPPED[fn]) if n not in names and n not in _FIXED[fn]]
    return [n for n in names if n not in ('net', 'noise', 'labels', 'gnet', 'randn_like')]


def check_sampler_kwargs(fn: Callable, kwargs: dict, name: str = None) -> None:
    """Raise ValueError naming any option the sampler does not take."""
    valid = sampler_options(fn)
    params = inspect.signature(fn).parameters.values()
    takes_any = fn not in _WRAPPED and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)  # a user's **kwargs sampler
    bad = [] if takes_any else [k for k in kwargs if k not in valid]
    if bad:
        raise ValueError(f'sampler {name or fn.__name__!r} does not take {", ".join(bad)}; '
                         f'its options are: {", ".join(valid)}')

#----------------------------------------------------------------------------
# Loading networks and turning samples into images.

def load_network(source, trust: bool = False, device: torch.device | None = None):
    """(ema net, encoder or None) from a path/URL, read with the safe loader unless `trust`: a network
    snapshot pickle, a training-state-*.pt of this project, or the STF fork's training states
    (training-state-*.pt from torch.save, or *.pkl, holding the ema and net modules, optimizer_state, step)."""
    from torch_utils import persistence
    data = persistence.load_file(source, trust=trust)
    if isinstance(data, torch.nn.Module):
        net, encoder = data, None
    elif isinstance(data, dict) and isinstance(data.get('ema'), torch.nn.Module):
        net, encoder = data['ema'], data.get('encoder', None)
    elif isinstance(data, dict) and 'format_version' in data and 'ema' in data:
        net, encoder = network_from_training_state(data, source), None
    else:
        raise ValueError(f'{source}: expected a network snapshot pickle or training state holding an "ema" network')
    net = net.eval().requires_grad_(False)
    return (net.to(device) if device is not None else net), encoder


def is_ddpm_checkpoint(source: str) -> bool:
    """A DDPM checkpoint (ddpm-torch layout, torch.save'd .pt) rather than a network snapshot pickle or a
    training-state-*.pt (ours or the STF fork's, read by load_network)."""
    name = os.path.basename(str(source))
    return name.endswith('.pt') and not name.startswith('training-state-')


def network_from_training_state(state: dict, source='training state') -> torch.nn.Module:
    """The EMA network of one of our training-state-*.pt files, built from its recorded constructor kwargs."""
    from torch_utils import persistence
    kwargs = dict(state.get('network_kwargs') or {})
    class_name = str(kwargs.pop('class_name', ''))
    cls = persistence.find_class(class_name.rsplit('.', 1)[-1])
    if cls is None or not class_name.startswith('training.'):  # only this project's persistent classes
        raise ValueError(f'{source}: this training state records no known network class ({class_name or "none"}); '
                         f'it predates generation from training states: use the network-snapshot-*.pkl of the same kimg')
    if not isinstance(state['ema'], dict) or 'emas' in state['ema']:
        raise ValueError(f'{source}: an EDM2 training state holds one EMA per profile; generate from its '
                         f'network-snapshot-*-<std>.pkl files or reconstruct_phema.py output instead')
    net = cls(**kwargs)
    net.load_state_dict(state['ema'])
    return net


def decode_images(x: torch.Tensor, encoder=None) -> torch.Tensor:
    """uint8 NCHW images on the CPU: the encoder's decode, or pixels x * 127.5 + 128 clipped (StandardRGBEncoder)."""
    if encoder is not None:
        images = encoder.decode(x)
    else:
        images = (x * 127.5 + 128).clip(0, 255).to(torch.uint8)
    return images.to(torch.uint8).cpu()


def check_networks(net, gnet=None, class_idx: int | None = None) -> None:
    """Raise ValueError when a guiding network or class index does not fit the main network."""
    for attr in ('img_resolution', 'img_channels', 'label_dim'):
        if not hasattr(net, attr):
            raise ValueError(f'the network ({type(net).__name__}) has no {attr}; is it a denoiser network?')
    if class_idx is not None:
        if not net.label_dim:
            raise ValueError(f'class_idx={class_idx} (--class) was given, but the network is unconditional (label_dim=0); leave it out')
        if not 0 <= class_idx < net.label_dim:
            raise ValueError(f'class_idx={class_idx} (--class) is out of range: the network has {net.label_dim} classes (0..{net.label_dim - 1})')
    if gnet is None or gnet is net:
        return
    for attr in ('img_resolution', 'img_channels'):
        if getattr(gnet, attr, None) != getattr(net, attr):
            raise ValueError(f'the guiding network has {attr}={getattr(gnet, attr, None)} but the main network has '
                             f'{attr}={getattr(net, attr)}; both must work on the same images')
    if getattr(gnet, 'label_dim', None) not in (0, net.label_dim):
        raise ValueError(f'the guiding network has label_dim={getattr(gnet, "label_dim", None)} but the main network has '
                         f'label_dim={net.label_dim}; the guide must share the labels or be unconditional (label_dim=0)')

#----------------------------------------------------------------------------
# Batched generation.

class ImageBatches:
    """Iterable over the batches this rank generates; yields EasyDict(seeds, images, labels, noise, batch_idx,
    num_batches, indices), `indices` being the batch's positions in the full seed list (EDM2 generate_images.py)."""

    def __init__(self, make_batch: Callable, rank_batches: list, rank_indices: list | None = None):
        self.make_batch = make_batch
        self.rank_batches = rank_batches
        self.rank_indices = rank_indices if rank_indices is not None else [None] * len(rank_batches)

    def __len__(self) -> int:
        return len(self.rank_batches)

    def __iter__(self) -> Iterator[dnnlib.EasyDict]:
        for batch_idx, (batch_seeds, indices) in enumerate(zip(self.rank_batches, self.rank_indices)):
            result = dnnlib.EasyDict(seeds=list(batch_seeds), images=None, labels=None, noise=None, batch_idx=batch_idx,
                                     num_batches=len(self.rank_batches), indices=indices)
            if len(batch_seeds) > 0:
                result.images, result.labels, result.noise = self.make_batch(result.seeds)
            yield result


def split_indices(num_seeds: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """This rank's batches of seed positions: world_size * k near-equal parts, dealt round-robin (EDM2 generate_images.py)."""
    num_batches = max((num_seeds - 1) // (batch_size * world_size) + 1, 1) * world_size
    return np.array_split(np.arange(num_seeds), num_batches)[rank::world_size]


def split_seeds(seeds: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's batches: seeds cut into world_size * k near-equal parts, dealt round-robin (EDM2 generate_images.py)."""
    return [[seeds[i] for i in part] for part in split_indices(len(seeds), batch_size, rank, world_size)]


def generate_images(
    net,                            # Main denoiser network (torch.nn.Module).
    seeds: Sequence[int],           # One image per seed.
    *,
    gnet            = None,         # Guiding network for guidance != 1; None = no guidance.
    encoder         = None,         # Decoder of latents (training.encoders); None = pixels in [-1, 1].
    class_idx       = None,         # Class of every image; None = drawn from each seed.
    batch_size      = 32,           # Maximum number of images per network call.
    sampler         = 'edm',        # Name in SAMPLERS, or a sampler function with the same signature.
    device          = None,         # Device the nets already live on; None = where net's parameters are.
    rank            = 0,            # This process's rank among world_size.
    world_size      = 1,            # Number of processes splitting the seeds.
    precision       = 'fp32',       # 'fp32' (reference numerics) or 'bf16' (autocast of the network calls).
    channels_last   = False,        # Channels-last weights and inputs for the networks (CUDA speed-up).
    batched_guidance= False,        # net and gnet in one vmapped call if they share an architecture, else overlapped (CUDA).
    compile         = False,        # torch.compile the networks (training/speed.py: whole network by default)?
    **sampler_kwargs,               # Options of the sampler, e.g. num_steps, guidance, S_churn.
) -> ImageBatches:
    """Images for the given seeds, identical for any batch size or number of ranks (EDM2 generate_images.py)."""
    seeds = [int(seed) for seed in seeds]
    if batch_size < 1:
        raise ValueError(f'batch_size={batch_size}: must be at least 1')
    check_networks(net, gnet, class_idx)
    sampler_fn = resolve_sampler(sampler, net)
    check_sampler_kwargs(sampler_fn, sampler_kwargs, sampler if isinstance(sampler, str) else None)
    if sampler_kwargs.get('guidance', 1) != 1 and gnet is None:
        raise ValueError(f'guidance={sampler_kwargs["guidance"]} needs a guiding network (gnet, --gnet); give one or use guidance=1')
    if device is None:
        device = next((p.device for p in net.parameters()), torch.device('cpu'))
    device = torch.device(device)
    if device.type == 'mps' and 'dtype' not in sampler_kwargs:
        sampler_kwargs['dtype'] = torch.float32  # MPS has no float64.
    if encoder is not None and hasattr(encoder, 'init'):
        encoder.init(device)
    if precision == 'bf16':
        gnet_is_net = gnet is net
        net = float32_inputs(net)
        gnet = net if gnet_is_net else float32_inputs(gnet)
    net, gnet, sampler_kwargs = apply_fast_paths(net, gnet, sampler_kwargs, channels_last, batched_guidance)
    if compile:
        from training import speed
        net = speed.compile_network(net)
        gnet = speed.compile_network(gnet) if gnet is not None else None
        if device.type == 'cuda':
            # Every call has one shape (the last batch is padded), so cuDNN's autotuned convolutions pay back at
            # once, as in training; the reference's fp32 path (no compile) keeps torch's default.
            torch.backends.cudnn.benchmark = True
    autocast = precision_context(precision, device)

    def make_batch(batch_seeds):
        keep = len(batch_seeds)
        if compile and keep < batch_size:  # a compiled net would recompile for the smaller last batch
            batch_seeds = list(batch_seeds) + [batch_seeds[-1]] * (batch_size - keep)
        images, labels, noise = sample_batch(batch_seeds)
        return images[:keep], (labels[:keep] if labels is not None else None), noise[:keep]

    def sample_batch(batch_seeds):
        rnd = StackedRandomGenerator(device, batch_seeds)
        n = len(batch_seeds)
        noise = rnd.randn([n, net.img_channels, net.img_resolution, net.img_resolution], device=device)
        labels = None
        if net.label_dim:
            labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[n], device=device)]
            if class_idx is not None:
                labels[:, :] = 0
                labels[:, class_idx] = 1
        with torch.no_grad(), autocast():  # bf16: the VAE decoder too (2.5 TFLOP per 512x512 image)
            with networks.frozen_weights():  # EDM2's normalized weights derived once per batch, not per call
                x = sampler_fn(net, noise, labels, gnet=gnet, randn_like=rnd.randn_like, **sampler_kwargs)
            images = decode_images(x, encoder)
        return images, (labels.cpu() if labels is not None else None), noise

    rank_indices = split_indices(len(seeds), batch_size, rank, world_size)
    return ImageBatches(make_batch, [[seeds[i] for i in part] for part in rank_indices], rank_indices)

def float32_inputs(net):
    """`net` with its backbone fed float32, so that bf16 autocast alone sets the precision. A network with
    use_fp16 (EDM2's published pickles) casts its backbone's input to float16; under bf16 autocast the convolutions
    would then run bf16 and the elementwise ops float16, and each sum of the two float32. A shallow copy: the
    caller's network keeps use_fp16, and the two share parameters."""
    if not getattr(net, 'use_fp16', False):
        return net
    net = copy.copy(net)
    net.use_fp16 = False
    return net


def precision_context(precision: str, device: torch.device):
    """A context factory: bf16 autocast of the network calls, or nothing for the reference fp32."""
    if precision not in ('fp32', 'bf16'):
        raise ValueError(f'precision={precision!r}: choose fp32 or bf16')
    if precision == 'fp32':
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def apply_fast_paths(net, gnet, sampler_kwargs: dict, channels_last: bool, fast_guidance: bool):
    """Fast guidance (net + gnet in one batched call if they share an architecture, else overlapped on
    CUDA streams) and channels-last weights.

    Batched guidance and channels-last do not combine (vmap cannot query channels-last strides in
    torch 2.x): batched guidance wins.
    """
    from training.guidance import BatchedGuidance, OverlappedGuidance, same_architecture
    guidance = sampler_kwargs.get('guidance', 1)
    fold = fast_guidance and gnet is not None and guidance != 1
    if fold and same_architecture(net, gnet):
        return BatchedGuidance(net, gnet, guidance), None, dict(sampler_kwargs, guidance=1)
    if channels_last:
        net = ChannelsLast(net)
        gnet = ChannelsLast(gnet) if gnet is not None else None
    if fold:
        return OverlappedGuidance(net, gnet, guidance), None, dict(sampler_kwargs, guidance=1)
    return net, gnet, sampler_kwargs


class ChannelsLast(torch.nn.Module):
    """Runs a network with channels-last weights and inputs; same outputs, faster convolutions on GPUs.

    Converts the wrapped network in place (no copy of the weights).
    """

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        from training.guidance import expose_net_attributes
        self.net = net.to(memory_format=torch.channels_last)
        expose_net_attributes(self, net)

    def forward(self, x, sigma, labels=None, **kwargs):
        return self.net(x.contiguous(memory_format=torch.channels_last), sigma, labels, **kwargs).contiguous()

#----------------------------------------------------------------------------
# Writing images.

def image_path(outdir: str, seed: int, subdirs: bool = False) -> str:
    """outdir/SEED.png, or outdir/THOUSANDS/SEED.png with subdirs (reference naming)."""
    folder = os.path.join(outdir, f'{seed // 1000 * 1000:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}.png')


def to_pil(image: torch.Tensor | np.ndarray) -> PIL.Image.Image:
    """A uint8 CHW image (1 or 3 channels) as a PIL image."""
    array = np.asarray(image).transpose(1, 2, 0)
    if array.shape[2] == 1:
        return PIL.Image.fromarray(array[:, :, 0], 'L')
    if array.shape[2] == 3:
        return PIL.Image.fromarray(array, 'RGB')
    raise ValueError(f'cannot save an image with {array.shape[2]} channels as PNG; expected 1 or 3')


def save_png(image: torch.Tensor | np.ndarray | PIL.Image.Image, path: str) -> None:
    """Write a PNG atomically, so an interrupted run never leaves a half-written file."""
    pil = image if isinstance(image, PIL.Image.Image) else to_pil(image)
    with dnnlib.util.atomic_write(path) as f:
        pil.save(f, format='PNG')


class PngWriter(dnnlib.util.BackgroundWrites):
    """Writes each batch's PNGs (atomically, save_png) in one background thread while the next batch is sampled.

    The atomic writes of 512 CIFAR-sized images take about 0.3 s (fsync per file), which the GPU spent idle
    between batches: generate.py --fast ran at 197 img/s against 235 for the sampler alone on an H200.
    """

    def __init__(self, outdir: str | None, subdirs: bool = False):
        super().__init__('png-writer')
        self.outdir, self.subdirs = outdir, subdirs

    def write(self, seeds: Sequence[int], images) -> None:
        """Queue the PNGs of one batch (CPU uint8 CHW images); no-op without an outdir."""
        if self.outdir is None or images is None:
            self.wait()
            return
        self.submit(self._write_all, list(seeds), list(images))

    def _write_all(self, seeds: list[int], images: list) -> None:
        for seed, image in zip(seeds, images):
            save_png(image, image_path(self.outdir, seed, self.subdirs))


def image_grid(images: torch.Tensor | np.ndarray, grid_w: int | None = None) -> np.ndarray:
    """Tile N uint8 CHW images row by row into one CHW image; grid_w None = about square, blanks filled black."""
    images = np.asarray(images)
    n, c, h, w = images.shape
    grid_w = grid_w or int(np.ceil(np.sqrt(n)))
    grid_h = (n + grid_w - 1) // grid_w
    padded = np.zeros([grid_h * grid_w, c, h, w], dtype=images.dtype)
    padded[:n] = images
    return padded.reshape(grid_h, grid_w, c, h, w).transpose(2, 0, 3, 1, 4).reshape(c, grid_h * h, grid_w * w)

#----------------------------------------------------------------------------
# The whole generate.py run: load, split seeds across ranks, write PNGs and a grid.

def pending_seeds(seeds: Sequence[int], outdir: str | None, subdirs: bool) -> list[int]:
    """Seeds whose PNG is not written yet, so that rerunning a command resumes it."""
    if outdir is None:
        return list(seeds)
    return [seed for seed in seeds if not os.path.isfile(image_path(outdir, seed, subdirs))]


def _read_png(path: str) -> np.ndarray:
    array = np.asarray(PIL.Image.open(path))
    return array[np.newaxis] if array.ndim == 2 else array.transpose(2, 0, 1)


def _gather_to_rank0(images: dict, world_size: int) -> dict:
    if world_size == 1:
        return images
    parts = [None] * world_size
    torch.distributed.all_gather_object(parts, images)
    return {seed: image for part in parts for seed, image in part.items()}


def _load_networks(cfg, device):
    from torch_utils import distributed as dist
    dist.print0(f'Loading network from {cfg.net} ...')
    if is_ddpm_checkpoint(cfg.net):
        from training import sampling_ddpm
        net = sampling_ddpm.load_ddpm_network(cfg.net, dataset=cfg.dataset, use_ema=cfg.use_ema, device=device)
        sampling_ddpm.check_options(net, cfg.sampler, cfg.sampler_kwargs())
        return net, None, sampling_ddpm.DDPMPixels()
    net, encoder = load_network(cfg.net, trust=cfg.trust_pickle, device=device)
    gnet = None
    if cfg.gnet is not None:
        dist.print0(f'Loading guiding network from {cfg.gnet} ...')
        gnet, _ = load_network(cfg.gnet, trust=cfg.trust_pickle, device=device)
    return net, gnet, encoder


def list_training_states(run_dir: str, ckpt: int = 0, end_ckpt: int | None = None) -> list[tuple[int, str]]:
    """(kimg, path) of each training-state-<kimg>.pt (or the STF fork's .pkl) in run_dir with ckpt <= kimg <= end_ckpt, oldest first."""
    found = {}
    for entry in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        m = re.fullmatch(r'training-state-(\d+)\.(pt|pkl)', entry)
        if m and ckpt <= int(m.group(1)) <= (end_ckpt if end_ckpt is not None else float('inf')):
            if int(m.group(1)) not in found or m.group(2) == 'pt':  # .pt wins over a .pkl of the same kimg
                found[int(m.group(1))] = os.path.join(run_dir, entry)
    return sorted(found.items())


def checkpoint_folder(kimg: int, seeds: Sequence[int]) -> str:
    """ckpt_<kimg> for seeds up to 49999, ckpt_2_<kimg> up to 99999, else ckpt_3_<kimg> (STF fork generate.py / fid.py --gen_seed)."""
    prefix = 'ckpt_' if max(seeds) <= 49999 else 'ckpt_2_' if max(seeds) <= 99999 else 'ckpt_3_'
    return f'{prefix}{kimg:06d}'


def generate_per_checkpoint(cfg) -> list[str]:
    """Images of every training state in cfg.outdir (STF fork): <outdir>/ckpt_<kimg>/<seed // 1000>/<seed>.png each."""
    from torch_utils import distributed as dist
    states = list_training_states(cfg.outdir, cfg.ckpt, cfg.end_ckpt)
    if not states:
        raise ValueError(f'--outdir={cfg.outdir} holds no training-state-*.pt with kimg in [{cfg.ckpt}, '
                         f'{cfg.end_ckpt if cfg.end_ckpt is not None else "newest"}]: give --network=PKL, or the run folder of a training run')
    folders = []
    for kimg, path in states:
        folders.append(os.path.join(cfg.outdir, checkpoint_folder(kimg, cfg.seeds)))
        dist.print0(f'Checkpoint {kimg} kimg -> {folders[-1]}')
        generate_from_config(dataclasses.replace(cfg, net=path, outdir=folders[-1], subdirs=True))
    return folders


def _prepare_outputs(cfg) -> None:
    """Make --outdir (one clear line if it cannot be) and delete temporary PNGs that kills left behind."""
    if cfg.outdir is not None:
        with dnnlib.util.writing(cfg.outdir):
            os.makedirs(cfg.outdir, exist_ok=True)
        folders = [cfg.outdir] + [e.path for e in os.scandir(cfg.outdir) if e.is_dir() and re.fullmatch(r'\d{6}', e.name)]
        for folder in folders:  # min_age_s: another generate.py may be writing into the same --outdir now
            dnnlib.util.remove_stale_temp_files(folder, targets=r'\d{6}\.png', min_age_s=600)
    if cfg.grid is not None:
        dnnlib.util.remove_stale_temp_files(os.path.dirname(os.path.abspath(cfg.grid)), targets=re.escape(os.path.basename(cfg.grid)))


def speed_switches(cfg, device: torch.device):
    """GenerateConfig with the speed switches `device` cannot run turned off (training.speed.usable_switches)."""
    from training import speed
    bf16, compile_ = speed.usable_switches(device, cfg.fast, cfg.precision == 'bf16', cfg.compile, '--precision=bf16')
    return dataclasses.replace(cfg, precision='bf16' if bf16 else 'fp32', compile=compile_)


def generate_from_config(cfg) -> None:
    """Run a resolved `GenerateConfig` (training.presets_generate) on all ranks of this process group."""
    import tqdm
    from torch_utils import distributed as dist, misc
    if cfg.net is None:
        generate_per_checkpoint(cfg)
        return
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = dist.device_for_rank(misc.choose_device(cfg.device))
    cfg = speed_switches(cfg, device)
    seeds = pending_seeds(cfg.seeds, cfg.outdir, cfg.subdirs)  # Before any rank writes.
    if rank != 0:
        dist.barrier()  # Rank 0 loads (and downloads) first.
    net, gnet, encoder = _load_networks(cfg, device)
    if rank == 0:
        _prepare_outputs(cfg)
        dist.barrier()

    batches = generate_images(net, seeds, gnet=gnet, encoder=encoder, class_idx=cfg.class_idx,
                              batch_size=cfg.batch_size, sampler=cfg.sampler, device=device,
                              rank=rank, world_size=world_size, precision=cfg.precision,
                              channels_last=cfg.channels_last, batched_guidance=cfg.batched_guidance,
                              compile=cfg.compile, **cfg.sampler_kwargs())
    skipped = len(cfg.seeds) - len(seeds)
    dist.print0(f'Generating {len(seeds)} images' + (f' ({skipped} already written)' if skipped else '') + ' ...')
    kept = {}
    with PngWriter(cfg.outdir, cfg.subdirs) as writer:
        for batch in tqdm.tqdm(batches, unit='batch', disable=(rank != 0)):
            writer.write(batch.seeds, batch.images)
            if cfg.grid is not None and batch.images is not None:
                kept.update((seed, image.numpy()) for seed, image in zip(batch.seeds, batch.images))
    dist.barrier()

    if cfg.grid is not None:
        kept = _gather_to_rank0(kept, world_size)
        if rank == 0:
            images = [kept[s] if s in kept else _read_png(image_path(cfg.outdir, s, cfg.subdirs)) for s in cfg.seeds]
            save_png(image_grid(np.stack(images)), cfg.grid)
            dist.print0(f'Wrote grid of {len(images)} images to {cfg.grid}')
    dist.barrier()
    dist.print0('Done.')
