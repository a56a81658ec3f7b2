"""``qkms sim``: the simulated QKD link from the command line (no server needed)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

sim_app = typer.Typer(help="Simulated QKD links: presets, link runs, key-rate plots.", no_args_is_help=True)
console = Console()


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
    block_seconds: Annotated[float, typer.Option(help="Link time per block (finite-key block size).")] = 1.0,
    attack: Annotated[
        str, typer.Option(help="none | intercept-resend:<fraction> | pns | beam-splitting")
    ] = "none",
    seed: Annotated[int | None, typer.Option(help="Seed for a reproducible run.")] = None,
) -> None:
    """Simulate a link block by block (physics and post-processing) and summarise what it delivered."""
    from qkd_adapters.keyblock import KeyBlock
    from qkd_adapters.sim import analytic
    from qkd_adapters.sim.link import SimulatedLink

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
            autostart=False,
        )
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    blocks = max(1, round(seconds / block_seconds))
    final = sifted = leaked = aborted = 0
    qbers: list[float] = []
    alarms: dict[str, int] = {}
    started = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(f"{protocol} at {distance_km:g} km", total=blocks)
        for _ in range(blocks):
            event, _bob = link.produce_block()
            if isinstance(event, KeyBlock):
                final += event.bit_length
                prov = event.provenance
                sifted += int(prov.details.get("sifted_bits", 0))
                leaked += prov.leaked_bits or 0
                if prov.qber is not None:
                    qbers.append(prov.qber)
            else:
                aborted += 1
                alarms[event.reason] = alarms.get(event.reason, 0) + 1
            progress.advance(task)
            if key_bits is not None and final >= key_bits:
                break
    wall = time.perf_counter() - started
    simulated = link.simulated_seconds
    table = Table(
        title=f"simulated {protocol} link, {link.params.name}, {distance_km:g} km, {clock_rate:.3g} Hz"
    )
    table.add_column("figure")
    table.add_column("value")
    rows = [
        ("blocks (aborted)", f"{link.blocks_produced} ({aborted})"),
        ("alarms", ", ".join(f"{k} x{v}" for k, v in alarms.items()) or "none"),
        ("sifted bits", f"{sifted:,}"),
        ("mean QBER", f"{sum(qbers) / len(qbers):.4f}" if qbers else "-"),
        ("bits leaked in reconciliation + verification", f"{leaked:,}"),
        ("final secret key bits", f"{final:,}"),
        ("secret key rate (finite-key)", f"{final / simulated:,.0f} bit/s" if simulated else "-"),
    ]
    if protocol == "decoy-bb84":
        asym = analytic.key_rate_weak_vacuum(link.params) * link.params.clock_rate_hz
        rows.append(("asymptotic rate, weak+vacuum (Ma et al. 2005)", f"{asym:,.0f} bit/s"))
    rows += [
        ("simulated link time / wall time", f"{simulated:.2f} s / {wall:.2f} s (x{simulated / wall:.2f})"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


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
    """Plot key rate against distance: GLLP/decoy analytical curves, the PLOB bound, Monte Carlo points."""
    from qkd_adapters.sim.params import load_preset
    from qkd_adapters.sim.plot import plot_key_rate_vs_distance

    distances = [float(d) for d in mc_distances.split(",") if d.strip()]
    path = plot_key_rate_vs_distance(
        load_preset(preset),
        out,
        max_km=max_km,
        mc_distances_km=distances or None,
        mc_pulses=mc_pulses,
        repeats=repeats,
    )
    console.print(f"wrote {path}")


device_app = typer.Typer(
    help="A simulated QKD device pair serving ETSI GS QKD 014 to two KMEs (one port per site).",
    no_args_is_help=True,
)
sim_app.add_typer(device_app, name="device")
err_console = Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> typer.Exit:
    """Print a one-line error (no panel: scripts grep it) and exit 2."""
    err_console.print(f"error: {message}", markup=False, highlight=False)
    return typer.Exit(2)


DeviceDirOpt = Annotated[
    Path, typer.Option("--dir", help="The device pair's directory (PKI and device.toml).")
]


@device_app.command("init")
def device_init(
    directory: DeviceDirOpt,
    site_a_client: Annotated[
        str, typer.Option("--site-a-client", help="SAE ID (certificate CN) of the KME at site A.")
    ] = "kme-a",
    site_b_client: Annotated[
        str, typer.Option("--site-b-client", help="SAE ID (certificate CN) of the KME at site B.")
    ] = "kme-b",
) -> None:
    """Create the device CA, both devices' server certificates and one client credential per KME."""
    from kms.simdevice.serve import DeviceSetupError, init_device_dir

    try:
        device = init_device_dir(directory, site_a_client, site_b_client)
    except DeviceSetupError as exc:
        raise _fail(str(exc)) from exc
    console.print(f"device CA: {device.ca_cert}")
    for site, s in device.sites.items():
        console.print(
            f"site {site}: device {s.device_id}, client {s.client}: {s.client_cert}, {s.client_key}"
        )


