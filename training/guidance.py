"""Guidance with both networks in one call (Autoguidance Eq. 1, batched).

When the main and the guiding network share an architecture (autoguidance with an earlier
snapshot, or CFG with the same net trained with label dropout), their weights can be stacked
once and the shared network code vmapped over the stack: every layer then runs one kernel for
both networks instead of two. Same numbers as evaluating them separately.
"""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call, stack_module_state, vmap


NET_ATTRIBUTES = ('img_resolution', 'img_channels', 'label_dim', 'sigma_min', 'sigma_max', 'round_sigma')


def expose_net_attributes(wrapper: torch.nn.Module, net: torch.nn.Module) -> None:
    """Give a wrapper the attributes samplers read from a net (resolution, channels, labels, sigma range)."""
    for attr in NET_ATTRIBUTES:
        if hasattr(net, attr):
            setattr(wrapper, attr, getattr(net, attr))


def same_architecture(net: torch.nn.Module, gnet: torch.nn.Module) -> bool:
    """True when the two networks have the same class, constructor arguments and tensor shapes."""
    if type(net) is not type(gnet) or getattr(net, 'init_kwargs', None) != getattr(gnet, 'init_kwargs', None):
        return False
    shapes = lambda m: [(k, v.shape, v.dtype) for k, v in m.state_dict().items()]
    return shapes(net) == shapes(gnet)


class BatchedGuidance(torch.nn.Module):
    """D_w = D_0 + w (D_1 - D_0) (Autoguidance Eq. 1), D_1 = net and D_0 = gnet in one vmapped call.

    Inference only: the weights are frozen copies taken at construction. Exposes the attributes
    samplers read from a net (resolution, channels, label_dim, sigma range, round_sigma).
    """

    def __init__(self, net: torch.nn.Module, gnet: torch.nn.Module, guidance: float):
        super().__init__()
        if not same_architecture(net, gnet):
            raise ValueError('batched guidance needs net and gnet of the same architecture; call them separately')
        nets = [m.eval().to(memory_format=torch.contiguous_format) for m in (net, gnet)]  # vmap: no channels-last
        params, buffers = stack_module_state(nets)
        # Contiguous: vmap cannot query channels-last strides, which a converted net may have.
        self.params = {k: v.detach().contiguous() for k, v in params.items()}
        self.buffers_ = {k: v.detach().contiguous() for k, v in buffers.items()}
        base = copy.deepcopy(net).to('meta').to(memory_format=torch.contiguous_format)
        self.base = [base]  # a list keeps it out of this module's children
        self.guidance = guidance
        expose_net_attributes(self, net)

    def _apply(self, fn, recurse=True):
        self.params = {k: fn(v) for k, v in self.params.items()}
        self.buffers_ = {k: fn(v) for k, v in self.buffers_.items()}
        return super()._apply(fn, recurse)

    def forward(self, x, sigma, labels=None):
        call = lambda params, buffers: functional_call(self.base[0], (params, buffers), (x, sigma, labels))
        denoised, guide = vmap(call)(self.params, self.buffers_).unbind(0)
        return guide.lerp(denoised, self.guidance)


class OverlappedGuidance(torch.nn.Module):
    """D_w = D_0 + w (D_1 - D_0) (Autoguidance Eq. 1) with gnet on a side CUDA stream, overlapping net.

    For networks of different architectures (e.g. EDM2-XXL guided by EDM2-XS), where stacking is not
    possible. Off CUDA the two calls simply run one after the other; the numbers are the same.
    """

    def __init__(self, net: torch.nn.Module, gnet: torch.nn.Module, guidance: float):
        super().__init__()
        self.net, self.gnet, self.guidance = net, gnet, guidance
        self._streams = {}
        expose_net_attributes(self, net)

    def forward(self, x, sigma, labels=None):
        if x.device.type != 'cuda':
            return self.gnet(x, sigma, labels).lerp(self.net(x, sigma, labels), self.guidance)
        main = torch.cuda.current_stream(x.device)
        side = self._streams.setdefault(x.device, torch.cuda.Stream(x.device))
        side.wait_stream(main)  # inputs are ready before gnet reads them
        with torch.cuda.stream(side):
            guide = self.gnet(x, sigma, labels)
        denoised = self.net(x, sigma, labels)
        main.wait_stream(side)
        guide.record_stream(main)  # the allocator must not reuse its memory before main is done with it
        return guide.lerp(denoised, self.guidance)
