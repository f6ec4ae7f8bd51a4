"""Discrete-time DDPM (Ho et al. 2020) and DDIM (Song et al. 2021) as tqch/ddpm-torch computes them.

Beta schedules, the q / posterior / model distributions for the mean | x_0 | eps parameterisations
and fixed-small | fixed-large | learned variances, the per-sample losses (mse, or kl in bits per
dimension), ancestral sampling, and DDIM over a timestep subsequence. The reference's quirks are
kept on purpose and commented where they occur. `learned` variance (which the reference lists but
rejects) follows Nichol & Dhariwal 2021: interpolated log-variance (Eq. 15) and, with mse, the
hybrid objective L_simple + lambda L_vlb with a stop-gradient on the mean (Eq. 16, lambda = 0.001).
"""

import math
from typing import Callable

import torch

BETA_SCHEDULES = ('quad', 'linear', 'warmup10', 'warmup50', 'jsd')   # What the CLIs offer.
MODEL_MEAN_TYPES = ('mean', 'x_0', 'eps')
MODEL_VAR_TYPES = ('learned', 'fixed-small', 'fixed-large')
LOSS_TYPES = ('kl', 'mse')
SKIP_SCHEDULES = ('linear', 'quadratic')


def _check_choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f'{flag}={value} is not supported; choose one of: {", ".join(map(str, choices))}')


def get_beta_schedule(schedule: str, beta_start: float, beta_end: float, timesteps: int) -> torch.Tensor:
    """Float64 betas of a named schedule (ddpm-torch get_beta_schedule; Ho et al. 2020 Sec. 4, App. B)."""
    _check_choice('--beta-schedule', schedule, BETA_SCHEDULES + ('const',))
    if timesteps < 1:
        raise ValueError(f'--timesteps={timesteps} must be at least 1')
    if schedule == 'quad':
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    if schedule == 'linear':
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if schedule == 'jsd':
        # 1/T, 1/(T-1), ..., 1: the last beta is exactly 1 and alphas_bar[T-1] = 0.
        return 1.0 / torch.linspace(timesteps, 1, timesteps, dtype=torch.float64)
    betas = torch.full([timesteps], beta_end, dtype=torch.float64)
    if schedule in ('warmup10', 'warmup50'):
        # The last warm-up step already equals beta_end (linspace includes its end point).
        warmup = int(timesteps * (0.1 if schedule == 'warmup10' else 0.5))
        betas[:warmup] = torch.linspace(beta_start, beta_end, warmup, dtype=torch.float64)
    return betas


def get_selection_schedule(schedule: str, size: int, timesteps: int) -> torch.Tensor:
    """DDIM timestep subsequence, ascending (ddpm-torch ddim.py; DDIM Sec. 4.2 / App. D.2)."""
    _check_choice('--skip-schedule', schedule, SKIP_SCHEDULES)
    if not 1 <= size <= timesteps:
        raise ValueError(f'--subseq-size={size} must lie in [1, --timesteps={timesteps}]')
    if schedule == 'linear':
        # Stride T // size, so the length is ceil(T / stride) and may exceed size (33 -> 34 steps).
        return torch.arange(0, timesteps, timesteps // size)
    # Ends at 0.8 T, not T - 1, and repeats small timesteps for large sizes (identity steps).
    return (torch.linspace(0, math.sqrt(timesteps * 0.8), size) ** 2).round().to(torch.int64)

#----------------------------------------------------------------------------
# Densities (Ho et al. 2020 Sec. 3.3; ddpm-torch functions.py).


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 - (logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) + torch.exp(logvar1 - logvar2))


