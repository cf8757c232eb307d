"""Caching and request coalescing (docs/caching.md).

key.py       the exact key: a hash of everything that can change the answer
controls.py  the request's Cache-Control / body ``cache`` field
answer.py    a stored answer, and serving it as a stream or a complete body
tiers.py     memory LRU with a byte budget, then Redis (shared by replicas)
flight.py    identical requests in flight share one upstream call
semantic.py  the semantic cache: same scope, similar last turn, second check
verify.py    the second check on a semantic candidate (numbers, names, negation)
step.py      the pipeline step that ties them together
build.py     the cache built from settings, once, in the app
"""
