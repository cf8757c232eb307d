"""Virtual API keys, in one place.

- `format`: the secret's format (prefix, checksum), its stored hash and how it is shown
- `store`: `KeyRecord` and `KeyStore`, the ``api_keys`` table
- `service`: `KeyService` and `KeySettings`, what the admin API and the CLI both call
- `invalidation`: revocations and changes reaching every replica's key cache
- `admin_api`: the ``/admin/keys`` routes (mounted behind the master key by `sluice.api.admin`)
- `cli`: what ``sluice keys …`` does

Checking a request's key is the pipeline's job (`sluice.pipeline.auth`).
"""
