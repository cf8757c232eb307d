"""``sluice migrate``: waits for the database, migrates once, fails loudly; and the
replicas' ``migrations: require`` mode that leaves migrating to it."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from sluice.cli import main
from sluice.settings import Settings
from sluice.store.database import Database
from sluice.store.migrate import SchemaBehind, current_revision, head_revision
from sluice.store.migrate_cli import migrate


def _settings(url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=url, data_dir=str(tmp_path))


def _invoke(url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["migrate", *args], env={"SLUICE_DATABASE_URL": url})
    return result.exit_code, result.output


def test_migrate_brings_an_empty_database_to_head_then_does_nothing(fresh_url: str) -> None:
    code, out = _invoke(fresh_url, "--wait", "5")
    assert code == 0, out
    assert f"schema migrated from nothing to {head_revision()}" in out
    code, out = _invoke(fresh_url, "--wait", "5")
    assert code == 0, out
    assert f"schema already at {head_revision()}" in out
    assert "password" not in out


def test_check_exits_3_on_a_schema_behind_and_0_once_migrated(fresh_url: str) -> None:
    code, out = _invoke(fresh_url, "--check", "--wait", "0")
    assert code == 3, out
    assert "run `sluice migrate`" in out
    assert _invoke(fresh_url)[0] == 0
    code, out = _invoke(fresh_url, "--check", "--wait", "0")
    assert code == 0, out


async def test_check_waits_until_another_process_has_migrated(
    fresh_url: str, tmp_path: Path
) -> None:
    settings = _settings(fresh_url, tmp_path)
    waiting = asyncio.create_task(migrate(settings, wait=30, check_only=True))
    await asyncio.sleep(1.5)
    assert not waiting.done()
    await migrate(settings, wait=5, check_only=False)
    assert "schema at" in await asyncio.wait_for(waiting, 10)


async def test_migrators_started_together_all_succeed_and_the_schema_is_migrated_once(
    fresh_url: str, tmp_path: Path
) -> None:
    settings = _settings(fresh_url, tmp_path)
    outcomes = await asyncio.gather(*(migrate(settings, 10, False) for _ in range(4)))
    assert sum("migrated from nothing" in o for o in outcomes) == 1, outcomes
    assert sum("already at" in o for o in outcomes) == 3, outcomes


def test_an_unreachable_database_fails_after_the_wait_with_the_reason() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    code, out = _invoke(f"postgresql://sluice:secret@127.0.0.1:{port}/nowhere", "--wait", "2")
    assert code == 1
    assert "did not answer" in out
    assert "127.0.0.1" in out
    assert "secret" not in out
    assert 1.0 <= time.monotonic() - started < 10


async def test_a_schema_newer_than_this_release_is_left_alone(
    fresh_url: str, tmp_path: Path
) -> None:
    """A rollback re-runs the previous image's migrations job: it must not fail (nor touch
    the schema), as that release's replicas run on the newer schema."""
    settings = _settings(fresh_url, tmp_path)
    await migrate(settings, 5, False)
    database = Database(fresh_url)
    database.open()
    try:
        async with database.writer.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        assert "newer than this release's" in await migrate(settings, 5, False)
        assert "newer than" in await migrate(settings, 5, True)
        assert await current_revision(database.engine) == "9999"
        older = Database(fresh_url, migrations="require")
        await older.start()
        await older.close()
    finally:
        await database.close()


async def test_require_refuses_to_start_on_a_schema_behind_and_changes_nothing(
    fresh_url: str,
) -> None:
    replica = Database(fresh_url, migrations="require")
    with pytest.raises(SchemaBehind, match="sluice migrate"):
        await replica.start()
    with pytest.raises(RuntimeError):
        replica.engine  # noqa: B018 - closed again after the refusal
    probe = Database(fresh_url)
    probe.open()
    try:
        assert await current_revision(probe.engine) is None
    finally:
        await probe.close()
    migrator = Database(fresh_url)
    await migrator.start()  # migrates ("run", the default)
    await migrator.close()
    replica = Database(fresh_url, migrations="require")
    await replica.start()
    await replica.close()


def test_the_setting_reaches_the_database(tmp_path: Path) -> None:
    from sluice.services import database_for

    settings = Settings(data_dir=str(tmp_path), migrations="require")
    assert database_for(settings)._migrations == "require"


@pytest.mark.postgres
def test_a_wrong_database_fails_at_once_and_hides_every_password(
    postgres_unreachable: str | None,
) -> None:
    """No wait mends a missing database: no retrying until --wait runs out."""
    if postgres_unreachable is not None:
        pytest.skip(postgres_unreachable)
    started = time.monotonic()
    code, out = _invoke(
        "postgresql://postgres@127.0.0.1:5432/sluice_no_such_db?password=s3cr3t", "--wait", "30"
    )
    assert code == 1
    assert "refused" in out
    assert "InvalidCatalogNameError" in out
    assert "s3cr3t" not in out
    assert time.monotonic() - started < 10


def test_a_malformed_url_is_one_error_line() -> None:
    code, out = _invoke("not a url", "--wait", "1")
    assert code == 1
    assert out.startswith("error: the database URL cannot be used")
    assert "Traceback" not in out
