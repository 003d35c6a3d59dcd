#!/usr/bin/env python
"""What one training step costs, for several model configurations measured side by side.

At a fixed time budget the step cost decides how many iterations a model gets, so it matters as much as what a model
learns per iteration. A VM's speed can drift by a third from one hour to the next, so separate runs cannot compare
configurations; this builds them all in one process and times them in interleaved rounds (the order reversed every
other round), each round ``--steps`` full training steps of every configuration, and reports the median per step.

Configurations (any number; the MedSegDiff-V2 ones first, then the DynUNet ones, each in the order given; the first
is the reference of the ``relative`` column):

* ``--medsegdiff NAME CHANNELS [CONDITION_CHANNELS] [anchor=MODE] [semantic=MODE]``: MedSegDiff-V2 as the bundle
  trains it (``speed.py``'s ``training_step``: ``diffusion_forward`` with ``MedSegDiffLoss``, AdamW; channels-last on
  CPU), widths as comma lists, e.g. ``16,32,64,128``; ``anchor=`` / ``semantic=`` set the ablation switches of
  ``MedSegDiffV2`` (e.g. ``semantic=none`` for U-SA without the SS-Former); ``phase=condition`` times the step of
  the bundle's condition warm-up instead (``condition_warmup``: the condition UNet alone on its anchor loss).
  ``--layouts`` times each in several layouts (see ``LAYOUTS``), e.g. ``--layouts bundle channels-last``.
* ``--dynunet NAME BASE MAX``: ``benchmarks/quality.py``'s DynUNet baseline (nnU-Net-like topology for ``--size``,
  filters ``BASE`` doubling up to ``MAX``; DiceCE, AdamW, the default layout, as ``quality.py`` trains it).

Every step sees the same synthetic batch (``--batch`` RGB images at ``--size``², a binary mask); bf16 autocast where
the bundle turns it on (``engine.bf16_is_fast``), unless ``--precision`` says otherwise.

Example (2-core CPU, about 3 minutes)::

    python benchmarks/step_cost.py --medsegdiff small 16,32,64,128 \\
        --medsegdiff wide-condition 16,32,64,128 32,64,128,256 --dynunet dynunet 32 320
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from cpu_result import cpu_result, write_result  # also puts the repository root on sys.path


def widths(text: str) -> tuple[int, ...]:
    """``"16,32,64"`` -> ``(16, 32, 64)``, with an error that names the bad text."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return values


#: how ``--layouts`` lays a MedSegDiff-V2 network out: the bundle's way (``to_channels_last`` on CPU, which keeps the
#: plain condition UNet contiguous; nothing on CUDA), every 4-D weight channels-last (``Module.to``; the CPU layout up
#: to bundle 0.8.0), or all contiguous
LAYOUTS = ("bundle", "channels-last", "contiguous")


#: the ``MedSegDiffV2`` switches a ``--medsegdiff`` configuration may set as ``KEY=VALUE``, and the training phase
#: (``phase=joint``, the default, or ``phase=condition``, a condition warm-up step)
SWITCHES = ("anchor", "semantic", "phase")
PHASES = ("joint", "condition")


