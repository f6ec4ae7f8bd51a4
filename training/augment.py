"""Non-leaking augmentation pipeline of EDM (Karras et al. 2022, Appendix F.2).

The transformations and their parametrisation follow the ADA pipeline of
"Training Generative Adversarial Networks with Limited Data" (Karras et al. 2020);
every applied transformation is also returned as a conditioning vector
(`augment_labels`) so that the denoiser can learn not to reproduce it. Random
draws are made in the same order, with the same shapes, as the reference
implementation, so a seeded call augments identically.
"""

import numpy as np
import torch

from torch_utils import misc, persistence

# Low-pass filter used to resample during geometric transformations
# (symlet-6 wavelet, 12 taps).
SYM6 = [
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
]

#----------------------------------------------------------------------------
# Homogeneous transformation matrices. Entries are Python numbers or tensors of
# one common shape S; the result has shape S + [rows, cols].


def matrix(*rows, device=None) -> torch.Tensor:
    """Stack scalars and per-sample tensors into a (batched) matrix."""
    tensors = [x for row in rows for x in row if isinstance(x, torch.Tensor)]
    if not tensors:
        return misc.constant(np.asarray(rows), dtype=torch.float32, device=device)  # cached: no upload per call
    ref = tensors[0]
    elems = [x if isinstance(x, torch.Tensor) else torch.full_like(ref, x, dtype=torch.float32)
             for row in rows for x in row]
    elems = [x.to(torch.float32) for x in elems]
    return torch.stack(elems, dim=-1).reshape(ref.shape + (len(rows), -1))


def translate2d(tx, ty, **kwargs):
    """2D translation by (tx, ty)."""
    return matrix([1, 0, tx], [0, 1, ty], [0, 0, 1], **kwargs)


def translate3d(tx, ty, tz, **kwargs):
    """3D translation, used on RGB colour vectors."""
    return matrix([1, 0, 0, tx], [0, 1, 0, ty], [0, 0, 1, tz], [0, 0, 0, 1], **kwargs)


def scale2d(sx, sy, **kwargs):
    """2D axis-aligned scaling."""
    return matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1], **kwargs)


def scale3d(sx, sy, sz, **kwargs):
    """3D axis-aligned scaling, used on RGB colour vectors."""
    return matrix([sx, 0, 0, 0], [0, sy, 0, 0], [0, 0, sz, 0], [0, 0, 0, 1], **kwargs)


def rotate2d(theta, **kwargs):
    """2D rotation by theta radians."""
    cos = torch.cos(theta)
    return matrix([cos, torch.sin(-theta), 0], [torch.sin(theta), cos, 0], [0, 0, 1], **kwargs)


def rotate3d(axis, theta, **kwargs):
    """3D rotation by theta around a unit axis (Rodrigues' formula)."""
    ax, ay, az = axis[..., 0], axis[..., 1], axis[..., 2]
    s, c = torch.sin(theta), torch.cos(theta)
    cc = 1 - c
    return matrix(
        [ax * ax * cc + c,      ax * ay * cc - az * s, ax * az * cc + ay * s, 0],
        [ay * ax * cc + az * s, ay * ay * cc + c,      ay * az * cc - ax * s, 0],
        [az * ax * cc - ay * s, az * ay * cc + ax * s, az * az * cc + c,      0],
        [0, 0, 0, 1], **kwargs)


def translate2d_inv(tx, ty, **kwargs):
    """Inverse of translate2d."""
    return translate2d(-tx, -ty, **kwargs)


def scale2d_inv(sx, sy, **kwargs):
    """Inverse of scale2d."""
    return scale2d(1 / sx, 1 / sy, **kwargs)


def rotate2d_inv(theta, **kwargs):
    """Inverse of rotate2d."""
    return rotate2d(-theta, **kwargs)


def _gate(value, prob, shape, device):
    """Keep `value` where a uniform draw falls below `prob`, else zero (one rand draw)."""
    return torch.where(torch.rand(shape, device=device) < prob, value, torch.zeros_like(value))

