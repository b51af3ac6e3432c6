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
    """An API the gateway serves; the value is the worker's path (vLLM serves the same paths)."""

    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    EMBEDDINGS = "/v1/embeddings"
    RESPONSES = "/v1/responses"
    MESSAGES = "/v1/messages"  # Anthropic Messages
    COUNT_TOKENS = "/v1/messages/count_tokens"  # Anthropic's token count: routed, never generates
    RERANK = "/rerank"  # vLLM's (Jina/Cohere-style) reranker; also served as /v1/rerank
    SCORE = "/score"  # vLLM's pair scoring; also served as /v1/score
    TOKENIZE = "/tokenize"  # vLLM's tokenizer: routed (the tier's tokenizer), never billed
    DETOKENIZE = "/detokenize"

    @property
    def label(self) -> str:
        """The name a policy's ``match: {endpoint: [..]}``, the ledger and the log use."""
        return _LABELS[self]

    @property
    def generates(self) -> bool:
        """Does the worker generate output tokens? (Reservations and estimates count them only then.)"""
        return self not in _NO_OUTPUT

    @property
    def anthropic(self) -> bool:
        """Errors on this endpoint are in Anthropic's shape, as its SDK expects."""
        return self is Endpoint.MESSAGES or self is Endpoint.COUNT_TOKENS


_LABELS = {
    Endpoint.CHAT: "chat",
    Endpoint.COMPLETIONS: "completions",
    Endpoint.EMBEDDINGS: "embeddings",
    Endpoint.RESPONSES: "responses",
    Endpoint.MESSAGES: "messages",
    Endpoint.COUNT_TOKENS: "count_tokens",
    Endpoint.RERANK: "rerank",
    Endpoint.SCORE: "score",
    Endpoint.TOKENIZE: "tokenize",
    Endpoint.DETOKENIZE: "detokenize",
}
ENDPOINTS = {label: endpoint for endpoint, label in _LABELS.items()}  # by label
_NO_OUTPUT = frozenset(
    {
        Endpoint.EMBEDDINGS,
        Endpoint.COUNT_TOKENS,
        Endpoint.RERANK,
        Endpoint.SCORE,
        Endpoint.TOKENIZE,
        Endpoint.DETOKENIZE,
    }
)
_NOT_BILLED = frozenset({Endpoint.COUNT_TOKENS, Endpoint.TOKENIZE, Endpoint.DETOKENIZE})
# vLLM's own endpoints name no model by default (it serves one): the gateway then routes as for "auto"
_DEFAULT_MODEL = "auto"


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


class EmbeddingRequest(msgspec.Struct):
    model: str
    input: str | list[Any] | None = None
    metadata: Metadata | None = None


class ResponseItem(msgspec.Struct):
    """An item of a Responses ``input``: a message (role, content) or a tool call's output."""

    role: str | None = None
    content: str | list[ContentPart] | None = None
    output: Any = None  # a string, or content parts


class ResponsesRequest(_Common):
    input: str | list[ResponseItem] | None = None
    instructions: str | None = None
    max_output_tokens: NonNegInt | None = None


class AnthropicMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None


class MessagesRequest(_Common):
    messages: list[AnthropicMessage] = msgspec.field(default_factory=list)
    system: str | list[ContentPart] | None = None


class RerankRequest(msgspec.Struct):
    """vLLM's rerank: one query against documents (strings, or ``{"text": …}`` objects)."""

    query: str | dict[str, Any]
    documents: list[str | dict[str, Any]]
    model: str = _DEFAULT_MODEL
    metadata: Metadata | None = None


ScoreSide = str | list[str | dict[str, Any]] | dict[str, Any]


class ScoreRequest(msgspec.Struct):
    """vLLM's score: pairs from ``queries``/``documents`` (or the older ``data_1``/``data_2``,
    ``text_1``/``text_2``) — one against many, or many against as many."""

    model: str = _DEFAULT_MODEL
    queries: ScoreSide | None = None
    documents: ScoreSide | None = None
    data_1: ScoreSide | None = None
    data_2: ScoreSide | None = None
    text_1: ScoreSide | None = None
    text_2: ScoreSide | None = None
    metadata: Metadata | None = None


class TokenizeRequest(msgspec.Struct):
    """vLLM's tokenize: a ``prompt``, or chat ``messages`` (then the chat template's framing counts)."""

    model: str = _DEFAULT_MODEL
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    metadata: Metadata | None = None


