"""k-diffusion style samplers and sigma schedules of the original backend.

Every sampler is a plain function with one signature (k-diffusion's ``sampling.py``):

    sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None)

``model(x, sigma_batch, **extra_args)`` is a denoiser (:class:`~.denoiser.CFGDenoiser`),
``x`` the initial latent already scaled by ``sigmas[0]`` (``noise * sigmas[0]``),
``sigmas`` a decreasing schedule, usually ending in 0. ``callback`` receives
``{"x", "i", "sigma", "sigma_hat", "denoised"}`` once per step (our step timer);
``disable`` (a progress bar switch in k-diffusion) is accepted and ignored. Unlike
k-diffusion, the noise of ancestral and SDE samplers comes from ``generator`` (a CPU
``torch.Generator``), never from torch's global RNG. Samplers run under ``torch.no_grad``.

Schedules (:func:`build_sigmas`): A1111's default is the discrete model's own
``get_sigmas(steps)`` (timesteps 999 -> 0 evenly spaced, log-sigma interpolated); ``_karras``
uses Karras et al. (2022) with ``sigma_min``/``sigma_max`` of the model's sigmas and rho 7.
As in A1111, ``dpm_2`` and ``dpm_2_a`` compute ``steps + 1`` sigmas and drop the one before
the final 0 (``discard_next_to_last_sigma``). ``ddim`` uses CompVis' uniform DDIM timesteps.

Scenario name -> this module's function -> the matching diffusers scheduler (what the
diffusers backend should configure to compare like with like; ``*_karras`` adds
``use_karras_sigmas=True``):

================  ==========================  ===============================================
name              function                    diffusers
================  ==========================  ===============================================
euler             sample_euler                EulerDiscreteScheduler(timestep_spacing=
                                              "linspace") -- same sigmas exactly when
                                              999 / (steps - 1) is an integer (steps 4, 10,
                                              28, 38, ...); otherwise diffusers interpolates
                                              sigma linearly, k-diffusion log-linearly
                                              (differences ~1e-3 relative in sigma)
euler_a           sample_euler_ancestral      EulerAncestralDiscreteScheduler (other noise)
heun              sample_heun                 HeunDiscreteScheduler
dpm_2             sample_dpm_2                KDPM2DiscreteScheduler
dpm_2_a           sample_dpm_2_ancestral      KDPM2AncestralDiscreteScheduler (other noise)
lms               sample_lms                  LMSDiscreteScheduler
dpmpp_2m          sample_dpmpp_2m             DPMSolverMultistepScheduler(algorithm_type=
                                              "dpmsolver++", solver_order=2)
dpmpp_2s_a        sample_dpmpp_2s_ancestral   none exact; nearest DPMSolverSinglestepScheduler
                                              (solver_order=2) without the ancestral noise
dpmpp_sde         sample_dpmpp_sde            DPMSolverSDEScheduler (Brownian tree noise)
ddim              sample_ddim                 DDIMScheduler(timestep_spacing="leading",
                                              steps_offset=1, set_alpha_to_one=False)
deis, unipc       (not implemented)           DEISMultistepScheduler, UniPCMultistepScheduler
================  ==========================  ===============================================

Only ``euler`` is held to end-to-end parity; the others are deterministic for a seed and
follow k-diffusion's update rules, so their trajectories agree with diffusers only where the
noise and the sigma schedule agree too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch

from backends.original.denoiser import DiscreteEpsDenoiser, append_zero


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor: ...


Callback = Callable[[dict[str, Any]], None]
Sampler = Callable[..., torch.Tensor]
NoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Names whose noise schedule is ``steps + 1`` sigmas minus the next-to-last (A1111).
DISCARD_NEXT_TO_LAST: frozenset[str] = frozenset({"dpm_2", "dpm_2_a"})
#: Scenario sampler names this backend does not implement, with the reason.
NOT_IMPLEMENTED: dict[str, str] = {
    "deis": "DEIS is a diffusers scheduler; the original backend has no k-diffusion DEIS",
    "unipc": "UniPC is a diffusers scheduler; the original backend has no k-diffusion UniPC",
    "ddpm": "DDPM is a diffusers scheduler; the original backend has no k-diffusion DDPM",
}


# --- schedules -----------------------------------------------------------------------------


def get_sigmas_karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: Any = "cpu"
) -> torch.Tensor:
    """Karras et al. (2022) noise levels, ``n`` of them, then a final 0."""
    ramp = torch.linspace(0, 1, n, device=device)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas)


def ddim_sigmas(denoiser: DiscreteEpsDenoiser, steps: int) -> torch.Tensor:
    """CompVis DDIM "uniform" timesteps ``range(0, T, T // steps) + 1``, high to low, then
    timestep 0 (DDIM's last ``alpha_prev`` is ``alphas_cumprod[0]``, not 1)."""
    total = len(denoiser.sigmas)
    timesteps = torch.arange(0, total, total // steps)[:steps] + 1
    sigmas = denoiser.sigmas[timesteps.to(denoiser.sigmas.device)].flip(0)
    return torch.cat([sigmas, denoiser.sigmas[:1]])


def build_sigmas(
    denoiser: DiscreteEpsDenoiser, base: str, karras: bool, steps: int
) -> torch.Tensor:
    """The sigma schedule of sampler ``base`` (``_karras`` variant when ``karras``)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if base == "ddim":
        return ddim_sigmas(denoiser, steps)
    discard = base in DISCARD_NEXT_TO_LAST
    n = steps + 1 if discard else steps
    if karras:
        sigmas = get_sigmas_karras(
            n, denoiser.sigma_min.item(), denoiser.sigma_max.item(), device=denoiser.sigmas.device
        )
    else:
        sigmas = denoiser.get_sigmas(n)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


def img2img_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` an img2img pass at denoising ``strength`` runs: ``int(steps *
    strength)``, the last ones of the full schedule (A1111's ``t_enc``; diffusers'
    ``init_timestep``). A1111 clamps strength to 0.999 and runs ``t_enc + 1`` sigmas; here
    strength 0 runs nothing and 1 runs the whole schedule, so both backends agree."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return min(int(steps * strength), steps)


def truncate_sigmas(sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """The tail of a schedule that runs its last ``steps`` steps (``steps + 1`` sigmas)."""
    total = len(sigmas) - 1
    if not 0 <= steps <= total:
        raise ValueError(f"steps must be in [0, {total}], got {steps}")
    return sigmas[total - steps :]


# --- helpers -------------------------------------------------------------------------------


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative ``dx / dsigma``."""
    return (x - denoised) / sigma


def get_ancestral_step(
    sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step to ``sigma_to`` into a deterministic step down and fresh noise up."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    )
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        raise ValueError(
            "this sampler draws noise: pass generator=torch.Generator().manual_seed(...)"
        )
    return generator


def gaussian_noise(x: torch.Tensor, generator: torch.Generator | None) -> NoiseFn:
    """Fresh N(0, 1) noise shaped like ``x`` per call, drawn on the CPU from ``generator``."""
    gen = _generator(generator)

    def draw(_sigma: torch.Tensor, _sigma_next: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32, device="cpu")
        return noise.to(x.device, x.dtype)

    return draw


def brownian_noise(
    x: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None
) -> NoiseFn:
    """k-diffusion's ``BrownianTreeNoiseSampler`` seeded from ``generator``: the noise between
    two sigmas is a Brownian increment, normalised. Without torchsde, independent Gaussian
    draws (same distribution, other sample path)."""
    gen = _generator(generator)
    try:
        import torchsde
    except ImportError:
        return gaussian_noise(x, gen)
    positive = sigmas[sigmas > 0]
    t0, t1 = float(positive.min()), float(sigmas.max())
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    tree = torchsde.BrownianTree(t0, torch.zeros(x.shape, dtype=torch.float32), t1, entropy=seed)

    def draw(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        a, b = sorted((float(sigma), float(sigma_next)))
        sign = 1.0 if float(sigma) <= float(sigma_next) else -1.0
        w = tree(a, b) * sign / math.sqrt(abs(b - a))
        return w.to(x.device, x.dtype)

    return draw


def _report(callback: Callback | None, **info: Any) -> None:
    if callback is not None:
        callback(info)


# --- samplers ------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras Algorithm 2 without churn)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        _report(callback, x=x, i=i, sigma=sigmas[i], sigma_hat=sigmas[i], denoised=denoised)
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """Euler steps down to ``sigma_down``, then fresh noise up to the next sigma."""
    extra_args = extra_args or {}
    noise = gaussian_noise(x, generator)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, x=x, i=i, sigma=sigmas[i], sigma_hat=sigmas[i], denoised=denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_heun(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Heun's second-order method (Karras Algorithm 2); Euler for the last step to 0."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        _report(callback, x=x, i=i, sigma=sigmas[i], sigma_hat=sigmas[i], denoised=denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
        d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
        x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DPM-Solver-2 (Karras et al. variant): a midpoint in log-sigma."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        _report(callback, x=x, i=i, sigma=sigmas[i], sigma_hat=sigmas[i], denoised=denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
            continue
        sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigmas[i])
        denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
        x = x + to_d(x_2, sigma_mid, denoised_2) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver-2 down to ``sigma_down``, then fresh noise up to the next sigma."""
    extra_args = extra_args or {}
    noise = gaussian_noise(x, generator)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        _report(callback, x=x, i=i, sigma=sigmas[i], sigma_hat=sigmas[i], denoised=denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
            continue
        sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigmas[i])
        denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
        x = x + to_d(x_2, sigma_mid, denoised_2) * (sigma_down - sigmas[i])
        x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


def linear_multistep_coeff(order: int, t: Any, i: int, j: int) -> float:
    """Integral over ``[t[i], t[i+1]]`` of the ``j``-th Lagrange basis polynomial."""
    from scipy import integrate

    if order - 1 > i:
        raise ValueError(f"order {order} too high for step {i}")

    def basis(tau: float) -> float:
        product = 1.0
        for k in range(order):
            if j != k:
                product *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return product

    return float(integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0])


@torch.no_grad()
def sample_lms(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    order: int = 4,
) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth in sigma) over the last ``order`` derivatives."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    sigmas_cpu = sigmas.detach().cpu().double().numpy()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        ds = [*ds, to_d(x, sigmas[i], denoised)][-order:]
        _report(callback, x=x, i=i, sigma=sigmas[i], sigma_hat=sigmas[i], denoised=denoised)
        cur_order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds), strict=False))
    return x


def _t(sigma: torch.Tensor) -> torch.Tensor:
    """Log-SNR time ``t = -log sigma`` of DPM-Solver."""
    return sigma.log().neg()


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(2S) single-step down to ``sigma_down``, then fresh noise."""
    extra_args = extra_args or {}
    noise = gaussian_noise(x, generator)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, x=x, i=i, sigma=sigmas[i], sigma_hat=sigmas[i], denoised=denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma(s) / _sigma(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, _sigma(s) * s_in, **extra_args)
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
    r: float = 0.5,
) -> torch.Tensor:
    """DPM-Solver++ (stochastic, two stages per step) with Brownian-tree noise."""
    extra_args = extra_args or {}
    noise = brownian_noise(x, sigmas, generator)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x=x, i=i, sigma=sigmas[i], sigma_hat=sigmas[i], denoised=denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        # Stage 1: to the intermediate time s, with its share of the noise.
        sd, su = get_ancestral_step(_sigma(t), _sigma(s), eta)
        s_ = _t(sd)
        x_2 = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise(_sigma(t), _sigma(s)) * su
        denoised_2 = model(x_2, _sigma(s) * s_in, **extra_args)
        # Stage 2: the full step with the combined denoised estimate.
        sd, su = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
        t_next_ = _t(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise(_sigma(t), _sigma(t_next)) * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M): second order from the previous step's denoised estimate."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    old_denoised: torch.Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x=x, i=i, sigma=sigmas[i], sigma_hat=sigmas[i], denoised=denoised)
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - _t(sigmas[i - 1])
            ratio = h_last / h
            denoised_d = (1 + 1 / (2 * ratio)) * denoised - (1 / (2 * ratio)) * old_denoised
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_ddim(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    from_noise: bool = True,
) -> torch.Tensor:
    """Deterministic DDIM (eta 0) over :func:`ddim_sigmas`.

    DDIM's update ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps`` is exactly an Euler step
    in the VE variable ``x / sqrt(a)``. CompVis DDIM starts from ``x_T = noise`` (VP) and ends
    at ``alphas_cumprod[0]``: so the VE start is ``noise * sqrt(1 + sigma_T^2)`` (``x`` arrives
    as ``noise * sigma_T`` like every sampler's and is rescaled here) and the result is
    returned in VP form, as the original DDIM sampler returns it. With ``from_noise=False``
    (img2img) ``x`` is already a VE latent, ``init + noise * sigmas[0]`` (CompVis'
    ``stochastic_encode`` in the VE variable), and is not rescaled.
    """
    extra_args = extra_args or {}
    if from_noise:
        x = x / sigmas[0] * (1 + sigmas[0] ** 2) ** 0.5
    x = sample_euler(model, x, sigmas, extra_args, callback, disable, generator)
    return x / (1 + sigmas[-1] ** 2) ** 0.5


#: Scenario base name -> sampler function.
SAMPLERS: dict[str, Sampler] = {
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_a": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2s_a": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "ddim": sample_ddim,
}
