"""2D toy example of autoguidance ("Guiding a Diffusion Model with a Bad Version of Itself", Sec. 3, Fig. 2).

The ground truth is an exact mixture of anisotropic Gaussians shaped as two fractal trees
(classes A and B). Because a Gaussian mixture stays one under heat diffusion, its density,
score and samples are exact at every noise level sigma, which makes it possible to train
small models by regressing the true score and to measure how guidance changes the sample
distribution. Constants, names and random-number order follow NVlabs/edm2 toy_example.py.
"""

import copy
import functools
import os

import numpy as np
import torch

import dnnlib
from torch_utils import persistence

#----------------------------------------------------------------------------
# Exact Gaussian mixture, smoothed by N(0, sigma^2 I) on a per-sample basis.

def _exp_no_denormals(x):
    # exp() of far-away components lands in float32's denormal range, which is ~50x slower on CPU;
    # flooring at the smallest normal number changes sums of O(1) terms by less than 1e-34.
    return x.clamp_(min=-87).exp_()

class GaussianMixture(torch.nn.Module):
    """p(x; sigma) = sum_i phi_i N(x; mu_i, Sigma_i + sigma^2 I), the diffused ground truth."""

    def __init__(self,
        phi,                        # Per-component weight, normalized here: [comp].
        mu,                         # Per-component mean: [comp, dim].
        Sigma,                      # Per-component covariance: [comp, dim, dim].
        sample_lut_size = 64<<10,   # Entries in the table that maps uniform draws to components.
    ):
        super().__init__()
        self.register_buffer('phi', torch.tensor(np.asarray(phi) / np.sum(phi), dtype=torch.float32))
        self.register_buffer('mu', torch.tensor(np.asarray(mu), dtype=torch.float32))
        self.register_buffer('Sigma', torch.tensor(np.asarray(Sigma), dtype=torch.float32))

        # Sigma = Q diag(L) Q^T, so Sigma + sigma^2 I = Q diag(L + sigma^2) Q^T for any sigma.
        L, Q = torch.linalg.eigh(self.Sigma)
        self.register_buffer('_L', L)   # [comp, dim]
        self.register_buffer('_Q', Q)   # [comp, dim, dim]

        # Component index for each of sample_lut_size equal slices of [0, 1), proportional to phi.
        bounds = (torch.cat([torch.zeros_like(self.phi[:1]), self.phi.cumsum(0)]) * sample_lut_size + 0.5).to(torch.int32)
        self.register_buffer('_sample_lut', torch.zeros(sample_lut_size, dtype=torch.int64))
        for idx, (begin, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            self._sample_lut[begin : end] = idx

    def _eigenbasis(self):
        # Per eigen-direction j: Q[:, :, j] as a [dim, comp] matrix and the projected means mu_i . q_ij,
        # so that projecting every point on every component's eigenbasis is one matmul per direction.
        dirs = [self._Q[:, :, j].t().contiguous() for j in range(self._Q.shape[-1])]
        mu_proj = [(self.mu * self._Q[:, :, j]).sum(-1) for j in range(self._Q.shape[-1])]
        return dirs, mu_proj

    def _log_terms(self, x, sigma, dirs, mu_proj):
        """log(phi_i N(x; mu_i, Sigma_i')) and the eigenbasis coordinates of inv(Sigma_i') (mu_i - x)."""
        sigma2 = (sigma ** 2)[:, None]
        det, diffs, scaled = 1, [], []
        for j, (q, m) in enumerate(zip(dirs, mu_proj)):   # separate [n, comp] planes are faster than [n, comp, dim]
            diffs.append(torch.addmm(m, x, q, alpha=-1))   # q_ij . (mu_i - x)
            var = self._L[:, j] + sigma2                   # eigenvalue of Sigma' = Sigma + sigma^2 I
            scaled.append(diffs[-1] / var)
            det = det * var
        log_w = det.log().add_(x.shape[-1] * np.log(2 * np.pi))   # log((2 pi)^dim det(Sigma'))
        for diff, plane in zip(diffs, scaled):
            log_w.addcmul_(diff, plane)                    # + (mu - x)^T inv(Sigma') (mu - x)
        return scaled, log_w.mul_(-0.5).add_(self.phi.log())       # [n, comp] each

    def _batched(self, fn, x, sigma, max_batch_size):
        # Row chunks keep the [n, comp] temporaries cache-sized, which is several times faster on CPU.
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).broadcast_to(x.shape[:-1])
        rows = max(1, min(max_batch_size, (1 << 16) // len(self.phi)))
        flat_x, flat_sigma = x.reshape(-1, x.shape[-1]), sigma.reshape(-1)
        dirs, mu_proj = self._eigenbasis()
        out = [fn(*self._log_terms(xx, ss, dirs, mu_proj), dirs) for xx, ss in zip(flat_x.split(rows), flat_sigma.split(rows))]
        return torch.cat(out)

    def logp(self, x, sigma=0, max_batch_size=1<<14):
        """log p(x; sigma), evaluated in log space so that it stays finite far from the data."""
        def fn(scaled, log_w, dirs):
            log_max = log_w.max(-1, keepdim=True).values
            return (log_max + _exp_no_denormals(log_w - log_max).sum(-1, keepdim=True).log()).squeeze(-1)
        return self._batched(fn, x, sigma, max_batch_size).reshape(x.shape[:-1])

    def pdf(self, x, sigma=0, max_batch_size=1<<14):
        """p(x; sigma) for a batch of points [..., dim]."""
        return self.logp(x, sigma, max_batch_size).exp()

    def score(self, x, sigma=0, max_batch_size=1<<14):
        """Exact score grad_x log p(x; sigma) = sum_i w_i inv(Sigma_i') (mu_i - x), w = posterior."""
        def fn(scaled, log_w, dirs):
            w = _exp_no_denormals(log_w - log_w.max(-1, keepdim=True).values)
            w /= w.sum(-1, keepdim=True)
            return sum(plane.mul_(w) @ q.t() for plane, q in zip(scaled, dirs))   # back from each eigenbasis
        return self._batched(fn, x, sigma, max_batch_size).reshape(x.shape)

    def sample(self, shape, sigma=0, generator=None):
        """Draw x ~ p(x; sigma) of the given batch shape (component draw first, then the noise)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.mu.device).broadcast_to(shape)
        i = self._sample_lut[torch.randint(len(self._sample_lut), size=sigma.shape, device=sigma.device, generator=generator)]
        std = (self._L[i] + sigma[..., None] ** 2).sqrt()                  # sqrt of eigenvalues of Sigma'
        noise = torch.randn(std.shape, device=sigma.device, generator=generator)
        offset = torch.einsum('...ij,...j,...kj,...k->...i', self._Q[i], std, self._Q[i], noise) # sqrt(Sigma') noise
        return offset + self.mu[i]

#----------------------------------------------------------------------------
# Ground truth: two fractal trees, generated recursively from a fixed seed.

TREE_DEPTH = 7          # Levels of branching.
COMPS_PER_BRANCH = 8    # Gaussians placed along each branch.

@functools.lru_cache(None)
def gt(classes='A', device=torch.device('cpu'), seed=2, origin=np.array([0.0030, 0.0325]), scale=np.array([1.3136, 1.3844])):
    """Ground-truth mixture for classes 'A', 'B' or 'AB' (Fig. 2); cached per (classes, device)."""
    if not classes or set(classes) - set('AB'):
        raise ValueError(f'classes={classes!r} is not valid; choose A, B or AB')
    rnd = np.random.RandomState(seed)
    comps = []

    def branch(cls, depth, pos, angle):
        if depth >= TREE_DEPTH:
            return
        direction = np.array([np.cos(angle), np.sin(angle)])
        length = 0.292 * (0.8 ** depth) * (rnd.randn() * 0.2 + 1)
        thick = 0.2 * (0.8 ** depth) / length       # relative width across the branch
        size = scale * length * 0.06
        along = np.outer(direction, direction)
        for t in np.linspace(0.07, 0.93, num=COMPS_PER_BRANCH):
            comps.append(dnnlib.EasyDict(cls=cls, phi=length * (0.5 ** depth), mu=(pos + direction * length * t) * scale,
                Sigma=(along + (np.eye(2) - along) * (thick ** 2)) * np.outer(size, size)))
        for sign in [1, -1]:   # the draw order of the two children matters for the layout
            branch(cls, depth + 1, pos + direction * length, angle + sign * (0.7 ** depth) * (rnd.randn() * 0.2 + 1))

    branch('A', 0, origin, np.pi * 0.25)
    branch('B', 0, origin, np.pi * 1.25)
    sel = [c for c in comps if c.cls in classes]
    return GaussianMixture([c.phi for c in sel], [c.mu for c in sel], [c.Sigma for c in sel]).to(device)

#----------------------------------------------------------------------------
# Magnitude-preserving layers (EDM2 Sec. 2.3), as in training/networks_edm2.py.

def normalize(x, dim=None, eps=1e-4):
    """Scale x to unit RMS norm along `dim` (all but the first by default) (EDM2 Eq. 77)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=np.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)

@persistence.persistent_class
class MPSiLU(torch.nn.Module):
    """SiLU scaled back to unit magnitude (EDM2 Eq. 81)."""
    def forward(self, x):
        return torch.nn.functional.silu(x) / 0.596

@persistence.persistent_class
class MPLinear(torch.nn.Module):
    """Linear layer with forced weight normalization (EDM2 Eqs. 66-67, Algorithm 1)."""

    def __init__(self,
        in_dim,     # Input features.
        out_dim,    # Output features.
    ):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_dim, in_dim))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight))   # keep the stored weights on the unit sphere
        w = normalize(self.weight) / np.sqrt(self.weight[0].numel())
        return x @ w.t()

