"""``qkms sim``: the simulated QKD link from the command line (no server needed)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kms.cli.device import device_app

if TYPE_CHECKING:  # imported where used: `qkms` starts without the link's physics
    from qkd_adapters.sim.link import SimulatedLink

sim_app = typer.Typer(help="Simulated QKD links: presets, link runs, key-rate plots.", no_args_is_help=True)
sim_app.add_typer(device_app, name="device")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


@sim_app.command("presets")
def presets() -> None:
    """List the named link parameter sets and their main figures."""
    from qkd_adapters.sim.params import list_presets, load_preset

    table = Table(title="link presets")
    for col in ("name", "loss dB/km", "detector efficiency", "dark count / gate", "misalignment", "clock Hz"):
        table.add_column(col)
    for name in list_presets():
        p = load_preset(name)
        table.add_row(
            name,
            f"{p.fibre_attenuation_db_per_km:g}",
            f"{p.detector_efficiency:g}",
            f"{p.dark_count_prob:.2e}",
            f"{p.misalignment:g}",
            f"{p.clock_rate_hz:.3g}",
        )
    console.print(table)


@sim_app.command("run")
def run(
    preset: Annotated[str, typer.Option(help="Preset name (see `qkms sim presets`) or a TOML file.")] = "gys",
    distance_km: Annotated[float, typer.Option("--distance", help="Fibre length in km.")] = 25.0,
    protocol: Annotated[str, typer.Option(help="'decoy-bb84' or 'bbm92'.")] = "decoy-bb84",
    clock_rate: Annotated[float, typer.Option(help="Source clock in Hz.")] = 1e9,
    seconds: Annotated[float, typer.Option(help="Simulated link time to run.")] = 5.0,
    key_bits: Annotated[int | None, typer.Option(help="Stop once this many final key bits exist.")] = None,
    block_seconds: Annotated[
        float | None, typer.Option(help="Fixed link time per block (implies --block-sizing fixed).")
    ] = None,
    block_sizing: Annotated[
        str | None,
        typer.Option(help="finite-key (default: each block as long as the finite-key bound needs) | fixed."),
    ] = None,
    max_block_seconds: Annotated[float, typer.Option(help="Longest block (finite-key sizing).")] = 60.0,
    block_efficiency: Annotated[
        float, typer.Option(help="Finite-key sizing: share of a longest block's key rate a block must reach.")
    ] = 0.8,
    physics_processes: Annotated[
        int | None,
        typer.Option(
            help="Processes simulating the next blocks while this one post-processes the current one "
            "(0: none; default 2 with 2 or more CPUs, else 0)."
        ),
    ] = None,
    attack: Annotated[
        str, typer.Option(help="none | intercept-resend:<fraction> | pns | beam-splitting")
    ] = "none",
    seed: Annotated[int | None, typer.Option(help="Seed for a reproducible run.")] = None,
    pa_family: Annotated[
        str, typer.Option(help="Privacy amplification: multiply-add-shift (default) | toeplitz.")
    ] = "multiply-add-shift",
) -> None:
    """Simulate a link block by block (physics and post-processing) and summarise what it delivered."""
    from qkd_adapters.sim.link import SimulatedLink
    from qkd_adapters.sim.physics_feed import keep_freed_memory
    from qkd_adapters.sim.pipeline import PostprocessConfig

    keep_freed_memory()  # this process only simulates: no page faults on every block's arrays
    sizing = block_sizing or ("fixed" if block_seconds is not None else "finite-key")
    if sizing == "fixed" and block_seconds is None:
        block_seconds = 1.0
    finite = sizing == "finite-key"
    try:
        link = SimulatedLink(
            "sim-cli",
            preset,
            distance_km=distance_km,
            protocol=protocol,  # type: ignore[arg-type]
            clock_rate_hz=clock_rate,
            seconds_per_block=block_seconds,
            attack=attack,
            seed=seed,
            postprocess=PostprocessConfig(pa_family=pa_family),
            autostart=False,
            block_sizing=sizing,
            max_block_seconds=max_block_seconds if finite else None,
            block_efficiency=block_efficiency if finite else None,
            physics_processes=_default_processes(preset) if physics_processes is None else physics_processes,
        )
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    started = time.perf_counter()
    try:
        tally = _run_blocks(link, seconds, key_bits, f"{protocol} at {distance_km:g} km")
    finally:
        link.close()
    wall = time.perf_counter() - started
    table = Table(
        title=f"simulated {protocol} link, {link.params.name}, {distance_km:g} km, {clock_rate:.3g} Hz"
    )
    table.add_column("figure")
    table.add_column("value")
    for name, value in _summary_rows(link, protocol, tally, wall):
        table.add_row(name, value)
    console.print(table)


def _default_processes(preset: str) -> int:
    """Two physics processes beside this one where it pays (docs/DECISIONS.md D-38): two CPUs and
    detectors with memory, whose walk is half the link's CPU. Without dead time or afterpulsing the
    physics costs ~2 % and shipping its blocks between processes more than it saves."""
    from qkd_adapters.sim.params import load_preset

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        p = load_preset(preset)
    except (ValueError, OSError):
        return 0  # the link's own constructor reports the bad preset
    return 2 if cpus >= 2 and (p.dead_time_s > 0.0 or p.afterpulse_prob > 0.0) else 0


@dataclass
class _Tally:
    """What a ``qkms sim run`` link delivered, summed over its blocks."""

    final: int = 0
    sifted: int = 0
    leaked: int = 0
    aborted: int = 0
    qbers: list[float] = field(default_factory=list)
    pa_families: set[str] = field(default_factory=set)
    alarms: dict[str, int] = field(default_factory=dict)
    closed_by: dict[str, int] = field(default_factory=dict)


def _run_blocks(link: SimulatedLink, seconds: float, key_bits: int | None, description: str) -> _Tally:
    """Produce blocks until ``seconds`` of link time have run (or ``key_bits`` final bits exist)."""
    from qkd_adapters.keyblock import KeyBlock

    tally = _Tally()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(f"{description} (link seconds)", total=seconds)
        while link.simulated_seconds < seconds - 1e-9 or not link.blocks_produced:
            before = link.simulated_seconds
            event, _bob = link.produce_block()
            details = event.provenance.details if isinstance(event, KeyBlock) else event.details
            closed = str(details.get("block_sizing", {}).get("closed_by", "?"))
            tally.closed_by[closed] = tally.closed_by.get(closed, 0) + 1
            if isinstance(event, KeyBlock):
                tally.final += event.bit_length
                prov = event.provenance
                tally.sifted += int(prov.details.get("sifted_bits", 0))
                tally.leaked += prov.leaked_bits or 0
                if prov.qber is not None:
                    tally.qbers.append(prov.qber)
                if pa := prov.details.get("privacy_amplification"):
                    tally.pa_families.add(f"{pa['family']} ({pa['universality']})")
            else:
                tally.aborted += 1
                tally.alarms[event.reason] = tally.alarms.get(event.reason, 0) + 1
            progress.advance(task, link.simulated_seconds - before)
            if key_bits is not None and tally.final >= key_bits:
                break
    return tally


def _summary_rows(link: SimulatedLink, protocol: str, tally: _Tally, wall: float) -> list[tuple[str, str]]:
    """The (figure, value) rows of the ``qkms sim run`` summary table."""
    from qkd_adapters.sim import analytic

    simulated = link.simulated_seconds
    qbers = tally.qbers
    rows = [
        ("blocks (aborted)", f"{link.blocks_produced} ({tally.aborted})"),
        (
            "physics processes (pipeline)",
            str(link.physics_processes) if link.physics_processes else "0 (inline)",
        ),
        (
            f"block sizing: {link.sizing.mode}",
            f"mean {simulated / max(link.blocks_produced, 1):.3g} s of link per block; closed by "
            + ", ".join(f"{k} x{v}" for k, v in tally.closed_by.items()),
        ),
        ("alarms", ", ".join(f"{k} x{v}" for k, v in tally.alarms.items()) or "none"),
        ("sifted bits", f"{tally.sifted:,}"),
        ("mean QBER", f"{sum(qbers) / len(qbers):.4f}" if qbers else "-"),
        ("bits leaked in reconciliation + verification", f"{tally.leaked:,}"),
        ("final secret key bits", f"{tally.final:,}"),
        ("privacy amplification", ", ".join(sorted(tally.pa_families)) or "-"),
        ("secret key rate (finite-key)", f"{tally.final / simulated:,.0f} bit/s" if simulated else "-"),
    ]
    if protocol == "decoy-bb84":
        asym = analytic.key_rate_weak_vacuum(link.params) * link.params.clock_rate_hz
        rows.append(("asymptotic rate, weak+vacuum (Ma et al. 2005)", f"{asym:,.0f} bit/s"))
    rows += [
        ("simulated link time / wall time", f"{simulated:.2f} s / {wall:.2f} s (x{simulated / wall:.2f})"),
    ]
    return rows


@sim_app.command("keyrate")
def keyrate(
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")] = Path("keyrate.png"),
    preset: Annotated[str, typer.Option(help="Preset name or TOML file.")] = "gys",
    max_km: Annotated[
        float | None, typer.Option(help="Largest distance (default: past the cut-off).")
    ] = None,
    mc_distances: Annotated[
        str, typer.Option(help="Comma-separated distances (km) for Monte Carlo points; '' for none.")
    ] = "0,25,50,75,100,125",
    mc_pulses: Annotated[int, typer.Option(help="Pulses per Monte Carlo block.")] = 10**8,
    repeats: Annotated[int, typer.Option(help="Monte Carlo blocks per point (error bars).")] = 4,
) -> None:
    """Plot key rate against distance: GLLP/decoy analytical curves, the PLOB bound, Monte Carlo points.

    Needs matplotlib, which a server install leaves out: ``pip install 'qkms[plots]'``."""
    from qkd_adapters.sim.params import load_preset
    from qkd_adapters.sim.plot import plot_key_rate_vs_distance

    distances = [float(d) for d in mc_distances.split(",") if d.strip()]
    try:
        path = plot_key_rate_vs_distance(
            load_preset(preset),
            out,
            max_km=max_km,
            mc_distances_km=distances or None,
            mc_pulses=mc_pulses,
            repeats=repeats,
        )
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise
        err_console.print(
            "error: `qkms sim keyrate` needs matplotlib, which this install leaves out: "
            "pip install 'qkms[plots]'",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(2) from exc
    console.print(f"wrote {path}")