class DetokenizeRequest(msgspec.Struct):
    tokens: list[NonNegInt]
    model: str = _DEFAULT_MODEL
    metadata: Metadata | None = None


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


MAX_REPORTED_TOKENS = 1_000_000_000
ReportedTokens = Annotated[int, msgspec.Meta(ge=0, le=MAX_REPORTED_TOKENS)]
"""A token count as a worker reports it. A negative or absurd count is not believed: the usage is
read as missing, and the request is billed the gateway's own estimate instead (a worker must not
be able to make the ledger pay out, or bill a tenant a trillion dollars)."""


class TokenDetails(msgspec.Struct):
    """``prompt_tokens_details`` / ``input_tokens_details``: how many prompt tokens the worker's
    prefix cache served (vLLM reports them with ``--enable-prompt-tokens-details``)."""

    cached_tokens: ReportedTokens | None = None


class UsageOnly(msgspec.Struct):
    prompt_tokens: ReportedTokens = 0
    completion_tokens: ReportedTokens = 0
    prompt_tokens_details: TokenDetails | None = None

    @property
    def cached_tokens(self) -> int:
        """Cached prompt tokens as reported, within [0, prompt_tokens] (0 when not reported)."""
        details = self.prompt_tokens_details
        cached = details.cached_tokens if details is not None and details.cached_tokens is not None else 0
        return min(max(cached, 0), max(self.prompt_tokens, 0))


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
        parsed = _DECODERS[endpoint](endpoint, body)
    except msgspec.ValidationError as exc:
        message, param = _validation_message(exc)
        raise InvalidRequest(message, param=param) from None
    if not parsed.model:
        raise InvalidRequest("Invalid value for 'model': must not be empty.", param="model")
    return parsed


def _chat(endpoint: Endpoint, body: dict[str, Any]) -> ParsedRequest:
    req = msgspec.convert(body, ChatRequest)
    if "messages" not in body:
        raise InvalidRequest("Missing required parameter: 'messages'.", param="messages")
    texts: list[str] = []
    names = 0
    last_user = ""
    for m in req.messages:
        texts.append(m.role)
        if m.name:
            texts.append(m.name)
            names += 1
        text = _text(m.content)
        texts.append(text)
        if m.role == "user":
            last_user = text
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return _parsed(endpoint, body, req, max_tokens, texts, 0, len(req.messages), names, last_user)


def _completion(endpoint: Endpoint, body: dict[str, Any]) -> ParsedRequest:
    req = msgspec.convert(body, CompletionRequest)
    if req.prompt is None:
        raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt")
    texts, token_ids = _inputs(req.prompt, "prompt")
    return _parsed(endpoint, body, req, req.max_tokens, texts, token_ids, 0, 0, texts[-1] if texts else "")


def _embedding(endpoint: Endpoint, body: dict[str, Any]) -> ParsedRequest:
    req = msgspec.convert(body, EmbeddingRequest)
    if req.input is None:
        raise InvalidRequest("Missing required parameter: 'input'.", param="input")
    texts, token_ids = _inputs(req.input, "input")  # each item of a batch is counted
    return ParsedRequest(
        endpoint=endpoint,
        body=body,
        model=req.model,
        stream=False,  # embeddings do not stream
        client_wants_usage=False,
        max_tokens=None,
        completions=1,
        task=req.metadata.task if req.metadata else None,
        texts=tuple(texts),
        prompt_token_ids=token_ids,
        messages=0,
        names=0,
        last_user_text=texts[-1] if texts else "",
    )


def _response(endpoint: Endpoint, body: dict[str, Any]) -> ParsedRequest:
    req = msgspec.convert(body, ResponsesRequest)
    texts: list[str] = [req.instructions] if req.instructions else []
    messages = 0
    last_user = ""
    if isinstance(req.input, str):
        texts.append(req.input)
        messages, last_user = 1, req.input
    elif req.input is not None:
        for item in req.input:
            text = _text(item.content) if item.content is not None else _text(item.output)
            texts.append(text)
            messages += 1
            if item.role == "user":
                last_user = text
    else:
        raise InvalidRequest("Missing required parameter: 'input'.", param="input")
    return _parsed(endpoint, body, req, req.max_output_tokens, texts, 0, messages, 0, last_user)