#----------------------------------------------------------------------------
# Model of log p(x; sigma) up to a constant; its score comes from autograd.

@persistence.persistent_class
class ToyModel(torch.nn.Module):
    """MLP for log p(x; sigma) with EDM-style preconditioning; score = grad_x (paper Sec. 3)."""

    def __init__(self,
        in_dim      = 2,    # Input dimensionality.
        num_layers  = 4,    # Number of hidden layers.
        hidden_dim  = 64,   # Number of hidden features.
        sigma_data  = 0.5,  # Expected standard deviation of the training data.
    ):
        super().__init__()
        self.sigma_data = sigma_data
        self.layers = torch.nn.Sequential()
        self.layers.append(MPLinear(in_dim + 2, hidden_dim))  # +2: noise level embedding and a constant
        for _layer_idx in range(num_layers):
            self.layers.append(MPSiLU())
            self.layers.append(MPLinear(hidden_dim, hidden_dim))
        self.gain = torch.nn.Parameter(torch.zeros([]))

    def forward(self, x, sigma=0):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).broadcast_to(x.shape[:-1]).unsqueeze(-1)
        x = x / (self.sigma_data ** 2 + sigma ** 2).sqrt()   # c_in
        y = self.layers(torch.cat([x, sigma.log() / 4, torch.ones_like(sigma)], dim=-1))
        # A Gaussian prior term plus a learned correction that fades in as 1/sigma.
        return (y ** 2).mean(-1) * self.gain / sigma.squeeze(-1) - 0.5 * (x ** 2).sum(-1)

    def logp(self, x, sigma=0):
        """Unnormalized log p(x; sigma)."""
        return self(x, sigma)

    def pdf(self, x, sigma=0):
        """Unnormalized p(x; sigma), scaled so that its maximum over the batch is 1."""
        logp = self.logp(x, sigma=sigma)
        return (logp - logp.max()).exp()

    def score(self, x, sigma=0, graph=False):
        """grad_x log p(x; sigma) by autograd; `graph=True` keeps it differentiable for training."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logp = self.logp(x, sigma=sigma)
            return torch.autograd.grad(outputs=[logp.sum()], inputs=[x], create_graph=graph)[0]

#----------------------------------------------------------------------------
# Training: regress the exact score, sigma^2-weighted (denoising score matching, EDM Eq. 2).

def training_step(net, opt, classes, batch_size, P_mean, P_std, lr):
    """One Adam step on the score-matching loss; returns the batch mean loss (tensor)."""
    for group in opt.param_groups:
        group['lr'] = lr
    opt.zero_grad()
    sigma = (torch.randn(batch_size, device=net.gain.device) * P_std + P_mean).exp()   # log-normal (EDM Sec. 5)
    target = gt(classes, net.gain.device)
    samples = target.sample(batch_size, sigma)
    gt_scores = target.score(samples, sigma)
    net_scores = net.score(samples, sigma, graph=True)
    loss = ((sigma ** 2) * ((gt_scores - net_scores) ** 2).mean(-1)).mean()
    loss.backward()
    opt.step()
    return loss.detach()

def update_ema(net, ema, ema_std, iter_idx):
    """Power function EMA with relative width ema_std, one iteration = one time unit (EDM2 Eq. 127)."""
    from training.phema import power_function_beta
    beta = power_function_beta(std=ema_std, t_next=iter_idx + 1, t_delta=1)
    for p_net, p_ema in zip(net.parameters(), ema.parameters()):
        p_ema.lerp_(p_net.detach(), 1 - beta)

def do_train(
    classes='A', num_layers=4, hidden_dim=64, batch_size=4<<10, total_iter=4<<10, seed=0,
    P_mean=-2.3, P_std=1.5, sigma_data=0.5, lr_ref=1e-2, lr_iter=512, ema_std=0.010,
    pkl_pattern=None, pkl_iter=256, viz_iter=32, device=torch.device('cpu'), progress=True,
):
    """Train a ToyModel on gt(classes); returns EasyDict(net, ema, loss[iter]). Same defaults as the reference."""
    import tqdm
    device = torch.device(device)
    gt(classes)  # validate early
    torch.manual_seed(seed)
    net = ToyModel(num_layers=num_layers, hidden_dim=hidden_dim, sigma_data=sigma_data).to(device).train().requires_grad_(True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), betas=(0.9, 0.99))
    viz = LiveView(ema, device) if viz_iter is not None else None
    losses = torch.zeros(total_iter, device=device)
    for iter_idx in tqdm.tqdm(range(total_iter), disable=not progress):
        if viz is not None and iter_idx % viz_iter == 0:
            viz.update()
        lr = lr_ref / np.sqrt(max(iter_idx / lr_iter, 1))   # inverse square root decay (EDM2 Eq. 121)
        losses[iter_idx] = training_step(net, opt, classes, batch_size, P_mean, P_std, lr)
        update_ema(net, ema, ema_std, iter_idx)
        if pkl_pattern is not None and (iter_idx + 1) % pkl_iter == 0:
            save_snapshot(ema, pkl_pattern % (iter_idx + 1))
    return dnnlib.EasyDict(net=net, ema=ema, loss=losses.cpu().numpy())

def save_snapshot(ema, pkl_path):
    """Write a copy of the EMA model as a reference-format pickle (a bare ToyModel on CPU)."""
    if os.path.dirname(pkl_path):
        os.makedirs(os.path.dirname(pkl_path), exist_ok=True)
    persistence.save_pickle(copy.deepcopy(ema).cpu(), pkl_path)

class LiveView:
    """Interactive matplotlib window that shows the EMA model's samples while training."""

    def __init__(self, ema, device):
        plt = _pyplot()
        self.ema, self.device, self.plt = ema, device, plt
        plt.ion()
        plt.rcParams['toolbar'] = 'None'
        plt.rcParams['figure.subplot.left'] = plt.rcParams['figure.subplot.bottom'] = 0
        plt.rcParams['figure.subplot.right'] = plt.rcParams['figure.subplot.top'] = 1
        plt.figure(figsize=[12, 12], dpi=75)
        do_plot(ema, elems={'gt_uncond', 'gt_outline'}, device=device)
        plt.gcf().canvas.flush_events()

    def update(self):
        for line in list(self.plt.gca().lines):
            line.remove()
        do_plot(self.ema, elems={'samples'}, device=self.device)
        self.plt.gcf().canvas.flush_events()

