"""``pilotboat keys``: the master keyring that seals secrets at rest. Status, rotation, pruning."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from pilotboat.cli.admin import run_action
from pilotboat.security.sealing import (
    RELOAD_INTERVAL,
    MasterKeys,
    key_id,
    load_master_keys,
    new_master_key,
    read_key_file,
    write_key_file,
)
from pilotboat.settings import Settings, load_settings

if TYPE_CHECKING:
    from pilotboat.services.container import Services
    from pilotboat.services.keyring import KeyringService, SealedCount

app = typer.Typer(
    help="The master keys that seal secrets at rest (PILOTBOAT_MASTER_KEY, or master.key in the data dir).",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)
#: Re-sealing passes at most: a later pass catches values a lagging node sealed under an old key meanwhile.
MAX_PASSES = 3

ROTATE_HELP = (
    "Re-seal every stored secret under a new master key, without stopping the servers.\n\n"
    "[bold]Key file[/bold] (no PILOTBOAT_MASTER_KEY): a new key is generated and written first in the key file, the "
    "old ones after it. Running servers re-read the file within seconds: they then seal under the new key and open "
    "under both. Every stored secret is then re-sealed under the new key. When every node has the new file, run "
    "[bold]pilotboat keys prune[/bold] to drop the old key.\n\n"
    "[bold]PILOTBOAT_MASTER_KEY[/bold]: nothing is generated. First put the new key first in the variable on every "
    "node (NEW,OLD) and restart them; then run this command with the same variable: it re-seals everything under the "
    "variable's first key. Then [bold]pilotboat keys prune[/bold] says which keys may leave the variable.\n\n"
    "Exits with 1 when a stored value could not be opened (counted per column)."
)


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def _keyring() -> tuple[Settings, MasterKeys]:
    """The settings (read once: reading them removes the secret variables) and where the keys come from."""
    settings = load_settings()
    configured = settings.master_key.get_secret_value() if settings.master_key else None
    try:
        return settings, load_master_keys(configured, settings.data_dir)
    except (OSError, ValueError) as exc:
        _fail(str(exc))


def _source(master: MasterKeys) -> str:
    return f"the key file {master.path}" if master.path else "PILOTBOAT_MASTER_KEY"


def _stale(census: list[SealedCount], sealing: str) -> int:
    return sum(count.count for count in census if count.key_id != sealing)


async def _reseal(keyring: KeyringService) -> tuple[dict[str, int], dict[str, int]]:
    """Re-seal until nothing readable is left under another key; (re-sealed, unreadable) per column."""
    sealing = keyring.sealer.key_id
    resealed: dict[str, int] = {}
    unreadable: dict[str, int] = {}
    left = _stale(await keyring.census(), sealing)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=err) as progress:
        task = progress.add_task("re-sealing", total=left)
        for _ in range(MAX_PASSES):
            report = await keyring.reseal(lambda column, rows: progress.update(task, advance=rows, description=column))
            for column, done in report.resealed.items():
                resealed[column] = resealed.get(column, 0) + done
            unreadable = report.unreadable
            left = _stale(await keyring.census(), sealing)
            if left <= sum(unreadable.values()):
                break
            progress.update(task, total=progress.tasks[0].completed + left)
        progress.update(task, description="re-sealed")
    return resealed, unreadable


async def _census(services: Services) -> tuple[str, tuple[str, ...], list[SealedCount]]:
    """The sealing key id, every key id of the keyring, and how many values each key sealed."""
    sealer = services.keyring.sealer
    return sealer.key_id, sealer.key_ids, await services.keyring.census()


@app.command("status", help="Show the keyring and how many stored secrets each key sealed.")
def status() -> None:
    settings, master = _keyring()
    sealing, key_ids, census = run_action(_census, settings, check_keys=False)
    totals: dict[str, int] = {}
    for count in census:
        totals[count.key_id] = totals.get(count.key_id, 0) + count.count
    missing = sorted(set(totals) - set(key_ids))
    console.print(f"master keys from {escape(_source(master))}")
    keyring = Table("key id", "role", "sealed values")
    for kid in key_ids:
        keyring.add_row(kid, "seals and opens" if kid == sealing else "opens only", str(totals.get(kid, 0)))
    for kid in missing:
        keyring.add_row(kid, "[red]MISSING: not in the keyring[/red]", str(totals[kid]))
    console.print(keyring)
    values = Table("column", "key id", "values")
    for count in census:
        values.add_row(count.column, count.key_id, str(count.count))
    console.print(values)
    if missing:
        _fail(f"secrets sealed under key(s) {', '.join(missing)} cannot be opened here: set PILOTBOAT_MASTER_KEY, or "
              "restore master.key in the data dir, to the keys this database was sealed with")
    stale = _stale(census, sealing)
    if stale:
        console.print(f"{stale} value(s) are sealed under an older key: run 'pilotboat keys rotate"
                      f"{'' if master.path is None else ' --reseal-only'}' to re-seal them under {sealing}")


@app.command("rotate", help=ROTATE_HELP)
def rotate(
    reseal_only: Annotated[bool, typer.Option(
        "--reseal-only", help="Key file: generate no key, re-seal under the current sealing key (finishes an interrupted rotation)"
    )] = False,
) -> None:
    settings, master = _keyring()

    async def action(services: Services) -> tuple[dict[str, int], dict[str, int]]:
        keyring = services.keyring
        if master.path is not None and not reseal_only:
            new = new_master_key()
            write_key_file(master.path, (new, *read_key_file(master.path)))
            keyring.sealer.refresh(force=True)
            if keyring.sealer.key_id != key_id(new):
                _fail(f"the new key {key_id(new)} was written to {master.path} but could not be read back; nothing was "
                      "re-sealed: run 'pilotboat keys rotate --reseal-only' to finish")
            console.print(f"new sealing key {key_id(new)} written first in {master.path}; the older keys still open")
            err.print(f"waiting {RELOAD_INTERVAL + 0.5:.1f} s for running servers to load it")
            await asyncio.sleep(RELOAD_INTERVAL + 0.5)
        elif master.path is None:
            console.print(f"keys from PILOTBOAT_MASTER_KEY: re-sealing under its first key {keyring.sealer.key_id}")
            if len(keyring.sealer.key_ids) == 1:
                console.print("(to rotate, first put a new key first in PILOTBOAT_MASTER_KEY on every node (NEW,OLD), "
                              "restart them, and run this again with the same variable)")
        return await _reseal(keyring)

    resealed, unreadable = run_action(action, settings)
    table = Table("column", "re-sealed", "unreadable")
    for column, done in resealed.items():
        table.add_row(column, str(done), str(unreadable.get(column, 0)))
    console.print(table)
    if unreadable:
        _fail(f"{sum(unreadable.values())} stored value(s) could not be opened with any key of the keyring (see the table); "
              "they stay as they are: restore the key they were sealed with, or replace those secrets")
    if master.path is not None:
        console.print("every stored secret is sealed under the new key. Running servers load the key file within "
                      f"{RELOAD_INTERVAL:.0f} s; once every node has it, run 'pilotboat keys prune' to drop the old key(s).")
    else:
        console.print("every stored secret is sealed under the first key of PILOTBOAT_MASTER_KEY; run "
                      "'pilotboat keys prune' to see which keys may leave the variable.")


@app.command("prune", help="Drop the keys no stored secret needs any more (refused while one still does).")
def prune() -> None:
    settings, master = _keyring()
    sealing, key_ids, census = run_action(_census, settings)
    stale: dict[str, int] = {}
    for count in census:
        if count.key_id != sealing:
            stale[count.key_id] = stale.get(count.key_id, 0) + count.count
    if stale:
        listed = ", ".join(f"{count} under {kid}" for kid, count in sorted(stale.items()))
        _fail(f"stored secrets still need the older key(s) ({listed}); nothing was removed. Re-seal them under {sealing} "
              f"with 'pilotboat keys rotate{'' if master.path is None else ' --reseal-only'}', then prune again")
    old = [kid for kid in key_ids if kid != sealing]
    if not old:
        console.print(f"the keyring holds only the sealing key {sealing}: nothing to prune")
        return
    if master.path is None:
        console.print(f"no stored secret needs key(s) {', '.join(old)}: on every node keep only the first entry of "
                      f"PILOTBOAT_MASTER_KEY (key {sealing}) and restart the node. Access tokens signed under a removed "
                      "key stop working (users log in again).")
        return
    keys = read_key_file(master.path)
    if key_id(keys[0]) != sealing:
        _fail(f"{master.path} changed meanwhile (its first key is now {key_id(keys[0])}); nothing was removed: run prune again")
    write_key_file(master.path, (keys[0],))
    console.print(f"removed key(s) {', '.join(old)} from {master.path}; it holds only the sealing key {sealing}. Running "
                  "servers load it within seconds; access tokens signed under a removed key stop working (users log in again).")
