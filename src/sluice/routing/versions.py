"""Model versions: an alias's traffic split across the models that serve it (a canary).

Without stickiness each request draws a version at random in proportion to the weights.
With it, a user (or session) keeps its version while the weights stand, by weighted
rendezvous hashing: every version scores the user with a hash of (version, user), as
``weight / -ln(u)`` for that hash read as a uniform ``u`` in (0, 1), and the highest score
wins. Each version wins with probability ``weight / total`` (the scores are exponential
variables with rate ``1 / weight``), the choice needs no table and no coordination between
processes or replicas (the hash is keyed by names only), and when the weights change the
only users that move are those the change must move: going from 90/10 to 80/20 moves
about 10% of users, all from the first version to the second, and none back.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from sluice.routing.settings import AliasSettings, ShadowSettings, StickySettings, check_weights

MAX_STICKY_KEY = 256
"""Characters of a user id or header value that are hashed: a longer one (hostile, or a
whole document) costs no more than this."""

_UNIT = 1.0 / (2**53 + 1)
"""Maps a 53-bit hash ``h`` to ``(h + 1) * _UNIT``, strictly inside (0, 1): ln is finite."""


@dataclass(frozen=True, slots=True)
class Alias:
    name: str
    versions: tuple[tuple[str, float], ...]
    """(model, weight) in the configured order; weights are relative, at least one > 0."""
    sticky: StickySettings | None = None
    shadow: ShadowSettings | None = None
    _models: list[str] = field(init=False, repr=False, compare=False)
    _cumulative: list[float] = field(init=False, repr=False, compare=False)
    _salts: tuple[tuple[bytes, float, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        weights = [weight for _, weight in self.versions]
        check_weights(self.name, weights)
        running, cumulative = 0.0, []
        for weight in weights:
            running += weight
            cumulative.append(running)
        object.__setattr__(self, "_models", [model for model, _ in self.versions])
        object.__setattr__(self, "_cumulative", cumulative)
        salts = tuple(
            (model.encode() + b"\x00", weight, model) for model, weight in self.versions if weight
        )
        object.__setattr__(self, "_salts", salts)

    @classmethod
    def of(cls, settings: AliasSettings) -> Alias:
        versions = tuple((v.model, v.weight) for v in settings.versions)
        return cls(settings.name, versions, settings.sticky, settings.shadow)

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.versions)

    def choose(self, rng: random.Random, sticky_key: str | None = None) -> str:
        """The version that serves a request: the sticky key's, or a weighted random one
        (also for a sticky alias's request that carries no key)."""
        if sticky_key is not None:
            return self.rendezvous(sticky_key)
        cumulative = self._cumulative
        return self._models[bisect.bisect_right(cumulative, rng.random() * cumulative[-1])]

    def rendezvous(self, key: str) -> str:
        """The version with the highest weighted score for ``key`` (see the module's doc)."""
        data = key[:MAX_STICKY_KEY].encode("utf-8", "surrogatepass")
        best, chosen = -1.0, ""
        for salt, weight, model in self._salts:
            digest = hashlib.blake2b(salt + data, digest_size=8).digest()
            u = ((int.from_bytes(digest, "big") >> 11) + 1) * _UNIT
            score = weight / -math.log(u)
            if score > best:
                best, chosen = score, model
        return chosen

    def reweighted(self, weights: Mapping[str, float]) -> Alias:
        """This alias with some versions' weights changed (others keep theirs); raises
        ValueError for a model that is not one of its versions or weights that cannot
        split traffic."""
        unknown = sorted(set(weights) - set(self._models))
        if unknown:
            raise ValueError(f"alias {self.name!r} has no version {unknown[0]!r}")
        versions = tuple((model, weights.get(model, weight)) for model, weight in self.versions)
        return Alias(self.name, versions, self.sticky, self.shadow)
