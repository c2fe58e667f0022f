"""A head side 15% slower per denoising step: the UNet forward is followed by a busy wait
of 0.15x its own time (a code difference, not a flag)."""
import time

import diffusers.models.unets.unet_2d_condition as unet_module

_forward = unet_module.UNet2DConditionModel.forward


def _slow_forward(self, *args, **kwargs):
    start = time.perf_counter()
    out = _forward(self, *args, **kwargs)
    spent = time.perf_counter() - start
    end = time.perf_counter() + 0.15 * spent
    while time.perf_counter() < end:
        pass
    return out


unet_module.UNet2DConditionModel.forward = _slow_forward
