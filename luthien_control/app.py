"""What the proxy holds for its whole life: settings, backend pools, key and policy caches.

Neither key checks nor policy lookups touch the database on the request path: both are
kept in memory and refreshed in the background every ``refresh_interval`` seconds (a
key revoked or a policy replaced takes effect within that time, in every worker).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from luthien_control.exceptions import LuthienError
from luthien_control.policies.base import Policy
from luthien_control.policies.secrets import LeakedApiKeyDetection
from luthien_control.recording import DatabaseRecorder, Redactor
from luthien_control.settings import Settings
from luthien_control.upstream import BackendClient

logger = logging.getLogger(__name__)

OPENAI_BASE_URL = "https://api.openai.com/v1"
SAMPLE_POLICY = "sample_policy.yaml"


def sample_policy_path() -> Path:
    """The policy the proxy runs when it is given none (shipped with the package)."""
    return Path(str(resources.files("luthien_control").joinpath(SAMPLE_POLICY)))


class KeyCache:
    """Active client keys, by hash, as last read from the database.

    Keys that matched are remembered as they were sent (at most ``MEMO_SIZE``, forgotten
    at every refresh, so a revoked key stops working with the next one): a client sends
    the same key with every request, and its sha256 through OpenSSL cost about 40 µs of
    CPU on a cold request path (docs/performance.md). A key that did not match is hashed
    every time, so that guessing cannot fill the memory.
    """

    MEMO_SIZE = 1024

    def __init__(self) -> None:
        self._by_hash: dict[str, str] = {}
        self._matched: dict[str, str] = {}
        self.loaded = False

    def name_for(self, key: str) -> str | None:
        name = self._matched.get(key)
        if name is not None:
            return name
        from luthien_control.db.keys import hash_key

        name = self._by_hash.get(hash_key(key))
        if name is not None:
            if len(self._matched) >= self.MEMO_SIZE:
                self._matched.clear()
            self._matched[key] = name
        return name

    async def refresh(self, engine: AsyncEngine) -> None:
        from luthien_control.db.keys import active_keys

        by_hash = await active_keys(engine)
        self._by_hash, self._matched = by_hash, {}
        self.loaded = True


class PolicySource:
    """The policy in force: from ``POLICY_FILEPATH``, else the database, else the sample."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.current: Policy | None = None
        self.origin = ""
        self._version: int | None = None

    async def load(self, engine: AsyncEngine) -> None:
        from luthien_control.policies.loader import load_policy, load_policy_file

        settings = self._settings
        if settings.policy_filepath is not None:
            self.current = load_policy_file(settings.policy_filepath)
            self.origin = f"file {settings.policy_filepath}"
            return
        from luthien_control.db.policies import get_policy

        name = settings.top_level_policy_name
        stored = await get_policy(engine, name)
        if stored is not None:
            self.current = load_policy(stored.definition)
            self._version = stored.version
            self.origin = f"database policy '{name}' (version {stored.version})"
        else:
            self.current = load_policy_file(sample_policy_path())
            self._version = None
            self.origin = f"built-in sample policy (no policy '{name}' in the database)"

    async def refresh(self, engine: AsyncEngine) -> bool:
        """Reload a database policy whose version changed; keep the last good one on error.

        Returns whether a new policy is now in force.
        """
        if self._settings.policy_filepath is not None:
            return False
        from luthien_control.db.policies import policy_version

        version = await policy_version(engine, self._settings.top_level_policy_name)
        if version == self._version:
            return False
        try:
            await self.load(engine)
        except LuthienError as exc:
            self._version = version  # do not retry the same broken version every second
            logger.error("policy not reloaded, keeping the previous one: %s", exc.message)
            return False
        logger.info("policy reloaded: %s", self.origin)
        return True

    def reload_file(self) -> bool:
        """Read the policy file again (on SIGHUP); a broken file keeps the last good policy."""
        from luthien_control.policies.loader import load_policy_file

        path = self._settings.policy_filepath
        if path is None:
            return False
        try:
            self.current = load_policy_file(path)
        except LuthienError as exc:
            logger.error("policy file not reloaded, keeping the previous policy: %s", exc.message)
            return False
        logger.info("policy reloaded from file %s", path)
        return True