def medsegdiff_spec(spec: list[str]) -> tuple[tuple[int, ...], tuple[int, ...] | None, dict[str, str]]:
    """``[name, channels, condition_channels?, KEY=VALUE...]`` -> widths, condition widths (``None``: the same) and
    the switches (see :data:`SWITCHES`), with an ``argparse.ArgumentTypeError`` that names what is wrong."""
    sizes = [t for t in spec[1:] if "=" not in t]
    switches = dict(t.split("=", 1) for t in spec[1:] if "=" in t)
    if len(sizes) not in (1, 2):
        raise argparse.ArgumentTypeError(f"takes NAME CHANNELS [CONDITION_CHANNELS] [KEY=VALUE ...], got {spec}")
    unknown = sorted(set(switches) - set(SWITCHES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown switch(es) {unknown}; known: {list(SWITCHES)}")
    if switches.get("phase", "joint") not in PHASES:
        raise argparse.ArgumentTypeError(f"phase must be one of {list(PHASES)}, got {switches['phase']!r}")
    return widths(sizes[0]), widths(sizes[1]) if len(sizes) > 1 else None, switches


def medsegdiff_step(spec: list[str], image, label, amp: bool, layout: str = "bundle") -> tuple[Callable[[], None], int]:
    """A full MedSegDiff-V2 training step for ``[name, channels, condition_channels?, KEY=VALUE...]`` (see
    :func:`medsegdiff_spec`) in ``layout`` (one of :data:`LAYOUTS`), and its parameter count."""
    import torch
    from speed import training_step

    from medsegdiff_bundle.engine import to_channels_last
    from medsegdiff_bundle.networks import MedSegDiffV2

    channels, condition, switches = medsegdiff_spec(spec)
    condition_only = switches.pop("phase", "joint") == "condition"
    net = MedSegDiffV2(spatial_dims=2, in_channels=image.shape[1], num_classes=2, channels=channels,
                       condition_channels=condition, num_res_blocks=1, **switches).to(image.device).train()
    channels_last = layout == "channels-last" or (layout == "bundle" and image.device.type == "cpu")
    if layout == "channels-last":
        net.to(memory_format=torch.channels_last)
    elif channels_last:
        to_channels_last(net)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    step, _ = training_step(net, image, label, amp, condition_only=condition_only)  # the one speed.py times
    return step, sum(p.numel() for p in net.parameters())


def dynunet_step(spec: list[str], image, label, amp: bool) -> tuple[Callable[[], None], int]:
    """A DynUNet training step for ``[name, base, max]`` as ``quality.py`` trains it, and its parameter count."""
    import quality
    import torch
    from monai.losses import DiceCELoss

    base, top = int(spec[1]), int(spec[2])
    net = quality.make_dynunet(quality.dynunet_topology(image.shape[-1], top, base)).to(image.device).train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(net(image).float(), label)
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in net.parameters())


def interleaved_times(steps: dict[str, Callable[[], None]], rounds: int, per_round: int, warmup: int,
                      sync: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per step of each entry in every round; rounds alternate the order so drift does not favour one."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            sync()
            start = time.perf_counter()
            for _ in range(per_round):
                steps[name]()
            sync()
            times[name].append((time.perf_counter() - start) / per_round)
    return times


def print_table(runs: list[dict]) -> None:
    """One line per configuration: parameters, median seconds per step, relative to the first, every round."""
    width = max(24, *(len(run["name"]) + 2 for run in runs))
    print(f"{'configuration':<{width}}{'params M':>9}{'s / step':>10}{'relative':>10}  rounds")
    for run in runs:
        rounds = " ".join(f"{t:.3f}" for t in run["s_per_step_rounds"])
        print(f"{run['name']:<{width}}{run['parameters_m']:>9.2f}{run['s_per_step_median']:>10.3f}"
              f"{run['relative']:>10.2f}  {rounds}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--medsegdiff", nargs="+", action="append", default=[],
                   metavar="NAME CHANNELS [CONDITION] [KEY=VALUE]",
                   help="a MedSegDiff-V2 configuration (repeatable)")
    p.add_argument("--dynunet", nargs=3, action="append", default=[], metavar=("NAME", "BASE", "MAX"),
                   help="a DynUNet configuration (repeatable)")
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=["bundle"],
                   help="time every MedSegDiff-V2 configuration in each of these layouts (named NAME/LAYOUT when "
                        "more than one): bundle (channels-last on CPU, the plain condition UNet contiguous), "
                        "channels-last (every weight, the CPU layout up to bundle 0.8.0), contiguous")
    p.add_argument("--size", type=int, default=128, help="image size (square)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast where the bundle uses it (engine.bf16_is_fast)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default: print only)")
    args = p.parse_args(argv)
    for spec in args.medsegdiff:
        try:
            medsegdiff_spec(spec)
        except argparse.ArgumentTypeError as err:
            p.error(f"--medsegdiff {spec[0]}: {err}")
    for spec in args.dynunet:
        if not (spec[1].isdigit() and spec[2].isdigit() and min(int(spec[1]), int(spec[2])) > 0):
            p.error(f"--dynunet {spec[0]}: BASE and MAX must be positive integers, got {spec[1:]}")
    names = [s[0] for s in args.medsegdiff + args.dynunet]
    if not names:
        p.error("give at least one --medsegdiff or --dynunet configuration")
    if len(set(names)) != len(names):
        p.error(f"configuration names must differ, got {names}")
    if min(args.rounds, args.steps) < 1 or args.warmup < 0:
        p.error("--rounds and --steps must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    import torch

    from medsegdiff_bundle.engine import bf16_is_fast

    args = parse_args(argv)
    device = torch.device(args.device)
    amp = {"bf16": True, "fp32": False}.get(args.precision, bf16_is_fast(device))
    gen = torch.Generator().manual_seed(0)
    image = torch.randn((args.batch, 3, args.size, args.size), generator=gen).to(device)
    label = (torch.rand((args.batch, 1, args.size, args.size), generator=gen) > 0.7).long().to(device)
    layouts = list(dict.fromkeys(args.layouts))
    makers = [(f"{s[0]}/{layout}" if len(layouts) > 1 else s[0], s, partial(medsegdiff_step, layout=layout))
              for s in args.medsegdiff for layout in layouts] + [(s[0], s, dynunet_step) for s in args.dynunet]
    built = {}
    for name, spec, make in makers:
        try:
            built[name] = make(spec, image, label, amp)
        except ValueError as err:  # e.g. widths the network cannot take: name the configuration
            raise SystemExit(f"error: configuration {spec[0]!r} ({' '.join(spec[1:])}): {err}") from err
    order = [name for name, _, _ in makers]
    steps = {name: built[name][0] for name in order}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = interleaved_times(steps, args.rounds, args.steps, args.warmup, sync)
    reference = statistics.median(times[order[0]])
    runs = [{"name": name, "parameters_m": built[name][1] / 1e6, "s_per_step_median": statistics.median(times[name]),
             "s_per_step_rounds": times[name], "relative": statistics.median(times[name]) / reference,
             "img_per_s": args.batch / statistics.median(times[name])} for name in order]
    print_table(runs)
    result = cpu_result("step_cost", args, amp_bf16=amp, runs=runs)
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