#----------------------------------------------------------------------------
# Sampling: deterministic EDM sampler (EDM Algorithm 1, Heun's 2nd order method).

def do_sample(net, x_init, guidance=1, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=5, rho=7):
    """Solve the probability flow ODE from x_init at sigma_max; returns the trajectory [num_steps+1, ...]."""
    def denoise(x, sigma):
        score = net.score(x, sigma)
        if gnet is not None:
            score = gnet.score(x, sigma).lerp(score, guidance)   # guidance (paper Eq. 1) in score form
        return x + score * (sigma ** 2)                          # Tweedie: D(x) = x + sigma^2 grad log p

    step_indices = torch.arange(num_steps, dtype=torch.float32, device=x_init.device)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])   # EDM Eq. 5, t_N = 0

    x_cur = x_init
    trajectory = [x_cur]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        d_cur = (x_cur - denoise(x_cur, t_cur)) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        if i < num_steps - 1:   # 2nd order correction, except on the final step to sigma = 0
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        x_cur = x_next.detach()
        trajectory.append(x_cur)
    return torch.stack(trajectory)

def initial_samples(num_samples, sigma_max, seed, device, sample_distance=0):
    """Starting points drawn from gt('A') at sigma_max; optionally thinned to a minimum spacing."""
    samples = gt('A', device).sample(num_samples, sigma_max, generator=torch.Generator(device).manual_seed(seed))
    if sample_distance > 0:
        ok = torch.ones(len(samples), dtype=torch.bool, device=device)
        for i in range(1, len(samples)):
            ok[i] = (samples[i] - samples[:i][ok[:i]]).square().sum(-1).sqrt().min() >= sample_distance
        samples = samples[ok]
    return samples