@dataclass(eq=False)
class Services:
    """Everything a transaction may need besides itself; policies reach it as ``tx.services``.

    Two backend pools: ``backend`` carries the clients' requests (``BACKEND_POOL_SIZE``),
    ``judge_backend`` every call the proxy makes for itself (``LLMJudgePolicy``'s judge,
    ``JUDGE_POOL_SIZE``). A request keeps its slot while its policies wait for a judge:
    were the judge's call to need a slot of the same pool, a full pool would be requests
    waiting for judges waiting for those very requests' slots.
    """

    settings: Settings
    engine: AsyncEngine
    backend: BackendClient
    judge_backend: BackendClient
    keys: KeyCache = field(default_factory=KeyCache)
    policy: PolicySource | None = None
    recorder: DatabaseRecorder | None = None
    _refresher: asyncio.Task[None] | None = None

    @property
    def default_backend_url(self) -> str:
        return self.settings.backend_url or OPENAI_BASE_URL

    @classmethod
    def create(cls, settings: Settings) -> Services:
        from luthien_control.db.engine import create_engine

        engine = create_engine(settings.database_url)
        return cls(
            settings=settings,
            engine=engine,
            backend=BackendClient(settings.timeouts, settings.limits, settings.network),
            judge_backend=BackendClient(
                settings.timeouts,
                settings.judge_limits,
                settings.network,
                pool_setting="JUDGE_POOL_SIZE",
            ),
            policy=PolicySource(settings),
            recorder=DatabaseRecorder(
                engine,
                Redactor(),
                backlog=settings.recorder_backlog,
                backlog_bytes=settings.recorder_backlog_bytes,
                dead_letter=settings.recorder_dead_letter,
            ),
        )

    async def start(self) -> None:
        await self.backend.start()
        await self.judge_backend.start()
        assert self.policy is not None
        await self.policy.load(self.engine)
        logger.info("policy in force: %s", self.policy.origin)
        self.update_redactor()
        assert self.recorder is not None
        self.recorder.start()
        try:
            await self.keys.refresh(self.engine)
        except LuthienError as exc:
            logger.error("client keys not loaded: %s", exc.message)
        self._refresher = asyncio.create_task(self._refresh_forever(), name="luthien-refresh")
        if self.settings.policy_filepath is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self) -> None:
        assert self.policy is not None
        if self.policy.reload_file():
            self.update_redactor()

    def update_redactor(self) -> None:
        """Stored records are redacted with the known patterns and the policy's own."""
        assert self.policy is not None and self.recorder is not None
        patterns: list[str] = []
        if self.policy.current is not None:
            for policy in self.policy.current.walk():
                if isinstance(policy, LeakedApiKeyDetection) and policy.custom_patterns:
                    patterns.extend(policy.custom_patterns)
        self.recorder.redactor = Redactor(patterns)

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        if self.recorder is not None:
            # The requests cut at the end of the grace period have queued their records
            # by now (``LuthienProxy.lifespan`` waits for them).
            await self.recorder.stop()
        await self.backend.close()
        await self.judge_backend.close()
        await self.engine.dispose()

    async def _refresh_forever(self) -> None:
        assert self.policy is not None
        failing = False
        while True:
            await asyncio.sleep(self.settings.refresh_interval)
            try:
                await self.keys.refresh(self.engine)
                if await self.policy.refresh(self.engine):
                    self.update_redactor()
            except LuthienError as exc:
                if not failing:
                    logger.error("cannot refresh keys and policy: %s", exc.message)
                failing = True
            except Exception:  # a bug must not stop the refresh for the worker's lifetime
                logger.exception("unexpected error while refreshing keys and policy")
                failing = True
            else:
                if failing:
                    logger.info("keys and policy refreshed again")
                failing = False