@device_app.command("serve")
def device_serve(
    directory: DeviceDirOpt,
    port_a: Annotated[int, typer.Option("--port-a", help="HTTPS port of device A (site A's KME).")],
    port_b: Annotated[int, typer.Option("--port-b", help="HTTPS port of device B (site B's KME).")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    preset: Annotated[str, typer.Option(help="Preset name (see `qkms sim presets`) or a TOML file.")] = "gys",
    distance_km: Annotated[float, typer.Option("--distance", help="Fibre length in km.")] = 25.0,
    protocol: Annotated[str, typer.Option(help="'decoy-bb84' or 'bbm92'.")] = "decoy-bb84",
    clock_rate: Annotated[float, typer.Option(help="Source clock in Hz.")] = 1e9,
    block_seconds: Annotated[
        float | None, typer.Option(help="Link time per block (default 1 s; or give --pulses-per-block).")
    ] = None,
    pulses_per_block: Annotated[int | None, typer.Option(help="Pulses per block.")] = None,
    attack: Annotated[
        str, typer.Option(help="none | intercept-resend:<fraction> | pns | beam-splitting")
    ] = "none",
    pacing: Annotated[
        str, typer.Option(help="'realtime' (physical rate) or 'fast' (as fast as the CPU).")
    ] = "realtime",
    seed: Annotated[int | None, typer.Option(help="Seed for a reproducible link.")] = None,
    channel_auth: Annotated[
        str, typer.Option(help="Authentication of the devices' classical channel (ml-dsa-session, ...).")
    ] = "ml-dsa-session",
    key_size: Annotated[int, typer.Option(help="Default key size in bits (Get status key_size).")] = 256,
    min_key_size: Annotated[int, typer.Option(help="Smallest key size served, bits.")] = 64,
    max_key_size: Annotated[int, typer.Option(help="Largest key size served, bits.")] = 4096,
    max_keys_per_request: Annotated[int, typer.Option(help="Most keys in one request.")] = 128,
    max_stored_bits: Annotated[
        int, typer.Option(help="Key buffer bound, bits (the link pauses when full).")
    ] = 4 * 1024 * 1024,
    key_ttl: Annotated[
        float, typer.Option(help="Seconds a key waits for its slave before it is zeroised.")
    ] = 300.0,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error")] = "info",
) -> None:
    """Run devices A and B over one simulated link, each an ETSI GS QKD 014 server over mTLS."""
    from kms.logs import configure_logging
    from kms.simdevice.pair import PairLimits
    from kms.simdevice.serve import DeviceDir, DeviceSetupError, build_pair, run_devices

    configure_logging(log_level)
    if port_a == port_b:
        raise _fail("--port-a and --port-b must differ")
    if block_seconds is not None and pulses_per_block is not None:
        raise _fail("give --block-seconds or --pulses-per-block, not both")
    try:
        device = DeviceDir.load(directory)
        limits = PairLimits(
            key_size=key_size,
            min_key_size=min_key_size,
            max_key_size=max_key_size,
            max_key_per_request=max_keys_per_request,
            max_stored_bits=max_stored_bits,
            key_ttl_s=key_ttl,
        )
        link_options: dict[str, object] = {
            "preset": preset,
            "distance_km": distance_km,
            "protocol": protocol,
            "clock_rate_hz": clock_rate,
            "attack": attack,
            "pacing": pacing,
            "seed": seed,
            "channel_auth": channel_auth,
        }
        if pulses_per_block is not None:
            link_options["pulses_per_block"] = pulses_per_block
        else:
            link_options["seconds_per_block"] = 1.0 if block_seconds is None else block_seconds
        pair = build_pair(device, link_options, limits)
    except (DeviceSetupError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    run_devices(device, pair, {"A": port_a, "B": port_b}, host=host)
