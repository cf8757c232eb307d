"""Batch jobs: OpenAI's Files and Batch API, kept in the database and run by every replica.

    files.py       FileRecord, FileStore (metadata in ``files``), the content behind
                   FileContents: DiskContents (default) or DatabaseContents; owner_of
    files_api.py   /v1/files routes (multipart upload, list, retrieve, content, delete)
    settings.py    FilesSettings (``files:`` in the configuration)
    validate.py    a batch's input file checked whole, line by line
    store.py       batches and their lines: created whole, claimed with a lease
    runner.py      the workers that run claimed lines through the pipeline
    api.py         /v1/batches routes

The lead's modules are named here ahead of them; each says more in its own docstring.
"""
