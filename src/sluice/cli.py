"""The ``sluice`` command: serve, check-config, migrate, keys, batches, usage, mock-upstream.

Every ``serve`` flag can also come from the environment (``SLUICE_CONFIG``,
``SLUICE_SERVER__PORT``…), through the settings loader.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from datetime import datetime
from typing import Any

import click
from prometheus_client import CollectorRegistry

from sluice.backends.registry import ProviderRegistry, default_providers
from sluice.settings import (
    ConfigError,
    Settings,
    load_settings,
    resolve_secret,
    resolve_url,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sluice-gateway")
def main() -> None:
    """Sluice: a fast, OpenAI-compatible LLM gateway."""


@main.command()
@click.option(
    "--config",
    "config_path",
    envvar="SLUICE_CONFIG",
    type=click.Path(dir_okay=False),
    help="YAML settings file (default: serve the embedded model).",
)
@click.option("--host", default=None, help="Interface to bind (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port to listen on (default 8080).")
@click.option("--workers", type=int, default=None, help="Worker processes (default 1).")
def serve(config_path: str | None, host: str | None, port: int | None, workers: int | None) -> None:
    """Serve the OpenAI API."""
    from sluice.server import serve as run_server

    overrides = {"host": host, "port": port, "workers": workers}
    settings = _load_or_exit(config_path, **overrides)
    run_server(settings, config_path, overrides)


@main.command("check-config")
@click.argument("config_path", type=click.Path(dir_okay=False))
def check_config(config_path: str) -> None:
    """Validate a settings file and print the resolved model table."""
    settings = _load_or_exit(config_path)
    providers = default_providers(CollectorRegistry())
    problems = _missing_secrets(settings, providers)
    click.echo(
        f"server: {settings.server.host}:{settings.server.port} "
        f"workers={settings.server.workers} max_body_bytes={settings.server.max_body_bytes}"
    )
    auth = f"on ({settings.auth.master_key})" if settings.auth.master_key else "off (open)"
    database = _describe_url(settings.database_url) or f"SQLite under {settings.data_dir}"
    click.echo(
        f"auth: {auth}; usage records: {'on' if settings.usage.enabled else 'off'}; "
        f"database: {database}; redis: {_describe_url(settings.redis_url) or 'none'}"
    )
    click.echo(
        f"{'MODEL':<28} {'DEPLOYMENT':<28} {'PROVIDER':<15} {'TARGET':<44} "
        f"{'UPSTREAM MODEL':<24} WEIGHT"
    )
    for model in settings.models:
        for index, spec in enumerate(model.deployments):
            name = spec.id or f"{model.name}/{index}"
            described = providers.describe(spec, model.name)
            click.echo(
                f"{model.name:<28} {name:<28} {spec.provider:<15} {described.target:<44} "
                f"{described.upstream_model:<24} {spec.weight:g}"
            )
    if problems:
        for problem in problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(1)
    click.echo("configuration OK")


@main.command("mock-upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=9100, show_default=True)
@click.option(
    "--latency-ms",
    type=float,
    default=0.0,
    show_default=True,
    help="Delay before each response's headers.",
)
@click.option(
    "--tokens-per-second",
    type=float,
    default=0.0,
    show_default=True,
    help="Stream pacing (0: as fast as possible).",
)
@click.option("--completion-tokens", type=int, default=8, show_default=True)
@click.option(
    "--status",
    type=int,
    default=200,
    show_default=True,
    help="Answer every request with this status (error injection).",
)
@click.option("--error-rate", type=float, default=0.0, help="Fault: share answered with an error.")
@click.option("--error-status", type=int, default=500, show_default=True)
@click.option("--reset-rate", type=float, default=0.0, help="Fault: share reset, no response.")
@click.option(
    "--throttle-rate", type=float, default=0.0, help="Fault: share answered 429 + Retry-After."
)
@click.option("--retry-after", type=float, default=1.0, show_default=True, help="Seconds.")
@click.option(
    "--stall-rate", type=float, default=0.0, help="Fault: share silent before the first byte."
)
@click.option("--stall-seconds", type=float, default=10.0, show_default=True)
@click.option(
    "--stream-stall-rate",
    type=float,
    default=0.0,
    help="Fault: share of streams silent after their first event.",
)
@click.option("--stream-stall-seconds", type=float, default=10.0, show_default=True)
@click.option("--added-latency-ms", type=float, default=0.0, help="Fault: delay on every answer.")
@click.option("--latency-jitter-ms", type=float, default=0.0, help="Fault: random extra delay.")
@click.option("--down", is_flag=True, help="Fault: reset every request (a dead deployment).")
@click.option("--seed", type=int, default=None, help="Seed of the fault draws (repeatable runs).")
def mock_upstream(
    host: str,
    port: int,
    latency_ms: float,
    tokens_per_second: float,
    completion_tokens: int,
    status: int,
    **faults: Any,
) -> None:
    """Run a mock OpenAI-compatible upstream for tests and demos.

    The --*-rate, stall, latency and --down flags inject random faults, drawn per request
    (error, reset, throttle and stall shares add up to at most 1); POST /mock/faults changes
    them while it runs (docs/testing.md)."""
    from sluice.testing.faults import MockFaults
    from sluice.testing.mock_upstream import MockBehaviour, run_mock_upstream

    behaviour = MockBehaviour(
        latency_ms=latency_ms,
        tokens_per_second=tokens_per_second,
        completion_tokens=completion_tokens,
        status=status,
    )
    try:
        injected = MockFaults(**faults)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    run_mock_upstream(host, port, behaviour, injected)


def _load_or_exit(path: str | None, **overrides: object) -> Settings:
    try:
        return load_settings(path, **overrides)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def _describe_url(value: str | None) -> str | None:
    """A URL without its password, or the reference it is read from."""
    if value is None or value.startswith(("os.environ/", "file:")):
        return value
    scheme, sep, rest = value.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


def _missing_secrets(settings: Settings, providers: ProviderRegistry) -> list[str]:
    problems = []
    for name, reference in (
        ("auth.master_key", settings.auth.master_key),
        ("database_url", settings.database_url),
        ("redis_url", settings.redis_url),
    ):
        try:
            resolve_url(reference)
        except ConfigError as exc:
            problems.append(f"{name}: {exc}")
    for model in settings.models:
        for spec in model.deployments:
            for reference in providers[spec.provider].secrets(spec):
                try:
                    resolve_secret(reference)
                except ConfigError as exc:
                    problems.append(f"model {model.name}: {exc}")
    return problems


@main.group()
def keys() -> None:
    """Create, list, update and revoke virtual API keys (straight in the configured database)."""


_config_option = click.option(
    "--config",
    "config_path",
    envvar="SLUICE_CONFIG",
    type=click.Path(dir_okay=False),
    help="YAML settings file naming the database (default: SQLite under the data dir).",
)


@keys.command("create")
@_config_option
@click.option("--models", help="Comma-separated models the key may use (default: all).")
@click.option("--rpm", type=int, help="Requests per minute.")
@click.option("--tpm", type=int, help="Tokens per minute.")
@click.option("--max-parallel", type=int, help="Concurrent requests.")
@click.option("--budget-usd", type=float, help="Spend limit in USD.")
@click.option("--budget-period", type=click.Choice(["daily", "weekly", "monthly"]))
@click.option("--expires-at", type=click.DateTime(), help="Expiry (UTC).")
@click.option("--meta", multiple=True, help="Metadata as key=value (repeatable).")
@click.option("--team", help="Team whose keys may share cached answers.")
@click.option(
    "--cache-controls/--no-cache-controls",
    default=None,
    help="May requests steer the cache (Cache-Control, body 'cache')? Default: yes.",
)
@click.option(
    "--semantic-cache",
    type=click.Choice(["on", "off", "model"]),
    help="Semantic cache for this key; 'model' (default) follows the model's setting.",
)
def keys_create(config_path: str | None, **options: Any) -> None:
    """Create a key and print its secret (shown only now)."""
    from sluice.keys.cli import create_key

    settings = _load_or_exit(config_path)
    click.echo(_run(create_key(settings, options)))


@keys.command("list")
@_config_option
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
def keys_list(config_path: str | None, include_revoked: bool) -> None:
    """List keys (never their secrets)."""
    from sluice.keys.cli import list_keys

    click.echo(_run(list_keys(_load_or_exit(config_path), include_revoked)))


@keys.command("update")
@_config_option
@click.argument("key_id")
@click.option("--team", help="Team whose keys may share cached answers.")
@click.option("--no-team", is_flag=True, help="The key belongs to no team.")
@click.option(
    "--cache-controls/--no-cache-controls",
    default=None,
    help="May requests steer the cache (Cache-Control, body 'cache')?",
)
@click.option(
    "--semantic-cache",
    type=click.Choice(["on", "off", "model"]),
    help="Semantic cache for this key; 'model' follows the model's setting.",
)
def keys_update(config_path: str | None, key_id: str, **options: Any) -> None:
    """Change a key's cache settings; running replicas drop their cached copy."""
    from sluice.keys.cli import update_key

    click.echo(_run(update_key(_load_or_exit(config_path), key_id, options)))


