"""Original vs diffusers: the UNet forward and the VAE decode on the same weights.

    python benchmarks/unet.py                          # sd15 shapes, latents 2x4x16x16, CPU
    python benchmarks/unet.py --file community         # the zoo file as fp16 without metadata
    python benchmarks/unet.py --device cuda --dtype fp16 --latent 64 --batch 1 8
    python benchmarks/unet.py --quick                  # tiny model, a few rounds

Both backends load the same single file through their own loaders (``OriginalBackend.load``,
``DiffusersBackend.load`` = ``from_single_file``), as a scenario cell would; then, interleaved,
one UNet forward each on identical inputs (CFG's doubled batch, the text context of the
prompt) and one VAE decode each. The ratio is diffusers time / original time, so above 1 the
original is faster; the target is ≥ 1 / 1.05 = 0.952. ``--profile`` prints a
``torch.profiler`` table of each side's top operators (by self time).
"""

from __future__ import annotations

from typing import Any

from _common import Ratio, interleave, parser, print_ratios, setup_threads, timed, write_json
from files import FILES, model_file


def load_both(model: str, source: str, device_name: str, dtype: str) -> tuple[Any, Any]:
    """The original and the diffusers session of ``model`` in ``source`` (same weights)."""
    from overhead import make_cell

    from backends import get_backend
    from harness.execute import resolve_device
    from models import resolve

    device = resolve_device(device_name)
    assert device is not None, f"no {device_name} device here"
    sessions = []
    for backend in ("original", "diffusers"):
        cell = make_cell(backend, model, source, 64, 1, 1, device_name, 1)
        if dtype != cell.dtype:
            import dataclasses

            cell = dataclasses.replace(cell, dtype=dtype)
        adapter = get_backend(backend)
        adapter.imports()
        sessions.append(adapter.load(cell, resolve(cell.model, cell.source), device))
    return sessions[0], sessions[1]


def modules(original: Any, diffusers: Any) -> dict[str, tuple[Any, Any]]:
    """(original, diffusers) callables per benchmarked part, each taking the shared inputs."""
    unet_o = original.ldm.unet
    unet_d = diffusers.pipe.unet
    vae_o = original.ldm.first_stage_model
    vae_d = diffusers.pipe.vae
    return {
        "unet": (lambda x, t, c: unet_o(x, t, c),
                 lambda x, t, c: unet_d(x, t, encoder_hidden_states=c, return_dict=False)[0]),
        "vae decode": (lambda z: vae_o.decode(z), lambda z: vae_d.decode(z, return_dict=False)[0]),
    }


def inputs(original: Any, batch: int, latent: int, device: Any) -> dict[str, tuple[Any, ...]]:
    import torch

    unet = original.ldm.unet
    dtype = unet.dtype
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, unet.config.in_channels, latent, latent, generator=generator)
    context = original.ldm.cond_stage_model(["a photograph of an astronaut riding a horse"] * 2
                                            * batch)
    t = torch.full((2 * batch,), 500.0)
    z = torch.randn(batch, original.latent_channels, latent, latent, generator=generator)
    move = {"device": device, "dtype": dtype}
    return {
        "unet": (x.to(**move), t.to(device), context.to(**move)),
        "vae decode": (z.to(**move),),
    }


def profile_table(fn: Any, args: tuple[Any, ...], rows: int = 12) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with torch.no_grad():
        fn(*args)
        with profile(activities=activities) as prof:
            fn(*args)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return str(prof.key_averages().table(sort_by=key, row_limit=rows))


def measure(model: str, file: str, batch: int, latent: int, device_name: str, dtype: str,
            rounds: int, repeats: int, profile: bool) -> list[Ratio]:
    import torch

    from harness.measure import synchronize

    path = model_file(model, file)
    original, diffusers = load_both(str(path) if file != "zoo" else model,
                                    "safetensors", device_name, dtype)
    device = original.device
    args = inputs(original, batch, latent, device)
    out: list[Ratio] = []
    for part, (fn_o, fn_d) in modules(original, diffusers).items():

        def run(fn: Any, part: str = part) -> float:
            def once() -> None:
                fn(*args[part])
                synchronize(device)

            with torch.no_grad():
                once()
                return timed(once, repeats)

        ratio = interleave(
            f"{part} {model} ({file} file, {dtype}) b{batch} latent {latent}",
            ("original", lambda fn=fn_o: run(fn)), ("diffusers", lambda fn=fn_d: run(fn)),
            rounds, unit=" s", higher_is_better=False,
        )
        out.append(ratio)
        print(ratio.line(), flush=True)
        if profile:
            for name, fn in (("original", fn_o), ("diffusers", fn_d)):
                print(f"## {part}, {name}: top operators by self time")
                print(profile_table(fn, args[part]))
    return out


def main(argv: list[str] | None = None) -> int:
    args_parser = parser(__doc__.splitlines()[0])
    args_parser.add_argument("--model", default=None,
                             help="zoo model (default sd15; tiny with --quick)")
    args_parser.add_argument("--file", choices=sorted(FILES), nargs="+", default=None,
                             help="default: both (zoo only with --quick: the tiny model's "
                                  "shapes are not recognisable without metadata)")
    args_parser.add_argument("--dtype", default="fp32")
    args_parser.add_argument("--batch", type=int, nargs="+", default=[1])
    args_parser.add_argument("--latent", type=int, default=16, help="latent side (pixels / 8)")
    args_parser.add_argument("--repeats", type=int, default=3)
    args_parser.add_argument("--profile", action="store_true")
    args = args_parser.parse_args(argv)
    setup_threads(args.threads)
    model = args.model or ("tiny" if args.quick else "sd15")
    files = args.file or (["zoo"] if args.quick else ["community", "zoo"])
    rounds = args.rounds or (2 if args.quick else 6)
    ratios = []
    for file in files:
        for batch in args.batch:
            ratios += measure(model, file, batch, args.latent, args.device, args.dtype, rounds,
                              args.repeats, args.profile)
    print_ratios("diffusers time / original time (above 1: the original is faster)", ratios)
    write_json(args.json, [ratio.to_dict() for ratio in ratios])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