#----------------------------------------------------------------------------
# Plotting (paper Fig. 2).

def _pyplot():
    """Import matplotlib.pyplot, on the Agg backend when there is no display."""
    try:
        import matplotlib
    except ImportError:
        raise dnnlib.util.UserError('plotting needs matplotlib: pip install matplotlib') from None
    if not has_display():
        matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt

def has_display():
    """True when an interactive window can be opened."""
    import sys
    if sys.platform in ('win32', 'darwin'):
        return True
    return bool(os.environ.get('DISPLAY') or os.environ.get('WAYLAND_DISPLAY'))

def _grid(view_x, view_y, view_size, grid_resolution, device):
    gridx = torch.linspace(view_x - view_size, view_x + view_size, steps=grid_resolution, device=device)
    gridy = torch.linspace(view_y - view_size, view_y + view_size, steps=grid_resolution, device=device)
    return gridx, gridy, torch.stack(torch.meshgrid(gridx, gridy, indexing='xy'), axis=-1)

@functools.lru_cache(maxsize=8)
def _gt_logp_on_grid(classes, view, sigma, device):
    # Several panels draw the same ground-truth contours; evaluating them once saves most of the plot time.
    return gt(classes, device).logp(_grid(*view, device)[2], sigma)

class _Canvas:
    """Drawing primitives on the current axes over a square grid centered at (view_x, view_y)."""

    def __init__(self, plt, view_x, view_y, view_size, grid_resolution, arrow_len, device):
        self.plt, self.arrow_len, self.device = plt, arrow_len, device
        self.view = (view_x, view_y, view_size, grid_resolution)
        self.gridx, self.gridy, self.gridxy = _grid(*self.view, device)
        plt.xlim(float(self.gridx[0]), float(self.gridx[-1]))
        plt.ylim(float(self.gridy[0]), float(self.gridy[-1]))
        plt.gca().set_aspect('equal')
        plt.gca().set_axis_off()

    def contours(self, logp, levels, colors=None, cmap=None, alpha=1, linecolors='black', linealpha=1, linewidth=2.5):
        # -sqrt(max - logp) spreads the levels evenly across the steep log-density of the tree.
        values = -(logp.max() - logp).sqrt().detach().cpu().numpy()
        gx, gy = self.gridx.cpu().numpy(), self.gridy.cpu().numpy()
        self.plt.contourf(gx, gy, values, levels=levels, antialiased=True, extend='max', colors=colors, cmap=cmap, alpha=alpha)
        self.plt.contour(gx, gy, values, levels=levels, antialiased=True, colors=linecolors, alpha=linealpha, linestyles='solid', linewidths=linewidth)

    def lines(self, pos, color='black', alpha=1):
        self.plt.plot(*pos.detach().cpu().numpy().T, '-', linewidth=5, solid_capstyle='butt', color=color, alpha=alpha)

    def arrows(self, pos, direction, color='black', alpha=1):
        self.plt.quiver(*pos.detach().cpu().numpy().T, *direction.detach().cpu().numpy().T * self.arrow_len, scale=0.6, width=5e-3,
            headwidth=4, headlength=3, headaxislength=2.5, capstyle='round', color=color, alpha=alpha)

    def points(self, pos, color='black', alpha=1, size=30):
        self.plt.plot(*pos.detach().cpu().numpy().T, '.', markerfacecolor='black', markeredgecolor='none', color=color, alpha=alpha, markersize=size)