@keys.command("revoke")
@_config_option
@click.argument("key_id")
def keys_revoke(config_path: str | None, key_id: str) -> None:
    """Revoke a key; running replicas drop it from their caches."""
    from sluice.keys.cli import revoke_key

    click.echo(_run(revoke_key(_load_or_exit(config_path), key_id)))


@main.group()
def batches() -> None:
    """Batch jobs (OpenAI's Batch API), read and cancelled on the database."""


@batches.command("list")
@_config_option
@click.option("--status", help="Only batches in this status (in_progress, completed, …).")
@click.option("--key-id", help="Only this key's batches.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
def batches_list(
    config_path: str | None, status: str | None, key_id: str | None, limit: int
) -> None:
    """The newest batches of every key, one JSON object a line."""
    from sluice.batches.cli import list_batches

    click.echo(_run(list_batches(_load_or_exit(config_path), status, key_id, limit)))


@batches.command("show")
@_config_option
@click.argument("batch_id")
def batches_show(config_path: str | None, batch_id: str) -> None:
    """One batch: status, timestamps, line counts, files."""
    from sluice.batches.cli import show_batch

    click.echo(_run(show_batch(_load_or_exit(config_path), batch_id)))


@batches.command("cancel")
@_config_option
@click.argument("batch_id")
def batches_cancel(config_path: str | None, batch_id: str) -> None:
    """Cancel a batch in progress: no new line starts; it ends with partial results."""
    from sluice.batches.cli import cancel_batch

    click.echo(_run(cancel_batch(_load_or_exit(config_path), batch_id)))


@main.command()
@_config_option
@click.option(
    "--wait",
    type=click.FloatRange(0, 3600),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the database to answer (and, with --check, to be migrated).",
)
@click.option("--check", is_flag=True, help="Change nothing: exit 0 once the schema is current.")
def migrate(config_path: str | None, wait: float, check: bool) -> None:
    """Bring the database schema to this release's (one migrator at a time).

    Exits 1 when the database does not answer in time or a migration fails, 3 when --check
    gives up on a schema that is still behind."""
    from sluice.observability.logging import configure_logging
    from sluice.store.migrate_cli import MigrateFailed
    from sluice.store.migrate_cli import migrate as run_migrate

    settings = _load_or_exit(config_path)
    configure_logging(settings.logging.level)
    try:
        click.echo(asyncio.run(run_migrate(settings, wait, check)))
    except MigrateFailed as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@main.command()
@_config_option
@click.option("--key-id")
@click.option("--model")
@click.option("--since", type=click.DateTime(), help="From this time (UTC).")
@click.option("--group-by", default="key,model,day", show_default=True)
def usage(
    config_path: str | None,
    key_id: str | None,
    model: str | None,
    since: datetime | None,
    group_by: str,
) -> None:
    """Usage and spend by key, model and day."""
    from sluice.usage_cli import show_usage

    settings = _load_or_exit(config_path)
    click.echo(_run(show_usage(settings, key_id, model, since, group_by.split(","))))


def _run(work: Coroutine[Any, Any, str]) -> str:
    try:
        return asyncio.run(work)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except LookupError as exc:
        click.echo(f"error: {exc.args[0]}", err=True)
        sys.exit(1)
