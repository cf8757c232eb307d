"""The OpenAPI document: FastAPI's (the admin API) plus the OpenAI routes.

The /v1 routes are plain Starlette routes that read the raw body (`sluice.api.openai`), so
FastAPI never sees them; their operations are added here, from request models that exist
for the document alone and state the bounds `sluice.protocol` enforces. Nothing here runs
per request: the document is built once, on its first read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from sluice.protocol import MAX_N, MAX_TOKENS, SEED_RANGE

NonEmpty = Field(min_length=1)
TokenCount = Annotated[int | None, Field(ge=1, le=MAX_TOKENS)]
ChoiceCount = Annotated[int | None, Field(ge=1, le=MAX_N)]
Stop = str | Annotated[list[str], Field(max_length=4)] | None


class _Passthrough(BaseModel):
    """Fields the gateway does not read are passed to the upstream untouched."""

    model_config = ConfigDict(extra="allow")


class StreamOptions(_Passthrough):
    include_usage: bool | None = None


class ChatMessage(_Passthrough):
    role: Annotated[str, NonEmpty]
    content: str | list[Any] | None = None


class _Sampling(_Passthrough):
    model: Annotated[str, NonEmpty]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: TokenCount = None
    max_completion_tokens: TokenCount = None
    n: ChoiceCount = None
    temperature: Annotated[float | None, Field(ge=0, le=2)] = None
    top_p: Annotated[float | None, Field(ge=0, le=1)] = None
    seed: Annotated[int | None, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] = None
    stop: Stop = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], NonEmpty]


TokenInput = (
    str
    | Annotated[list[str], NonEmpty]
    | Annotated[list[int], NonEmpty]
    | Annotated[list[Annotated[list[int], NonEmpty]], NonEmpty]
)


class CompletionRequest(_Sampling):
    prompt: TokenInput
    best_of: ChoiceCount = None


class EmbeddingRequest(_Passthrough):
    model: Annotated[str, NonEmpty]
    input: TokenInput
    encoding_format: str | None = Field(None, pattern="^(float|base64)$")
    dimensions: Annotated[int | None, Field(ge=1)] = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


Metadata = Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)]


class BatchRequest(BaseModel):
    """``POST /v1/batches`` (`sluice.batches.api`): the input file is validated whole."""

    input_file_id: Annotated[str, NonEmpty]
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: Literal["24h"]
    metadata: (
        Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None
    ) = None


class FileUpload(BaseModel):
    """``POST /v1/files``, as multipart/form-data."""

    file: bytes = Field(json_schema_extra={"format": "binary"})
    purpose: Literal["batch"]


_MODELS = (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ErrorEnvelope,
    BatchRequest,
    FileUpload,
)
_REF = "#/components/schemas/{model}"
_ERRORS = {
    "400": "invalid request (the field is named in error.param)",
    "401": "missing or unknown API key",
    "403": "the key may not use this model",
    "404": "unknown model",
    "413": "body over server.max_body_bytes",
    "429": "rate limit or budget reached",
    "502": "upstream failure",
    "503": "draining or overloaded",
    "504": "upstream timeout",
}
_SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}]


def install_openapi(api: FastAPI, model_names: Sequence[str], *, batches: bool = False) -> None:
    """Make ``api.openapi()`` the whole document: admin routes and the OpenAI routes (the
    Files and Batch APIs' too when ``batches``)."""

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            document = get_openapi(
                title=api.title, version=api.version, summary=api.summary, routes=api.routes
            )
            _add_openai(document, list(model_names))
            if batches:
                _add_batches(document)
            api.openapi_schema = document
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]


def _add_openai(document: dict[str, Any], model_names: list[str]) -> None:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in _MODELS:
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    for name in ("ChatCompletionRequest", "CompletionRequest", "EmbeddingRequest"):
        if model_names:
            schemas[name]["properties"]["model"]["examples"] = model_names
    document["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    for path in document["paths"].values():
        for operation in path.values():
            operation["security"] = _SECURITY
            _errors_are_400(operation)
    sse = {"text/event-stream": {"schema": {"type": "string"}}}
    chat = _post("createChatCompletion", "ChatCompletionRequest", sse)
    document["paths"] = {
        "/v1/chat/completions": {"post": chat},
        "/v1/completions": {"post": _post("createCompletion", "CompletionRequest", sse)},
        "/v1/embeddings": {"post": _post("createEmbedding", "EmbeddingRequest", {})},
        "/v1/models": {"get": _get("listModels", [])},
        "/v1/models/{model}": {
            "get": _get(
                "retrieveModel",
                [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            )
        },
        **document["paths"],
    }


def _add_batches(document: dict[str, Any]) -> None:
    """The Files and Batch APIs (`sluice.batches`): OpenAI's objects, the caller's own."""

    def path_id(name: str) -> list[dict[str, Any]]:
        return [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}]

    def tagged(operation: dict[str, Any]) -> dict[str, Any]:
        return {**operation, "tags": ["batches"]}

    page = [
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
        {"name": "after", "in": "query", "schema": {"type": "string"}},
    ]
    upload = tagged(_post("createFile", "FileUpload", {}))
    upload["requestBody"] = {
        "required": True,
        "content": {"multipart/form-data": {"schema": {"$ref": _REF.format(model="FileUpload")}}},
    }
    content = tagged(_get("downloadFile", path_id("file_id")))
    content["responses"]["200"]["content"] = {"application/octet-stream": {"schema": {}}}
    delete = tagged(_get("deleteFile", path_id("file_id")))
    document["paths"] |= {
        "/v1/files": {"post": upload, "get": tagged(_get("listFiles", page))},
        "/v1/files/{file_id}": {
            "get": tagged(_get("retrieveFile", path_id("file_id"))),
            "delete": delete,
        },
        "/v1/files/{file_id}/content": {"get": content},
        "/v1/batches": {
            "post": tagged(_post("createBatch", "BatchRequest", {})),
            "get": tagged(_get("listBatches", page)),
        },
        "/v1/batches/{batch_id}": {"get": tagged(_get("retrieveBatch", path_id("batch_id")))},
        "/v1/batches/{batch_id}/cancel": {
            "post": tagged({**_get("cancelBatch", path_id("batch_id"))})
        },
    }


def _errors_are_400(operation: dict[str, Any]) -> None:
    """FastAPI documents its validation errors as 422; Sluice answers them as OpenAI does
    (400, the error envelope: `sluice.api.errors.validation_error`)."""
    responses = operation.get("responses", {})
    if "422" in responses:
        del responses["422"]
        responses["400"] = _error("400")


def _error(status: str) -> dict[str, Any]:
    return {
        "description": _ERRORS[status],
        "content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorEnvelope")}}},
    }


def _responses(extra: dict[str, Any]) -> dict[str, Any]:
    ok = {"application/json": {"schema": {"type": "object"}}, **extra}
    return {"200": {"description": "the upstream's answer", "content": ok}} | {
        status: _error(status) for status in _ERRORS
    }


def _post(operation_id: str, request: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "tags": ["openai"],
        "operationId": operation_id,
        "security": _SECURITY,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": _REF.format(model=request)}}},
        },
        "responses": _responses(extra),
    }


def _get(operation_id: str, parameters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "tags": ["openai"],
        "operationId": operation_id,
        "security": _SECURITY,
        "parameters": parameters,
        "responses": _responses({}),
    }