def _draw_densities(canvas, elems, net, gnet, sigma_max, device):
    grid = canvas.gridxy
    def gt_logp(classes, sigma=0):
        return _gt_logp_on_grid(classes, canvas.view, float(sigma), device)
    with torch.no_grad():
        if 'p_net' in elems:    canvas.contours(net.logp(grid, sigma_max), levels=np.linspace(-2.5, 2.5, num=20)[1:-1], cmap='Greens', linealpha=0.2)
        if 'p_gnet' in elems:   canvas.contours(gnet.logp(grid, sigma_max), levels=np.linspace(-2.5, 3.5, num=20)[1:-1], cmap='Reds', linealpha=0.2)
        if 'p_ratio' in elems:  canvas.contours(net.logp(grid, sigma_max) - gnet.logp(grid, sigma_max), levels=np.linspace(-2.2, 1.0, num=20)[1:-1], cmap='Blues', linealpha=0.2)
        if 'gt_uncond' in elems:  canvas.contours(gt_logp('AB'), levels=[-2.12, 0], colors=[[0.9, 0.9, 0.9]], linecolors=[[0.7, 0.7, 0.7]], linewidth=1.5)
        if 'gt_outline' in elems: canvas.contours(gt_logp('A'), levels=[-2.12, 0], colors=[[1.0, 0.8, 0.6]], linecolors=[[0.8, 0.6, 0.5]], linewidth=1.5)
        if 'gt_smax' in elems:    canvas.contours(gt_logp('A', sigma_max), levels=[-1.41, 0], colors=['C1'], alpha=0.2, linealpha=0.2)
        if 'gt_shaded' in elems:  canvas.contours(gt_logp('A'), levels=np.linspace(-2.5, 3.07, num=15)[1:-1], cmap='Oranges', linealpha=0.2)

