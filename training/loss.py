"""Training losses: VP, VE and EDM (EDM paper, Table 1), EDM2 (EDM2 paper, Eq. 21)
and the Stable Target Field wrapper (Xu et al., ICLR 2023).

Every loss is called as `loss_fn(net=net, images=images, labels=labels,
augment_pipe=augment_pipe)` and returns the per-element loss [N, C, H, W]; the
training loop sums it and divides by the batch size. Random draws follow the
reference order: sigma, then the augmentation, then the noise.
"""

import numpy as np
import torch

from torch_utils import persistence

#----------------------------------------------------------------------------
# Shared denoising-loss skeleton: subclasses choose p(sigma) and lambda(sigma).


class _DenoisingLoss:
    """E_{sigma,y,n} lambda(sigma) ||D(y + n; sigma) - target||^2 (EDM Eq. 2 / Eq. 8)."""

    def sample_sigma(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, net, images, labels=None, augment_pipe=None):
        """Per-element weighted denoising loss [N, C, H, W]."""
        return self.denoising_loss(net, images, labels, augment_pipe)

    def denoising_loss(self, net, images, labels=None, augment_pipe=None, target_fn=None):
        """Shared body; `target_fn(noisy, clean, sigma)` replaces the clean target (STF).

        The target function runs after the network call, so that its random draws (STF's
        augmentation of the reference batch) come after the network's, in the STF fork's order.
        """
        sigma = self.sample_sigma(images)
        weight = self.loss_weight(sigma)
        clean, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        noisy = clean + torch.randn_like(clean) * sigma
        target = clean if target_fn is None else (lambda: target_fn(noisy, clean, sigma))
        return self.weighted_error(net, noisy, sigma, labels, augment_labels, target, weight)

    def weighted_error(self, net, noisy, sigma, labels, augment_labels, target, weight):
        """lambda(sigma) * (D(x; sigma) - target)^2; `target` may be a function evaluated after D."""
        denoised = net(noisy, sigma, labels, augment_labels=augment_labels)
        target = target() if callable(target) else target
        return weight * ((denoised - target) ** 2)

#----------------------------------------------------------------------------


