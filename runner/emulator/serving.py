"""Serving the emulator on a real socket: ``serve()`` for tests and in-process runs, ``run()`` for
the CLI.

``serve()`` is the only way in that owns the listening socket: it wraps it in a ``TCPListener``
that can close it (new connections are refused, open keep-alive connections are closed once
their current answer is out) and open it again on the same port, and hands that listener to the
emulator for its ``refuse`` outages. The ``AppRunner`` it returns is an ``EmulatorRunner`` whose
``cleanup()`` first stops the outage driver, so a window that ends during shutdown cannot reopen
the socket behind it.

``run()`` serves until SIGINT or SIGTERM, prints one line ``emulator listening on URL`` to stderr
and cleans up (closing the state file) on the way out.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import anyio
from aiohttp import web

from runner.emulator.config import Config
from runner.emulator.server import Emulator


class TCPListener:
    """The emulator's listening socket, which can be closed and reopened on the same port."""

    GRACE = 2.0

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self.runner = runner
        self.host = host
        self.port = port
        self.site: web.TCPSite | None = None

    @property
    def listening(self) -> bool:
        return self.site is not None

    async def open(self) -> int:
        """Listen (again); returns the bound port, fixed from the first time on."""
        if self.site is not None:
            return self.port
        site = web.TCPSite(self.runner, self.host, self.port)
        try:
            await site.start()
        except OSError:
            await site.stop()  # unregister it from the runner; a later open() tries anew
            raise
        self.site = site
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening and close open connections: idle ones at once, busy ones after their
        current answer (cut after ``GRACE`` seconds, so a hanging request cannot hold it open).
        """
        site, self.site = self.site, None
        if site is not None:
            await site.stop()
        server = self.runner.server
        if server is not None:  # what AppRunner.cleanup() does, but the server lives on
            connections = server.connections
            for connection in connections:
                connection.close()
            await asyncio.gather(*(c.shutdown(self.GRACE) for c in connections))


class EmulatorRunner(web.AppRunner):
    def __init__(self, emulator: Emulator) -> None:
        super().__init__(emulator.app(), access_log=None, handle_signals=False)
        self.emulator = emulator

    async def cleanup(self) -> None:
        await self.emulator.stop_refusals()
        await super().cleanup()


async def serve(emulator: Emulator, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Start the server; returns the runner (to clean up) and its base URL (port 0 picks one)."""
    runner = EmulatorRunner(emulator)
    listener = TCPListener(runner, host, port)
    emulator.attach(listener)
    await runner.setup()
    try:
        bound = await listener.open()
    except BaseException:
        await runner.cleanup()
        raise
    emulator.start_refusals()
    return runner, f"http://{host}:{bound}"


async def run(host: str, port: int, config: Config) -> None:
    """Serve until SIGINT or SIGTERM."""
    runner, url = await serve(Emulator(config), host, port)
    try:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            print(f"emulator listening on {url}", file=sys.stderr, flush=True)
            async for _ in signals:
                break
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()