def _draw_points(canvas, elems, net, gnet, samples, trajectories, sigma_max):
    if 'trajectories' in elems:   canvas.lines(trajectories.transpose(0, 1), alpha=0.3)
    if 'scores_net' in elems:     canvas.arrows(samples, net.score(samples, sigma_max), color='C2')
    if 'scores_gnet' in elems:    canvas.arrows(samples, gnet.score(samples, sigma_max), color='C3')
    if 'scores_ratio' in elems:   canvas.arrows(samples, net.score(samples, sigma_max) - gnet.score(samples, sigma_max), color='C0')
    if 'samples' in elems:        canvas.points(trajectories[-1], size=15, alpha=0.25)
    if 'samples_before' in elems: canvas.points(samples)
    if 'samples_after' in elems:  canvas.points(trajectories[-1])

def do_plot(
    net=None, guidance=1, gnet=None, elems={'gt_uncond', 'gt_outline', 'samples'},
    view_x=0, view_y=0, view_size=1.6, grid_resolution=400, arrow_len=0.002,
    num_samples=1<<13, seed=1, sample_distance=0, sigma_max=5, device=torch.device('cpu'),
):
    """Draw the requested elements (densities, scores, trajectories, samples) into the current axes."""
    plt = _pyplot()
    samples = trajectories = None
    if any(x.startswith(y) for x in elems for y in ['samples', 'trajectories', 'scores']):
        samples = initial_samples(num_samples, sigma_max, seed, device, sample_distance)
    if any(x.startswith(y) for x in elems for y in ['samples', 'trajectories']):
        trajectories = do_sample(net=(net or gt('A', device)), x_init=samples, guidance=guidance, gnet=gnet, sigma_max=sigma_max)
    canvas = _Canvas(plt, view_x, view_y, view_size, grid_resolution, arrow_len, device)
    _draw_densities(canvas, elems, net, gnet, sigma_max, device)
    _draw_points(canvas, elems, net, gnet, samples, trajectories, sigma_max)