@persistence.persistent_class
class VPLoss(_DenoisingLoss):
    """Variance-preserving loss (EDM Table 1, "VP" column; Song et al. 2021)."""

    def __init__(self,
        beta_d      = 19.9,     # Extent of the noise level schedule.
        beta_min    = 0.1,      # Initial slope of the noise level schedule.
        epsilon_t   = 1e-5,     # Minimum t-value used during training.
    ):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def sample_sigma(self, images):
        """t ~ U(epsilon_t, 1), sigma = sigma_VP(t)."""
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        return self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))

    def loss_weight(self, sigma):
        """lambda(sigma) = 1 / sigma^2."""
        return 1 / sigma ** 2

    def sigma(self, t):
        """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM Table 1)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()


@persistence.persistent_class
class VELoss(_DenoisingLoss):
    """Variance-exploding loss (EDM Table 1, "VE" column; Song et al. 2021)."""

    def __init__(self,
        sigma_min   = 0.02,     # Minimum noise level.
        sigma_max   = 100,      # Maximum noise level.
    ):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def sample_sigma(self, images):
        """log sigma ~ U(log sigma_min, log sigma_max)."""
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        return self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)

    def loss_weight(self, sigma):
        """lambda(sigma) = 1 / sigma^2."""
        return 1 / sigma ** 2


class _LogNormalSigma(_DenoisingLoss):
    """Log-normal p(sigma) and the EDM weighting shared by EDMLoss and EDM2Loss (EDM Table 1)."""

    def sample_sigma(self, images):
        """ln sigma ~ N(P_mean, P_std^2)."""
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        return (rnd_normal * self.P_std + self.P_mean).exp()

    def loss_weight(self, sigma):
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2


@persistence.persistent_class
class EDMLoss(_LogNormalSigma):
    """EDM loss: log-normal p(sigma), lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM Table 1)."""

    def __init__(self,
        P_mean      = -1.2,     # Mean of log sigma.
        P_std       = 1.2,      # Standard deviation of log sigma.
        sigma_data  = 0.5,      # Expected standard deviation of the training data.
    ):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data


@persistence.persistent_class
class EDM2Loss(_LogNormalSigma):
    """EDM2 loss with learned uncertainty u(sigma): lambda/e^u ||D - y||^2 + u (EDM2 Eq. 21)."""

    def __init__(self,
        P_mean      = -0.4,     # Mean of log sigma.
        P_std       = 1.0,      # Standard deviation of log sigma.
        sigma_data  = 0.5,      # Expected standard deviation of the training data.
    ):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        """Per-element loss [N, C, H, W]; EDM2 trains without augmentation."""
        if augment_pipe is not None:
            raise ValueError('EDM2Loss does not support an augmentation pipeline; use --augment=0')
        return self.denoising_loss(net, images, labels)

    def weighted_error(self, net, noisy, sigma, labels, augment_labels, target, weight):
        """(lambda(sigma) / e^u(sigma)) (D - target)^2 + u(sigma) (EDM2 Eq. 21)."""
        denoised, logvar = net(noisy, sigma, labels, return_logvar=True)
        target = target() if callable(target) else target
        return (weight / logvar.exp()) * ((denoised - target) ** 2) + logvar

#----------------------------------------------------------------------------
# Stable Target Field.


def stf_target(noisy: torch.Tensor, sigma: torch.Tensor, ref_images: torch.Tensor,
               valid: torch.Tensor | None = None) -> torch.Tensor:
    """Posterior-weighted mean of reference images, sum_j softmax_j(-||x - y_j||^2 / 2 sigma^2) y_j (STF Eq. 4).

    noisy [B, ...], sigma broadcastable to [B, 1, ...], ref_images [R, ...];
    valid [B, R] (bool) masks out references, e.g. those of another class.
    The pairwise distances use ||a||^2 - 2 a.b + ||b||^2, so memory is O(B R + R D).
    """
    B, R = noisy.shape[0], ref_images.shape[0]
    dtype = torch.promote_types(noisy.dtype, torch.float32)
    # The expanded distance cancels catastrophically in low precision: keep it out of bf16 autocast.
    with torch.autocast(device_type=noisy.device.type, enabled=False):
        x = noisy.reshape(B, -1).to(dtype)
        refs = ref_images.reshape(R, -1).to(dtype)
        sq_dist = x.square().sum(1, keepdim=True) - 2 * (x @ refs.t()) + refs.square().sum(1)[None, :]
        logits = -sq_dist.clamp(min=0) / (2 * sigma.reshape(B, 1).to(dtype) ** 2)
        if valid is not None:
            logits = logits.masked_fill(~valid, -np.inf)
        weights = torch.softmax(logits, dim=1)
        return (weights @ refs).reshape(noisy.shape).to(noisy.dtype)


_STF_BASES = {
    'vp':   VPLoss,
    've':   VELoss,
    'edm':  EDMLoss,
    'edm2': EDM2Loss,
}


@persistence.persistent_class
class STFLoss:
    """Stable Target Field: regress onto the posterior mean over a reference batch (Xu et al. 2023, Eq. 4-5).

    The reference batch is the (augmented) training batch itself followed by
    `ref_images`, further images drawn from the dataset by the training loop; like the
    training batch they pass through the augmentation pipe (one call after the network's,
    as in the STF fork's EDMLoss; their augmentation labels are dropped).
    Sigma sampling and loss weighting come from the wrapped base loss, so any
    preconditioning works. With only the image itself as reference the target is
    the clean image and the loss equals the base loss.
    """

    def __init__(self,
        base        = 'edm',    # Wrapped loss: 'vp', 've', 'edm' or 'edm2'.
        rbatch      = 4096,     # Reference batch size per GPU, training images included (recorded; the loop draws them).
        **base_kwargs,          # Arguments of the wrapped loss (e.g. P_mean, P_std, sigma_data).
    ):
        if base not in _STF_BASES:
            raise ValueError(f'STFLoss base={base!r} is not one of {sorted(_STF_BASES)}')
        self.base = base
        self.rbatch = int(rbatch)
        self.base_loss = _STF_BASES[base](**base_kwargs)

    def __call__(self, net, images, labels=None, augment_pipe=None, ref_images=None, ref_labels=None):
        """Per-element loss [N, C, H, W] with the STF target."""
        def target_fn(noisy, clean, sigma):
            refs, valid = clean, None
            if ref_images is not None and ref_images.shape[0] > 0:
                extra = augment_pipe(ref_images)[0] if augment_pipe is not None else ref_images
                refs = torch.cat([clean, extra.to(clean.dtype)])
            if labels is not None and labels.ndim == 2 and labels.shape[1] > 0:
                if refs is not clean and ref_labels is None:
                    raise ValueError('STFLoss: conditional training needs ref_labels along with ref_images')
                all_labels = labels if refs is clean else torch.cat([labels, ref_labels.to(labels.dtype)])
                valid = (labels[:, None, :] == all_labels[None, :, :]).all(dim=2)
            return stf_target(noisy.detach(), sigma, refs.detach(), valid)
        if isinstance(self.base_loss, EDM2Loss) and augment_pipe is not None:
            raise ValueError('EDM2Loss does not support an augmentation pipeline; use --augment=0')
        return self.base_loss.denoising_loss(net, images, labels, augment_pipe, target_fn=target_fn)

#----------------------------------------------------------------------------
# The CIFAR EDM2 reimplementation (FutureXiang/edm2 model/EDM.py, train.py).


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image horizontally with probability 1/2 (torchvision RandomHorizontalFlip)."""
    flip = torch.rand([images.shape[0], 1, 1, 1], generator=generator, device=images.device) < 0.5
    return torch.where(flip, images.flip(3), images)


@persistence.persistent_class
class CifarEDM2Loss(EDM2Loss):
    """Random x-flip, then the learned-uncertainty loss (EDM2 Eq. 21) averaged over C, H, W per image (EDM.forward)."""

    def __init__(self,
        P_mean      = -1.2,     # Mean of ln(sigma).
        P_std       = 1.2,      # Standard deviation of ln(sigma).
        sigma_data  = 0.5,      # Expected standard deviation of the training data.
        flip        = True,     # RandomHorizontalFlip of the reference's data transform.
    ):
        super().__init__(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)
        self.flip = flip

    def __call__(self, net, images, labels=None, augment_pipe=None):
        """Per-image loss [N]; the training loop's sum / N is then the reference's mean over all elements."""
        if self.flip:
            images = random_flip(images)
        return super().__call__(net, images, labels, augment_pipe).mean(dim=(1, 2, 3))
