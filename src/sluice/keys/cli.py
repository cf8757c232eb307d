"""What ``sluice keys …`` does: the key service, straight on the database.

Revocations and changes are published on Redis (when configured) so running replicas drop
the key from their caches at once; without Redis a running server notices within
``auth.key_cache_ttl`` seconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from sluice.keys.invalidation import KeyInvalidation
from sluice.keys.service import KeyService, KeySettings
from sluice.keys.store import KeyRecord, KeyStore
from sluice.services import database_for, redis_for
from sluice.settings import ConfigError, Settings

SEMANTIC_CACHE_CHOICES: dict[str, bool | None] = {"on": True, "off": False, "model": None}
"""``--semantic-cache`` values: opt the key in, out, or follow the model's setting."""


@asynccontextmanager
async def _opened(settings: Settings) -> AsyncIterator[KeyService]:
    database = database_for(settings)
    await database.start()
    redis = redis_for(settings)
    try:
        invalidation = KeyInvalidation(redis, lambda _: None)
        yield KeyService(KeyStore(database), invalidation)
    finally:
        if redis is not None:
            await redis.aclose()
        await database.close()


@contextmanager
def _checked() -> Iterator[None]:
    """Refused settings as a one-line error for the command line, not a traceback."""
    try:
        yield
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'value'}: {error['msg']}"
            for error in exc.errors(include_url=False, include_input=False)
        )
        raise ConfigError(f"invalid key settings: {problems}") from None


def _semantic_cache(choice: str) -> bool | None:
    if choice not in SEMANTIC_CACHE_CHOICES:
        raise ConfigError(
            f"--semantic-cache must be one of {', '.join(SEMANTIC_CACHE_CHOICES)}, not {choice!r}"
        )
    return SEMANTIC_CACHE_CHOICES[choice]


async def create_key(settings: Settings, options: dict[str, Any]) -> str:
    """``options``: the ``keys create`` flags; ``semantic_cache`` is a
    `SEMANTIC_CACHE_CHOICES` name, absent or None for the default."""
    metadata = dict(item.split("=", 1) for item in options.pop("meta", None) or () if "=" in item)
    models = options.pop("models", None)
    semantic = options.pop("semantic_cache", None)
    if semantic is not None:
        options["semantic_cache"] = _semantic_cache(semantic)
    with _checked():
        spec = KeySettings(
            models=[m.strip() for m in models.split(",") if m.strip()] if models else None,
            metadata=metadata,
            **{k: v for k, v in options.items() if v is not None},
        )
    async with _opened(settings) as service:
        record, secret = await service.create(spec)
    return (
        f"id:      {record.id}\nkey:     {secret}\n"
        "(the key is shown only now: store it somewhere safe)"
    )


async def update_key(settings: Settings, key_id: str, options: dict[str, Any]) -> str:
    """Change a key's cache settings. ``options``: ``team`` (None: unchanged), ``no_team``
    (clear it), ``cache_controls`` (None: unchanged) and ``semantic_cache`` (a
    `SEMANTIC_CACHE_CHOICES` name, None: unchanged)."""
    change: dict[str, Any] = {}
    if options.get("no_team"):
        if options.get("team") is not None:
            raise ConfigError("--team and --no-team cannot be given together")
        change["team"] = None
    elif options.get("team") is not None:
        change["team"] = options["team"]
    if options.get("cache_controls") is not None:
        change["cache_controls"] = options["cache_controls"]
    if options.get("semantic_cache") is not None:
        change["semantic_cache"] = _semantic_cache(options["semantic_cache"])
    if not change:
        raise ConfigError(
            "nothing to change: give --team, --no-team, --[no-]cache-controls or --semantic-cache"
        )
    with _checked():
        spec = KeySettings.model_validate(change)  # only these fields count as set
    async with _opened(settings) as service:
        record = await service.update(key_id, spec)
    if record is None:
        raise LookupError(f"no API key with id {key_id!r}")
    return f"updated {key_id}: {_cache_settings(record)}"


def _cache_settings(record: KeyRecord) -> str:
    semantic = next(k for k, v in SEMANTIC_CACHE_CHOICES.items() if v is record.semantic_cache)
    return (
        f"team={record.team if record.team is not None else '-'} "
        f"cache_controls={'on' if record.cache_controls else 'off'} semantic_cache={semantic}"
    )


async def list_keys(settings: Settings, include_revoked: bool) -> str:
    async with _opened(settings) as service:
        records = await service.store.list(include_revoked)
    lines = [
        f"{'ID':<18} {'KEY':<20} {'MODELS':<24} {'RPM':>6} {'TPM':>8} {'SPEND':>10} "
        f"{'BUDGET':>8}  {'STATE':<7}  {'TEAM':<16}  CACHE"
    ]
    now = datetime.now(UTC)
    for r in records:
        state = "revoked" if r.revoked_at else "expired" if not r.active(now) else "active"
        lines.append(
            f"{r.id:<18} {r.display:<20} {','.join(r.models or ['*']):<24.24} "
            f"{r.rpm or '-':>6} {r.tpm or '-':>8} {r.spend_usd:>10.4f} "
            f"{r.budget_usd if r.budget_usd is not None else '-':>8}  {state:<7}  "
            f"{r.team or '-':<16.16}  {_cache_flags(r)}"
        )
    return "\n".join(lines)


def _cache_flags(record: KeyRecord) -> str:
    """``controls`` when requests may steer the cache, then ``semantic`` or ``no-semantic``
    when the key overrides the model's semantic cache; ``-`` for neither."""
    flags = ["controls"] if record.cache_controls else []
    if record.semantic_cache is not None:
        flags.append("semantic" if record.semantic_cache else "no-semantic")
    return ",".join(flags) or "-"


async def revoke_key(settings: Settings, key_id: str) -> str:
    async with _opened(settings) as service:
        if await service.revoke(key_id) is None:
            raise LookupError(f"no API key with id {key_id!r}")
    return f"revoked {key_id}"