PANELS = [  # (title, uses gnet, guided, elements, view) of the 2x4 figure, row by row
    ('Ground truth distribution',            False, False, {'gt_uncond', 'gt_outline', 'samples'}, 'wide'),
    ('Sample distribution without guidance', False, False, {'gt_uncond', 'gt_outline', 'samples'}, 'wide'),
    ('Sample distribution with guidance',    True,  True,  {'gt_uncond', 'gt_outline', 'samples'}, 'wide'),
    ('Trajectories without guidance',        False, False, {'gt_shaded', 'trajectories', 'samples_after'}, 'zoom'),
    ('PDF of main model',                    False, False, {'p_net', 'gt_smax', 'scores_net', 'samples_before'}, 'zoom'),
    ('PDF of guiding model',                 True,  False, {'p_gnet', 'gt_smax', 'scores_gnet', 'samples_before'}, 'zoom'),
    ('PDF ratio (main / guiding)',           True,  False, {'p_ratio', 'gt_smax', 'scores_ratio', 'samples_before'}, 'zoom'),
    ('Trajectories with guidance',           True,  True,  {'gt_shaded', 'trajectories', 'samples_after'}, 'zoom'),
]

def plot_figure(net, gnet, guidance=3, save=None, num_samples=1<<14, grid_resolution=400, device=torch.device('cpu')):
    """Draw the reference's 2x4 figure (paper Fig. 2 style); save to `save` (PNG/PDF) or show it."""
    plt = _pyplot()
    views = dict(
        wide=dict(view_x=0.30, view_y=0.30, view_size=1.2, num_samples=num_samples),
        zoom=dict(view_x=0.45, view_y=1.22, view_size=0.3, num_samples=max(num_samples // 4, 1), sample_distance=0.045, sigma_max=0.03),
    )
    plt.rcParams['font.size'] = 28
    fig = plt.figure(figsize=[48, 25], dpi=40, tight_layout=True)
    for idx, (title, uses_gnet, guided, elems, view) in enumerate(PANELS):
        plt.subplot(2, 4, idx + 1)
        plt.title(title)
        model = None if idx == 0 else net
        do_plot(net=model, gnet=(gnet if uses_gnet else None), guidance=(guidance if guided else 1),
            elems=elems, grid_resolution=grid_resolution, device=device, **views[view])
    if save is None:
        plt.show()
        return
    if os.path.dirname(save):
        os.makedirs(os.path.dirname(save), exist_ok=True)
    _, ext = os.path.splitext(save)
    with dnnlib.util.atomic_write(save) as f:
        fig.savefig(f, dpi=80, format=(ext[1:].lower() or 'png'))
    plt.close(fig)

#----------------------------------------------------------------------------
# Default models: the reference's pretrained toy models, or local retraining.

CPU_BATCH_SIZE = 1024   # batch for training default models on CPU, where 4096 takes too long

REFERENCE_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm2/toy-example/{name}/iter{iter:04d}.pkl'

DEFAULT_MODELS = dnnlib.EasyDict(   # the models of the reference's `plot` examples
    net   = dict(classes='A',  num_layers=4, hidden_dim=64, total_iter=4096), # main model
    gnet  = dict(classes='A',  num_layers=4, hidden_dim=32, total_iter=512),  # autoguidance: smaller, shorter trained
    ucond = dict(classes='AB', num_layers=4, hidden_dim=32, total_iter=512),  # CFG: unconditional (both classes)
)

def model_name(classes, num_layers, hidden_dim):
    """Folder name of a toy model run, as in the reference's URLs (e.g. clsA-layers04-dim64)."""
    return f'cls{classes}-layers{num_layers:02d}-dim{hidden_dim}'

def load_model(path_or_url, device=torch.device('cpu'), trust=False):
    """Load a toy model pickle (ours or the reference's) for sampling."""
    net = persistence.load_pickle(path_or_url, trust=trust)
    if not all(hasattr(net, attr) for attr in ('logp', 'score')):
        raise dnnlib.util.UserError(f'{path_or_url}: holds a {type(net).__name__}, not a toy model (ToyModel pickle)')
    return net.to(device).eval().requires_grad_(False)

def default_model(role, device=torch.device('cpu'), log=print, **train_overrides):
    """The default model for `role` (net, gnet, ucond): a downloaded reference model if cached, else our
    trained copy under $DNNLIB_CACHE_DIR/toy_example/, else train it now and cache it."""
    spec = DEFAULT_MODELS[role]
    name = model_name(spec['classes'], spec['num_layers'], spec['hidden_dim'])
    downloaded = dnnlib.util.url_cache_path(REFERENCE_URL.format(name=name, iter=spec['total_iter']))
    if os.path.isfile(downloaded):
        return load_model(downloaded, device)
    path = dnnlib.make_cache_dir_path('toy_example', name, f'iter{spec["total_iter"]:04d}.pkl')
    if not os.path.isfile(path):
        settings = dict(spec, **train_overrides)
        log(f'No --{role} given and none cached: training the default {role} model {name} '
            f'({settings["total_iter"]} iterations, batch {settings.get("batch_size", 4096)}); caching it to {path}')
        save_snapshot(do_train(**settings, viz_iter=None, device=device).ema, path)
    return load_model(path, device)

#----------------------------------------------------------------------------
# Measurement: how much of each sampler's output lands outside the class-A tree.

OUTLINE_DEPTH = 2.12 ** 2   # the figure's outline: log p within 2.12^2 of its maximum (contour level -2.12)

def support_threshold(device=torch.device('cpu')):
    """log p_A threshold of the GT support: max over component means of log p_A(x; 0), minus 2.12^2."""
    target = gt('A', device)
    return float(target.logp(target.mu).max()) - OUTLINE_DEPTH

def sample_stats(samples, threshold):
    """Outside-support fraction and NLL = -log p_A(x; 0) (nats) of final samples under the ground truth."""
    with torch.no_grad():
        logp = gt('A', samples.device).logp(samples)
    return dnnlib.EasyDict(outside=float((logp < threshold).float().mean()),
        nll_mean=float(-logp.mean()), nll_median=float(-logp.median()))

def measure(net, gnet, ucond, guidance=3, cfg_guidance=4, num_samples=1<<14, seed=1, sigma_max=5, device=torch.device('cpu')):
    """Compare the exact GT sampler, no guidance, CFG and autoguidance; returns one row per method."""
    x_init = initial_samples(num_samples, sigma_max, seed, device)
    threshold = support_threshold(device)
    methods = [
        ('ground truth score', gt('A', device), None, 1),
        ('no guidance', net, None, 1),
        ('classifier-free guidance', net, ucond, cfg_guidance),
        ('autoguidance', net, gnet, guidance),
    ]
    rows = []
    for label, model, guide, weight in methods:
        if model is None or (weight != 1 and guide is None):
            continue
        samples = do_sample(net=model, x_init=x_init, guidance=weight, gnet=guide, sigma_max=sigma_max)[-1]
        rows.append(dnnlib.EasyDict(method=label, guidance=weight, **sample_stats(samples, threshold)))
    return rows