#----------------------------------------------------------------------------


@persistence.persistent_class
class AugmentPipe:
    """EDM augmentation pipeline returning (images, augment_labels) (EDM Appendix F.2).

    All transformations are off by default; a probability multiplier of 1 enables one,
    and it then fires with probability `p * multiplier` per image.
    """

    def __init__(self,
        p                   = 1,        # Overall multiplier for the augmentation probability.
        xflip               = 0,        # Probability multiplier for x-flip.
        yflip               = 0,        # Probability multiplier for y-flip.
        rotate_int          = 0,        # Probability multiplier for rotation by multiples of 90 degrees.
        translate_int       = 0,        # Probability multiplier for integer translation.
        translate_int_max   = 0.125,    # Range of integer translation, relative to image size.
        scale               = 0,        # Probability multiplier for isotropic scaling.
        rotate_frac         = 0,        # Probability multiplier for arbitrary rotation.
        aniso               = 0,        # Probability multiplier for anisotropic scaling.
        translate_frac      = 0,        # Probability multiplier for fractional translation.
        scale_std           = 0.2,      # Log2 standard deviation of isotropic scaling.
        rotate_frac_max     = 1,        # Range of arbitrary rotation, 1 = full circle.
        aniso_std           = 0.2,      # Log2 standard deviation of anisotropic scaling.
        aniso_rotate_prob   = 0.5,      # Probability of scaling along a rotated frame.
        translate_frac_std  = 0.125,    # Standard deviation of fractional translation, relative to size.
        brightness          = 0,        # Probability multiplier for brightness.
        contrast            = 0,        # Probability multiplier for contrast.
        lumaflip            = 0,        # Probability multiplier for luma flip.
        hue                 = 0,        # Probability multiplier for hue rotation.
        saturation          = 0,        # Probability multiplier for saturation.
        brightness_std      = 0.2,      # Standard deviation of brightness.
        contrast_std        = 0.5,      # Log2 standard deviation of contrast.
        hue_max             = 1,        # Range of hue rotation, 1 = full circle.
        saturation_std      = 1,        # Log2 standard deviation of saturation.
    ):
        super().__init__()
        args = dict(locals())
        for name, value in args.items():
            if name not in ('self', '__class__'):
                setattr(self, name, float(value))

    def __call__(self, images: torch.Tensor):
        """Augment a batch [N, C, H, W]; returns (images, labels [N, augment_dim])."""
        N = images.shape[0]
        labels = [torch.zeros([N, 0], device=images.device)]
        images = self._blit(images, labels)
        G_inv = self._geometric_params(images, labels)
        if G_inv is not None:
            images = self._apply_geometric(images, G_inv)
        M = self._color_params(images, labels)
        if M is not None:
            images = self._apply_color(images, M)
        labels = torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)
        return images, labels

    def _blit(self, images, labels):
        """Pixel blitting: flips, 90-degree rotations, integer translation with mirroring."""
        N, C, H, W = images.shape
        device = images.device
        if self.xflip > 0:
            w = _gate(torch.randint(2, [N, 1, 1, 1], device=device), self.xflip * self.p, [N, 1, 1, 1], device)
            images = torch.where(w == 1, images.flip(3), images)
            labels.append(w)
        if self.yflip > 0:
            w = _gate(torch.randint(2, [N, 1, 1, 1], device=device), self.yflip * self.p, [N, 1, 1, 1], device)
            images = torch.where(w == 1, images.flip(2), images)
            labels.append(w)
        if self.rotate_int > 0:
            w = _gate(torch.randint(4, [N, 1, 1, 1], device=device), self.rotate_int * self.p, [N, 1, 1, 1], device)
            images = torch.where((w == 1) | (w == 2), images.flip(3), images)
            images = torch.where((w == 2) | (w == 3), images.flip(2), images)
            images = torch.where((w == 1) | (w == 3), images.transpose(2, 3), images)
            labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
        if self.translate_int > 0:
            w = torch.rand([2, N, 1, 1, 1], device=device) * 2 - 1
            w = _gate(w, self.translate_int * self.p, [1, N, 1, 1, 1], device)
            tx = w[0].mul(W * self.translate_int_max).round().to(torch.int64)
            ty = w[1].mul(H * self.translate_int_max).round().to(torch.int64)
            b, c, y, x = torch.meshgrid(*(torch.arange(n, device=device) for n in images.shape), indexing='ij')
            # Mirror-reflect the source coordinates at the image borders.
            x = W - 1 - (W - 1 - (x - tx) % (W * 2 - 2)).abs()
            y = H - 1 - (H - 1 - (y + ty) % (H * 2 - 2)).abs()
            images = images.flatten()[(((b * C) + c) * H + y) * W + x]
            labels += [tx.div(W * self.translate_int_max), ty.div(H * self.translate_int_max)]
        return images

    def _geometric_params(self, images, labels):
        """Draw the inverse geometric transform G_inv [N, 3, 3]; None if all are disabled."""
        N, _C, H, W = images.shape
        device = images.device
        G_inv = None
        def compose(m):
            return m if G_inv is None else G_inv @ m
        if self.scale > 0:
            w = _gate(torch.randn([N], device=device), self.scale * self.p, [N], device)
            s = w.mul(self.scale_std).exp2()
            G_inv = compose(scale2d_inv(s, s))
            labels.append(w)
        if self.rotate_frac > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.rotate_frac_max)
            w = _gate(w, self.rotate_frac * self.p, [N], device)
            G_inv = compose(rotate2d_inv(-w))
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w = torch.randn([N], device=device)
            r = (torch.rand([N], device=device) * 2 - 1) * np.pi
            w = _gate(w, self.aniso * self.p, [N], device)
            r = _gate(r, self.aniso_rotate_prob, [N], device)
            s = w.mul(self.aniso_std).exp2()
            G_inv = compose(rotate2d_inv(r) @ scale2d_inv(s, 1 / s) @ rotate2d_inv(-r))
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            w = _gate(torch.randn([2, N], device=device), self.translate_frac * self.p, [1, N], device)
            G_inv = compose(translate2d_inv(w[0].mul(W * self.translate_frac_std), w[1].mul(H * self.translate_frac_std)))
            labels += [w[0], w[1]]
        return G_inv

    def _apply_geometric(self, images, G_inv):
        """Resample through G_inv: reflect-pad, 2x upsample, bilinear warp, 2x downsample."""
        N, C, H, W = images.shape
        device = images.device
        Hz = np.asarray(SYM6, dtype=np.float32)
        Hz_pad = len(Hz) // 4

        # Pad just enough that the warped image corners stay inside the padded image.
        cx, cy = (W - 1) / 2, (H - 1) / 2
        corners = matrix([-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1], device=device)
        corners = G_inv @ corners.t()                               # [N, xyz, corner]
        margin = corners[:, :2, :].permute(1, 0, 2).flatten(1)      # [xy, N * corner]
        margin = torch.cat([-margin, margin]).max(dim=1).values     # [x0, y0, x1, y1]
        margin = margin + misc.constant([Hz_pad * 2 - cx, Hz_pad * 2 - cy] * 2, dtype=torch.float32, device=device)
        margin = margin.clamp(min=torch.zeros(4, device=device), max=misc.constant([W - 1, H - 1] * 2, dtype=torch.float32, device=device))
        mx0, my0, mx1, my1 = (int(v) for v in margin.ceil().to(torch.int32))
        images = torch.nn.functional.pad(input=images, pad=[mx0, mx1, my0, my1], mode='reflect')
        G_inv = translate2d((mx0 - mx1) / 2, (my0 - my1) / 2, device=device) @ G_inv

        # Upsample 2x with the low-pass filter (zero-stuffing, then separable convolution).
        up = misc.constant(Hz[::-1], dtype=images.dtype, device=device)[None, None, :].tile([C, 1, 1])
        pad = (len(Hz) + 1) // 2
        images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(N, C, images.shape[2], -1)[:, :, :, :-1]
        images = torch.nn.functional.conv2d(images, up.unsqueeze(2), groups=C, padding=[0, pad])
        images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(N, C, -1, images.shape[3])[:, :, :-1, :]
        images = torch.nn.functional.conv2d(images, up.unsqueeze(3), groups=C, padding=[pad, 0])
        G_inv = scale2d(2, 2, device=device) @ G_inv @ scale2d_inv(2, 2, device=device)
        G_inv = translate2d(-0.5, -0.5, device=device) @ G_inv @ translate2d_inv(-0.5, -0.5, device=device)

        # Warp in normalised coordinates.
        shape = [N, C, (H + Hz_pad * 2) * 2, (W + Hz_pad * 2) * 2]
        G_inv = scale2d(2 / images.shape[3], 2 / images.shape[2], device=device) @ G_inv @ scale2d_inv(2 / shape[3], 2 / shape[2], device=device)
        grid = torch.nn.functional.affine_grid(theta=G_inv[:, :2, :], size=shape, align_corners=False)
        images = torch.nn.functional.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)

        # Downsample 2x with the same filter and crop the padding.
        down = misc.constant(Hz, dtype=images.dtype, device=device)[None, None, :].tile([C, 1, 1])
        pad = (len(Hz) - 1) // 2
        images = torch.nn.functional.conv2d(images, down.unsqueeze(2), groups=C, stride=[1, 2], padding=[0, pad])[:, :, :, Hz_pad:-Hz_pad]
        images = torch.nn.functional.conv2d(images, down.unsqueeze(3), groups=C, stride=[2, 1], padding=[pad, 0])[:, :, Hz_pad:-Hz_pad, :]
        return images

    def _color_params(self, images, labels):
        """Draw the colour transform M [N, 4, 4]; None if all are disabled."""
        N = images.shape[0]
        device = images.device
        I_4 = torch.eye(4, device=device)
        luma = misc.constant(np.asarray([1, 1, 1, 0]) / np.sqrt(3), dtype=torch.float32, device=device)
        luma_outer = luma.outer(luma)
        M = None
        def compose(m):
            return m if M is None else m @ M
        if self.brightness > 0:
            w = _gate(torch.randn([N], device=device), self.brightness * self.p, [N], device)
            b = w * self.brightness_std
            M = compose(translate3d(b, b, b))
            labels.append(w)
        if self.contrast > 0:
            w = _gate(torch.randn([N], device=device), self.contrast * self.p, [N], device)
            c = w.mul(self.contrast_std).exp2()
            M = compose(scale3d(c, c, c))
            labels.append(w)
        if self.lumaflip > 0:
            w = _gate(torch.randint(2, [N, 1, 1], device=device), self.lumaflip * self.p, [N, 1, 1], device)
            M = compose(I_4 - 2 * luma_outer * w)
            labels.append(w)
        if self.hue > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.hue_max)
            w = _gate(w, self.hue * self.p, [N], device)
            M = compose(rotate3d(luma, w))
            labels += [w.cos() - 1, w.sin()]
        if self.saturation > 0:
            w = _gate(torch.randn([N, 1, 1], device=device), self.saturation * self.p, [N, 1, 1], device)
            M = compose(luma_outer + (I_4 - luma_outer) * w.mul(self.saturation_std).exp2())
            labels.append(w)
        return M

    def _apply_color(self, images, M):
        """Apply the affine colour transform M to RGB (or, averaged, to L) images."""
        N, C, H, W = images.shape
        images = images.reshape([N, C, H * W])
        if C == 3:
            images = M[:, :3, :3] @ images + M[:, :3, 3:]
        elif C == 1:
            M = M[:, :3, :].mean(dim=1, keepdim=True)
            images = images * M[:, :, :3].sum(dim=2, keepdim=True) + M[:, :, 3:]
        else:
            raise ValueError(f'AugmentPipe colour transforms need RGB (3) or L (1) channels, got {C}')
        return images.reshape([N, C, H, W])
