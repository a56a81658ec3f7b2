"""``qkms sim``: the simulated QKD link from the command line (no server needed)."""

from __future__ import annotations

import typer
from rich.console import Console
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
