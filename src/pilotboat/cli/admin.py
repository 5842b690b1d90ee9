"""``pilotboat admin``: operator commands run on the server's machine, straight against its database."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pilotboat.model.principal import Principal
from pilotboat.model.roles import Role
from pilotboat.services.errors import ServiceError
from pilotboat.settings import Settings, load_settings

app = typer.Typer(help="Manage organisations and users (uses PILOTBOAT_DATABASE_URL / PILOTBOAT_DATA_DIR).", no_args_is_help=True)
orgs_app = typer.Typer(help="Organisations.", no_args_is_help=True)
users_app = typer.Typer(help="Users and their roles.", no_args_is_help=True)
app.add_typer(orgs_app, name="orgs")
app.add_typer(users_app, name="users")

console = Console()
err = Console(stderr=True)
T = TypeVar("T")

#: The CLI acts with full rights: whoever runs it already holds the server's data and keys.
OPERATOR = Principal(user_id="cli", email="cli", is_system_admin=True)


def run_action(action: Callable[..., Awaitable[T]], settings: Settings | None = None, *, check_keys: bool = True) -> T:
    """Run ``action(services)`` against the database of ``settings`` (default: the environment's),
    after migrating it and (unless ``check_keys`` is off) checking that the master keys open it."""
    from pilotboat.runtime import WrongMasterKey, build_runtime, check_master_keys
    from pilotboat.store import database

    settings = settings or load_settings()
    try:
        runtime = build_runtime(settings)
    except ValueError as exc:  # a malformed master key (environment or key file)
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc

    async def go() -> T:
        try:
            await database.upgrade(runtime.engine)
            if check_keys:
                try:
                    await check_master_keys(runtime)
                except WrongMasterKey as exc:
                    err.print(f"[red]error:[/red] {escape(str(exc))}")
                    raise typer.Exit(1) from exc
            return await action(runtime.services)
        finally:
            await runtime.engine.dispose()

    try:
        return asyncio.run(go())
    except ServiceError as exc:
        err.print(f"[red]error:[/red] {escape(exc.message)}")
        raise typer.Exit(1) from exc


def resolve_org(services: object, name_or_id: str) -> Awaitable[str]:
    async def find() -> str:
        for org in await services.accounts.list_orgs(OPERATOR):  # type: ignore[attr-defined]
            if name_or_id in (org.id, org.name):
                return org.id
        raise typer.BadParameter(f"no organisation named or with id '{name_or_id}'; see 'pilotboat admin orgs list'")

    return find()


@orgs_app.command("list")
def orgs_list() -> None:
    orgs = run_action(lambda services: services.accounts.list_orgs(OPERATOR))
    table = Table("id", "name", "created")
    for org in orgs:
        table.add_row(org.id, org.name, org.created_at.strftime("%Y-%m-%d %H:%M"))
    console.print(table)


@orgs_app.command("create")
def orgs_create(name: str) -> None:
    org = run_action(lambda services: services.accounts.create_org(OPERATOR, name))
    console.print(f"created organisation [bold]{org.name}[/bold] with id {org.id}")


@users_app.command("list")
def users_list(org: Annotated[str, typer.Argument(help="Organisation name or id")]) -> None:
    async def action(services: object) -> list:
        return await services.accounts.list_members(OPERATOR, await resolve_org(services, org))  # type: ignore[attr-defined]

    table = Table("id", "email", "role", "granted", "system admin")
    for user, role, grants in run_action(action):
        table.add_row(user.id, user.email, role.value, ", ".join(sorted(grants)), "yes" if user.is_system_admin else "")
    console.print(table)


@users_app.command("add")
def users_add(
    org: Annotated[str, typer.Argument(help="Organisation name or id")],
    email: str,
    role: Annotated[Role, typer.Option(help="admin, member or viewer")] = Role.MEMBER,
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True)] = "",
) -> None:
    async def action(services: object) -> object:
        return await services.accounts.add_member(OPERATOR, await resolve_org(services, org), email, password, role)  # type: ignore[attr-defined]

    user = run_action(action)
    console.print(f"added {user.email} as {role.value}")  # type: ignore[attr-defined]


@users_app.command("set-role")
def users_set_role(org: str, user_id: str, role: Role) -> None:
    async def action(services: object) -> None:
        await services.accounts.set_role(OPERATOR, await resolve_org(services, org), user_id, role)  # type: ignore[attr-defined]

    run_action(action)
    console.print(f"role of {user_id} is now {role.value}")


@users_app.command("remove")
def users_remove(org: str, user_id: str) -> None:
    async def action(services: object) -> None:
        await services.accounts.remove_member(OPERATOR, await resolve_org(services, org), user_id)  # type: ignore[attr-defined]

    run_action(action)
    console.print(f"removed {user_id}")


@users_app.command("reset-password")
def users_reset_password(
    email: str,
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True)] = "",
) -> None:
    run_action(lambda services: services.accounts.set_password(email, password))
    console.print(f"password of {email} changed")
