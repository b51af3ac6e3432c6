"""OpenAI wire types: what a client request must look like, and what the gateway reads of worker replies.

``decode_request`` is the parse stage: raw body bytes → ``ParsedRequest``. The body is decoded once
into a plain dict (so fields the gateway does not know — vLLM's ``top_k``, structured-output
options, ``metadata`` — reach the worker untouched) and the fields the gateway relies on are
checked against the structs below. Anything malformed raises ``InvalidRequest`` (400), including a
body nested deeper than ``jsondepth.MAX_DEPTH`` and a number too large for a float (``1e999``).
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import msgspec

from gateway import jsondepth
from gateway.errors import InvalidRequest


class Endpoint(Enum):
    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class Metadata(msgspec.Struct):
    task: str | None = None


NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]


class _Common(msgspec.Struct):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: NonNegInt | None = None
    metadata: Metadata | None = None
    n: PosInt | None = None  # completions per request: each is generated, and billed, in full
    best_of: PosInt | None = None  # completions generated server-side, the best n returned


class ChatRequest(_Common):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)] = msgspec.field(default_factory=list)
    max_completion_tokens: NonNegInt | None = None


class CompletionRequest(_Common):
    prompt: str | list[Any] | None = None


class ParsedRequest(msgspec.Struct, frozen=True):
    endpoint: Endpoint
    body: dict[str, Any]  # the client's JSON object, as sent
    model: str
    stream: bool
    client_wants_usage: bool
    max_tokens: int | None
    completions: int  # sequences the worker generates: max(n, best_of), at least 1
    task: str | None
    texts: tuple[str, ...]  # every piece of prompt text, for counting
    prompt_token_ids: int  # prompts sent as token ids are counted directly
    messages: int  # chat messages (each costs a few tokens of framing)
    names: int
    last_user_text: str


class UsageOnly(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class UsageEnvelope(msgspec.Struct):
    usage: UsageOnly | None = None


_decode_dict = msgspec.json.Decoder(dict[str, Any])
_decode_fields = msgspec.json.Decoder(dict[str, msgspec.Raw])
_decode_value = msgspec.json.Decoder()


def _out_of_range(raw: bytes) -> str | None:
    """The top-level field holding a number no float can hold (msgspec names no field for it)."""
    try:
        fields = _decode_fields.decode(raw)
        for name, value in fields.items():
            try:
                _decode_value.decode(value)
            except msgspec.ValidationError:
                return name
    except (msgspec.DecodeError, RecursionError):
        pass
    return None


def _not_decodable(raw: bytes, exc: msgspec.ValidationError) -> InvalidRequest:
    if str(exc).startswith("Number out of range"):
        param = _out_of_range(raw)
        where = f"Invalid value for '{param}'" if param else "Invalid number"
        return InvalidRequest(
            f"{where}: the number is out of range (JSON numbers must fit a 64-bit float).", param=param
        )
    return InvalidRequest("The request body must be a JSON object.")


def _validation_message(exc: msgspec.ValidationError) -> tuple[str, str | None]:
    text = str(exc)
    msg, _, where = text.partition(" - at `$")
    param = where.rstrip("`").lstrip(".") or None
    if msg.startswith("Object missing required field"):
        field = msg.split("`")[1]
        return f"Missing required parameter: '{field}'.", field
    return f"Invalid value for '{param}': {msg}." if param else f"{msg}.", param


def decode_request(endpoint: Endpoint, raw: bytes) -> ParsedRequest:
    try:
        body = jsondepth.decode(raw, _decode_dict)
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not valid UTF-8.") from None
    except msgspec.ValidationError as exc:
        raise _not_decodable(raw, exc) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from None
    try:
        if endpoint is Endpoint.CHAT:
            req: ChatRequest | CompletionRequest = msgspec.convert(body, ChatRequest)
        else:
            req = msgspec.convert(body, CompletionRequest)
    except msgspec.ValidationError as exc:
        message, param = _validation_message(exc)
        raise InvalidRequest(message, param=param) from None

    texts: list[str] = []
    token_ids = 0
    messages = names = 0
    last_user = ""
    if isinstance(req, ChatRequest):
        if "messages" not in body:
            raise InvalidRequest("Missing required parameter: 'messages'.", param="messages")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        messages = len(req.messages)
        for m in req.messages:
            texts.append(m.role)
            if m.name:
                texts.append(m.name)
                names += 1
            content = m.content
            if isinstance(content, str):
                text = content
            elif content:
                text = "".join(p.text for p in content if p.text)
            else:
                text = ""
            texts.append(text)
            if m.role == "user":
                last_user = text
    else:
        max_tokens = req.max_tokens
        prompt = req.prompt
        if prompt is None:
            raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt")
        if isinstance(prompt, str):
            texts.append(prompt)
            last_user = prompt
        elif all(isinstance(p, str) for p in prompt):
            texts.extend(prompt)
            last_user = prompt[-1] if prompt else ""
        elif all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            token_ids = len(prompt)
        elif all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            token_ids = sum(len(p) for p in prompt)
        else:
            raise InvalidRequest(
                "Invalid value for 'prompt': expected a string, a list of strings, or token ids.",
                param="prompt",
            )
    if not req.model:
        raise InvalidRequest("Invalid value for 'model': must not be empty.", param="model")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return ParsedRequest(
        endpoint=endpoint,
        body=body,
        model=req.model,
        stream=req.stream,
        client_wants_usage=include_usage,
        max_tokens=max_tokens,
        completions=max(req.n or 1, req.best_of or 1),
        task=req.metadata.task if req.metadata else None,
        texts=tuple(texts),
        prompt_token_ids=token_ids,
        messages=messages,
        names=names,
        last_user_text=last_user,
    )


_encode = msgspec.json.Encoder().encode


def upstream_body(parsed: ParsedRequest, served_model: str) -> bytes:
    """The client's body for the worker: ``model`` rewritten, and usage always asked for on streams."""
    body = dict(parsed.body)
    body["model"] = served_model
    if parsed.stream:
        opts = body.get("stream_options")
        body["stream_options"] = {**opts, "include_usage": True} if isinstance(opts, dict) else {"include_usage": True}
    return _encode(body)


_usage_decoder = msgspec.json.Decoder(UsageEnvelope)


def read_usage(payload: bytes) -> UsageOnly | None:
    """The ``usage`` object of a worker's JSON reply or stream chunk, if it has one."""
    try:
        return _usage_decoder.decode(payload).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