def approx_std_normal_cdf(x):
    """Standard normal CDF through the tanh approximation (Page 1977), as in the DDPM code."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_loglik(x, means, log_scale):
    """Log-likelihood of 8-bit data in [-1, 1] under a Gaussian integrated over each bin (Ho et al. 2020 Eq. 13)."""
    half_bin = 1.0 / 255.0
    inv_std = torch.exp(-log_scale)
    centered = x - means
    cdf_upper = torch.where(x > 0.999, torch.ones_like(x), approx_std_normal_cdf((centered + half_bin) * inv_std))
    cdf_lower = torch.where(x < -0.999, torch.zeros_like(x), approx_std_normal_cdf((centered - half_bin) * inv_std))
    return torch.log(torch.clamp(cdf_upper - cdf_lower - 1e-12, min=0) + 1e-12)


def continuous_gaussian_nll(x, mean, logvar):
    """-log N(x; mean, e^logvar) (the 2-D toy's decoder term)."""
    return 0.5 * ((x - mean) ** 2 * torch.exp(-logvar) + math.log(2 * math.pi) + logvar)


def _mean_flat(x):
    return x.mean(dim=tuple(range(1, x.ndim)))

#----------------------------------------------------------------------------


class GaussianDiffusion:
    """Forward process, model distribution and losses of DDPM over T discrete steps (ddpm-torch GaussianDiffusion)."""

    def __init__(self,
        betas,                              # Float64 tensor [T] with values in (0, 1].
        model_mean_type = 'eps',            # What the network predicts: 'mean' | 'x_0' | 'eps'.
        model_var_type  = 'fixed-large',    # 'fixed-small' (posterior) | 'fixed-large' (beta) | 'learned'.
        loss_type       = 'mse',            # 'mse' (L_simple; hybrid with learned) | 'kl' (L_vlb term, bits/dim).
        continuous      = False,            # False = 8-bit images (clipping, discretized decoder); True = 2-D toy data.
        vlb_weight      = 1e-3,             # lambda of the hybrid objective (learned variance with mse).
    ):
        _check_choice('--model-mean-type', model_mean_type, MODEL_MEAN_TYPES)
        _check_choice('--model-var-type', model_var_type, MODEL_VAR_TYPES)
        _check_choice('--loss-type', loss_type, LOSS_TYPES)
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError('betas must be a 1-D schedule with every value in (0, 1]')
        self.model_mean_type, self.model_var_type, self.loss_type = model_mean_type, model_var_type, loss_type
        self.learned_var = model_var_type == 'learned'      # The network outputs 2 C channels.
        self.continuous, self.vlb_weight = continuous, vlb_weight
        self.timesteps = len(betas)
        self._tables_cache = {}
        alphas = 1.0 - betas
        self._set_tables(betas, alphas, torch.cumprod(alphas, dim=0), eta=None)

    def _set_tables(self, betas, alphas, alphas_bar, eta: float | None) -> None:
        """The float64 per-step tables (Ho et al. 2020 Eqs. 4, 6, 7; eta given: DDIM Eq. 16 form)."""
        alphas_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_bar[:-1]])
        eta2 = 1.0 if eta is None else eta ** 2
        t = dict(betas=betas, alphas_bar=alphas_bar, alphas_bar_prev=alphas_bar_prev)
        t['sqrt_alphas_bar'] = alphas_bar.sqrt()
        t['one_minus_alphas_bar'] = 1.0 - alphas_bar
        t['log_one_minus_alphas_bar'] = (1.0 - alphas_bar).log()
        t['sqrt_one_minus_alphas_bar'] = (1.0 - alphas_bar).sqrt()
        t['sqrt_recip_alphas_bar'] = (1.0 / alphas_bar).sqrt()
        t['sqrt_recip_m1_alphas_bar'] = (1.0 / alphas_bar - 1.0).sqrt()
        t['posterior_var'] = betas * (1.0 - alphas_bar_prev) / (1.0 - alphas_bar)
        if eta is not None:
            t['posterior_var'] = t['posterior_var'] * eta2
        # log(0) at t = 0 is avoided by repeating the t = 1 value (clip matters only for DDIM eta = 0).
        posterior_var_1 = torch.cat([t['posterior_var'][1:2], t['posterior_var'][1:]])
        t['posterior_logvar_clipped'] = posterior_var_1.clip(min=1e-20).log()
        if eta is None:
            t['posterior_mean_coef1'] = betas * alphas_bar_prev.sqrt() / (1.0 - alphas_bar)
            t['posterior_mean_coef2'] = alphas.sqrt() * (1.0 - alphas_bar_prev) / (1.0 - alphas_bar)
        else:
            t['posterior_mean_coef2'] = ((1 - alphas_bar - eta2 * betas).sqrt() * (1 - alphas_bar_prev).sqrt()
                                         / (1.0 - alphas_bar))
            t['posterior_mean_coef1'] = alphas_bar_prev.sqrt() * (1.0 - alphas.sqrt() * t['posterior_mean_coef2'])
        # fixed-large keeps var[0] = beta_0 but takes its log-variance at t = 0 from the posterior at t = 1.
        t['large_var'] = betas
        t['large_logvar'] = torch.cat([t['posterior_var'][1:2], betas[1:]]).clip(min=1e-20).log()
        t['log_betas'] = betas.clip(min=1e-20).log()
        self.tables = t
        self._tables_cache = {}

    def fixed_var_tables(self) -> tuple[str, str]:
        """Table names of (var, logvar) for the fixed variance choice (learned: its fixed-small ends)."""
        if self.model_var_type == 'fixed-large':
            return 'large_var', 'large_logvar'
        return 'posterior_var', 'posterior_logvar_clipped'

    def _extract(self, name: str, t, x):
        """Table[t] shaped [B, 1, ...] like x; the float64 table is cast to x's dtype before indexing."""
        key = (name, x.dtype, x.device)
        if key not in self._tables_cache:
            self._tables_cache[key] = self.tables[name].to(dtype=x.dtype, device=x.device)
        return self._tables_cache[key][t].reshape([x.shape[0]] + [1] * (x.ndim - 1))

    def model_timesteps(self, t):
        """Timesteps the network sees for step indices t (identity here; DDIM maps to its subsequence)."""
        return t

    #------------------------------------------------------------------------
    # q(x_t | x_0) and q(x_{t-1} | x_t, x_0).

    def q_mean_var(self, x_0, t):
        """Mean, variance and log-variance of q(x_t | x_0) (Ho et al. 2020 Eq. 4)."""
        mean = self._extract('sqrt_alphas_bar', t, x_0) * x_0
        return mean, self._extract('one_minus_alphas_bar', t, x_0), self._extract('log_one_minus_alphas_bar', t, x_0)

    def q_sample(self, x_0, t, noise):
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) noise."""
        return self._extract('sqrt_alphas_bar', t, x_0) * x_0 + self._extract('sqrt_one_minus_alphas_bar', t, x_0) * noise

    def q_posterior_mean_var(self, x_0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020 Eqs. 6-7)."""
        mean = self._extract('posterior_mean_coef1', t, x_t) * x_0 + self._extract('posterior_mean_coef2', t, x_t) * x_t
        return mean, self._extract('posterior_var', t, x_t), self._extract('posterior_logvar_clipped', t, x_t)

    #------------------------------------------------------------------------
    # p_theta(x_{t-1} | x_t).

    def split_output(self, out):
        """(mean-part, variance-part) of the network output; the variance part is None unless learned."""
        return out.chunk(2, dim=1) if self.learned_var else (out, None)

    def model_var(self, var_out, t, x):
        """Model variance and log-variance: fixed tables, or exp of the interpolated log (Nichol & Dhariwal Eq. 15)."""
        if var_out is None or self.model_var_type != 'learned':
            var_name, logvar_name = self.fixed_var_tables()
            return self._extract(var_name, t, x), self._extract(logvar_name, t, x)
        frac = (var_out + 1) / 2
        logvar = frac * self._extract('log_betas', t, x) + (1 - frac) * self._extract('posterior_logvar_clipped', t, x)
        return logvar.exp(), logvar

    def mean_from_output(self, out, x_t, t, clip_denoised: bool):
        """(model mean, predicted x_0) from the mean-part of the network output."""
        if self.model_mean_type == 'mean':
            pred_x_0 = (out - self._extract('posterior_mean_coef2', t, x_t) * x_t) / self._extract('posterior_mean_coef1', t, x_t)
        elif self.model_mean_type == 'x_0':
            pred_x_0 = out
        else:
            pred_x_0 = self._extract('sqrt_recip_alphas_bar', t, x_t) * x_t - self._extract('sqrt_recip_m1_alphas_bar', t, x_t) * out
        if clip_denoised and not self.continuous:
            pred_x_0 = pred_x_0.clamp(-1, 1)
        if self.model_mean_type == 'mean':
            return out, pred_x_0    # The network's mean is used as is; pred_x_0 is only reported.
        return self.q_posterior_mean_var(pred_x_0, x_t, t)[0], pred_x_0

    def p_mean_var(self, denoise_fn: Callable, x_t, t, clip_denoised: bool = True):
        """(mean, var, logvar, pred_x_0) of p(x_{t-1} | x_t); denoise_fn(x, model_timesteps(t))."""
        mean_out, var_out = self.split_output(denoise_fn(x_t, self.model_timesteps(t)))
        var, logvar = self.model_var(var_out, t, x_t)
        mean, pred_x_0 = self.mean_from_output(mean_out, x_t, t, clip_denoised)
        return mean, var, logvar, pred_x_0

    def p_sample_step(self, denoise_fn: Callable, x_t, t, clip_denoised: bool = True, randn_like=torch.randn_like):
        """x_{t-1} = mean + [t > 0] exp(logvar / 2) z (Ho et al. 2020 Algorithm 2); z is drawn even at t = 0."""
        mean, _var, logvar, _pred = self.p_mean_var(denoise_fn, x_t, t, clip_denoised)
        noise = randn_like(x_t)
        nonzero = (t > 0).to(x_t.dtype).reshape([x_t.shape[0]] + [1] * (x_t.ndim - 1))
        return mean + nonzero * torch.exp(0.5 * logvar) * noise

    @torch.no_grad()
    def p_sample(self, denoise_fn: Callable, noise, randn_like=torch.randn_like, clip_denoised: bool = True):
        """Ancestral sampling from x_T = noise over every step index, last to first."""
        x = noise
        t = torch.empty([noise.shape[0]], dtype=torch.int64, device=noise.device)
        for step in reversed(range(len(self.tables['betas']))):
            x = self.p_sample_step(denoise_fn, x, t.fill_(step), clip_denoised, randn_like)
        return x

    #------------------------------------------------------------------------
    # Training losses (one value per sample).

    def _vlb_term(self, x_0, x_t, t, model_mean, model_logvar):
        """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, decoder NLL L_0 at t = 0, bits/dim."""
        true_mean, _true_var, true_logvar = self.q_posterior_mean_var(x_0, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
        if self.continuous:
            nll = continuous_gaussian_nll(x_0, model_mean, model_logvar)
        else:
            nll = -discretized_gaussian_loglik(x_0, model_mean, log_scale=0.5 * model_logvar)
        nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(t > 0, kl, nll)

    def train_losses(self, denoise_fn: Callable, x_0, t, noise):
        """Per-sample loss at x_t = q_sample(x_0, t, noise): mse, kl, or the hybrid for learned + mse."""
        x_t = self.q_sample(x_0, t, noise)
        mean_out, var_out = self.split_output(denoise_fn(x_t, self.model_timesteps(t)))
        if self.loss_type == 'kl':
            model_var, model_logvar = self.model_var(var_out, t, x_t)
            model_mean, _ = self.mean_from_output(mean_out, x_t, t, clip_denoised=False)
            return self._vlb_term(x_0, x_t, t, model_mean, model_logvar)
        target = {'mean': lambda: self.q_posterior_mean_var(x_0, x_t, t)[0], 'x_0': lambda: x_0,
                  'eps': lambda: noise}[self.model_mean_type]()
        loss = _mean_flat((target - mean_out) ** 2)
        if self.learned_var:
            # Hybrid objective: L_vlb trains only the variance (stop-gradient on the mean, Nichol & Dhariwal
            # Sec. 3.1); T * L_t estimates the sum over t, so the weight is lambda * T (= T / 1000).
            _model_var, model_logvar = self.model_var(var_out, t, x_t)
            model_mean, _ = self.mean_from_output(mean_out.detach(), x_t, t, clip_denoised=False)
            loss = loss + self.vlb_weight * self.timesteps * self._vlb_term(x_0, x_t, t, model_mean, model_logvar)
        return loss


class DDIM(GaussianDiffusion):
    """GaussianDiffusion re-indexed by a timestep subsequence with stochasticity eta (ddpm-torch ddim.py; DDIM Eq. 12)."""

    def __init__(self,
        betas,                              # Float64 betas [T] of the trained model.
        subsequence,                        # Ascending int64 timesteps (get_selection_schedule).
        eta             = 0.0,              # 0 = deterministic DDIM, 1 = DDPM-like posterior variance.
        model_mean_type = 'eps',            # As in GaussianDiffusion.
        model_var_type  = 'fixed-small',    # eta != 1 always uses the eta-scaled posterior ('fixed-small').
        loss_type       = 'mse',            # As in GaussianDiffusion (unused for sampling).
        continuous      = False,            # As in GaussianDiffusion.
    ):
        super().__init__(betas, model_mean_type, model_var_type, loss_type, continuous)
        if eta < 0:
            raise ValueError(f'--eta={eta} must be >= 0')
        if eta ** 2 != 1.0 and model_var_type != 'fixed-small':
            # The reference silently switches to the eta-scaled posterior variance.
            self.model_var_type = 'fixed-small'
        self.eta = eta
        self.subsequence = torch.as_tensor(subsequence, dtype=torch.int64)
        alphas_bar = self.tables['alphas_bar'][self.subsequence]
        alphas = alphas_bar / torch.cat([torch.ones(1, dtype=torch.float64), alphas_bar[:-1]])
        self._set_tables(1.0 - alphas, alphas, alphas_bar, eta=eta)

    def model_timesteps(self, t):
        """The network is called with the original timesteps subsequence[t] (step indices t)."""
        return self.subsequence.to(t.device)[t]