def _message(endpoint: Endpoint, body: dict[str, Any]) -> ParsedRequest:
    req = msgspec.convert(body, MessagesRequest)
    if "messages" not in body:
        raise InvalidRequest("Missing required parameter: 'messages'.", param="messages")
    texts: list[str] = [_text(req.system)] if req.system else []
    last_user = ""
    for m in req.messages:
        texts.append(m.role)
        text = _text(m.content)
        texts.append(text)
        if m.role == "user":
            last_user = text
    max_tokens = None if endpoint is Endpoint.COUNT_TOKENS else req.max_tokens
    return _parsed(endpoint, body, req, max_tokens, texts, 0, len(req.messages), 0, last_user)


def _plain(
    endpoint: Endpoint,
    body: dict[str, Any],
    model: str,
    metadata: Metadata | None,
    texts: list[str],
    token_ids: int = 0,
    messages: int = 0,
    names: int = 0,
) -> ParsedRequest:
    """A request that is answered in one piece and generates nothing (rerank, score, tokenize)."""
    return ParsedRequest(
        endpoint=endpoint,
        body=body,
        model=model,
        stream=False,
        client_wants_usage=False,
        max_tokens=None,
        completions=1,
        task=metadata.task if metadata else None,
        texts=tuple(texts),
        prompt_token_ids=token_ids,
        messages=messages,
        names=names,
        last_user_text=texts[-1] if texts else "",
    )


def _side(value: ScoreSide) -> list[str]:
    """The texts of one side of a rerank/score pair: strings, or the ``text`` of content objects."""
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            text = item.get("text")
            out.append(text if isinstance(text, str) else "")
    return out


def _pairs(left: list[str], right: list[str], param: str) -> list[str]:
    """Every text the worker encodes: vLLM scores each (query, document) pair, so a query shared by
    N documents is encoded N times (1-to-N), or pairs are zipped (N-to-N)."""
    if len(left) == 1:
        left = left * len(right)
    if len(left) != len(right):
        raise InvalidRequest(
            f"Invalid value for '{param}': give one query, or as many queries as documents.", param=param
        )
    return [t for pair in zip(left, right, strict=True) for t in pair]


def _rerank(endpoint: Endpoint, body: dict[str, Any]) -> ParsedRequest:
    req = msgspec.convert(body, RerankRequest)
    texts = _pairs(_side(req.query), _side(req.documents), "documents")
    return _plain(endpoint, body, req.model, req.metadata, texts)


def _score(endpoint: Endpoint, body: dict[str, Any]) -> ParsedRequest:
    req = msgspec.convert(body, ScoreRequest)
    for left, right, name in (
        (req.queries, req.documents, "queries"),
        (req.data_1, req.data_2, "data_1"),
        (req.text_1, req.text_2, "text_1"),
    ):
        if left is not None and right is not None:
            texts = _pairs(_side(left), _side(right), name)
            return _plain(endpoint, body, req.model, req.metadata, texts)
    raise InvalidRequest("Missing required parameters: 'queries' and 'documents'.", param="queries")


def _tokenize(endpoint: Endpoint, body: dict[str, Any]) -> ParsedRequest:
    req = msgspec.convert(body, TokenizeRequest)
    if req.messages is not None:
        texts = [t for m in req.messages for t in (m.role, m.name or "", _text(m.content))]
        names = sum(1 for m in req.messages if m.name)
        return _plain(endpoint, body, req.model, req.metadata, texts, 0, len(req.messages), names)
    if req.prompt is None:
        raise InvalidRequest("Missing required parameter: 'prompt' (or 'messages').", param="prompt")
    return _plain(endpoint, body, req.model, req.metadata, [req.prompt])


def _detokenize(endpoint: Endpoint, body: dict[str, Any]) -> ParsedRequest:
    req = msgspec.convert(body, DetokenizeRequest)
    return _plain(endpoint, body, req.model, req.metadata, [], len(req.tokens))


def _text(content: str | list[ContentPart] | None) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.text for p in content if isinstance(p, ContentPart) and p.text)
    return ""


