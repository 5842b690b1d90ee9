"""One write transaction; unique-constraint races surface as :class:`Conflict`."""

from __future__ import annotations

from types import TracebackType

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.services.errors import Conflict

_DEFAULT_CONFLICT = "the change conflicts with an existing record"


class writing:  # noqa: N801 - used like a function: ``async with writing(sessions) as session``
    def __init__(self, sessions: async_sessionmaker[AsyncSession], conflict: str = _DEFAULT_CONFLICT) -> None:
        self._context = sessions.begin()
        self._conflict = conflict

    async def __aenter__(self) -> AsyncSession:
        return await self._context.__aenter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        try:
            await self._context.__aexit__(exc_type, exc, tb)
        except IntegrityError as error:
            raise Conflict(self._conflict) from error
        if isinstance(exc, IntegrityError):
            raise Conflict(self._conflict) from exc
        return False