def _inputs(value: str | list[Any], param: str) -> tuple[list[str], int]:
    """Prompt texts and token-id count of a completions ``prompt`` or an embeddings ``input``:
    a string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(value, str):
        return [value], 0
    if all(isinstance(p, str) for p in value):
        return list(value), 0
    if all(isinstance(p, int) and not isinstance(p, bool) for p in value):
        return [], len(value)
    if all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in value):
        return [], sum(len(p) for p in value)
    raise InvalidRequest(
        f"Invalid value for '{param}': expected a string, a list of strings, or token ids.", param=param
    )


def _parsed(
    endpoint: Endpoint,
    body: dict[str, Any],
    req: _Common,
    max_tokens: int | None,
    texts: list[str],
    token_ids: int,
    messages: int,
    names: int,
    last_user: str,
) -> ParsedRequest:
    stream = req.stream and endpoint is not Endpoint.COUNT_TOKENS
    return ParsedRequest(
        endpoint=endpoint,
        body=body,
        model=req.model,
        stream=stream,
        client_wants_usage=bool(req.stream_options and req.stream_options.include_usage),
        max_tokens=max_tokens,
        completions=max(req.n or 1, req.best_of or 1),
        task=req.metadata.task if req.metadata else None,
        texts=tuple(texts),
        prompt_token_ids=token_ids,
        messages=messages,
        names=names,
        last_user_text=last_user,
    )


_DECODERS = {
    Endpoint.CHAT: _chat,
    Endpoint.COMPLETIONS: _completion,
    Endpoint.EMBEDDINGS: _embedding,
    Endpoint.RESPONSES: _response,
    Endpoint.MESSAGES: _message,
    Endpoint.COUNT_TOKENS: _message,
    Endpoint.RERANK: _rerank,
    Endpoint.SCORE: _score,
    Endpoint.TOKENIZE: _tokenize,
    Endpoint.DETOKENIZE: _detokenize,
}


_encode = msgspec.json.Encoder().encode


def upstream_body(parsed: ParsedRequest, served_model: str, priority: int | None = None) -> bytes:
    """The client's body for the worker: ``model`` rewritten, usage always asked for on chat and
    completions streams (Responses and Messages streams always carry it), and the request's
    ``priority`` for workers that schedule by it (vLLM's ``--scheduling-policy priority``)."""
    body = dict(parsed.body)
    body["model"] = served_model
    if priority is not None:
        body["priority"] = int(priority)
    if parsed.stream and parsed.endpoint in _ASKS_USAGE:
        opts = body.get("stream_options")
        body["stream_options"] = {**opts, "include_usage": True} if isinstance(opts, dict) else {"include_usage": True}
    return _encode(body)


_ASKS_USAGE = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS})
_usage_decoder = msgspec.json.Decoder(UsageEnvelope)


def read_usage(payload: bytes) -> UsageOnly | None:
    """The ``usage`` object of a worker's JSON reply or stream chunk, if it has one."""
    try:
        return _usage_decoder.decode(payload).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


class InputOutputUsage(msgspec.Struct):
    """Responses' and Anthropic Messages' usage: ``input_tokens`` and ``output_tokens``."""

    input_tokens: ReportedTokens = 0
    output_tokens: ReportedTokens = 0
    input_tokens_details: TokenDetails | None = None

    def usage(self) -> UsageOnly:
        return UsageOnly(self.input_tokens, self.output_tokens, self.input_tokens_details)


class _InputOutputEnvelope(msgspec.Struct):
    id: str | None = None
    usage: InputOutputUsage | None = None


_io_decoder = msgspec.json.Decoder(_InputOutputEnvelope)


def read_answer(endpoint: Endpoint, payload: bytes) -> tuple[UsageOnly | None, str | None]:
    """A worker's whole (non-streaming) answer: its usage, and for Responses its id (so that
    ``GET /v1/responses/{id}`` can be routed back to this worker)."""
    if endpoint in _OPENAI_USAGE:
        return read_usage(payload), None
    if endpoint in _NOT_BILLED:
        return UsageOnly(0, 0), None  # counting generates nothing and is not billed
    if endpoint is Endpoint.RERANK:
        return _read_rerank(payload), None
    try:
        answer = _io_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None, None
    usage = answer.usage.usage() if answer.usage is not None else None
    return usage, answer.id if endpoint is Endpoint.RESPONSES else None


_OPENAI_USAGE = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS, Endpoint.SCORE})


class _RerankUsage(msgspec.Struct):
    total_tokens: ReportedTokens = 0
    prompt_tokens: ReportedTokens | None = None


class _RerankEnvelope(msgspec.Struct):
    usage: _RerankUsage | None = None


_rerank_decoder = msgspec.json.Decoder(_RerankEnvelope)


def _read_rerank(payload: bytes) -> UsageOnly | None:
    """Rerank's usage is ``{"total_tokens"}``: all of it input (a reranker generates nothing)."""
    try:
        usage = _rerank_decoder.decode(payload).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if usage is None:
        return None
    return UsageOnly(usage.prompt_tokens if usage.prompt_tokens is not None else usage.total_tokens, 0)
