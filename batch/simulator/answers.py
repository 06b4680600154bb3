"""What the simulated model answers: pure functions of the request (`answer_for`, `completion_for`), the
fault markers a prompt carries (`markers_of`), the parsed chat request (`parse_chat`), and the checks of
a strict schema. The HTTP server (server.py) and the Batch API (batches.py) both answer through these."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
from typing import Any

_CJK = "\u3400-\u9fff\uf900-\ufaff"
_TOKEN_RE = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+|[^\\w\\s]")
_MARKER_RE = re.compile(
    r"\[\[(error|flaky|malformed|nochoices|hang|reset|slow|bigbody|bigstream|"
    r"cutstream|garbagechunk|errorchunk|stall|nodone|nostream|tornend|badjson|fenced|toolcalls|reply|"
    r"eol|split|ctype|ssefields|datalines|nodelta|bom|fewerchoices|paidfail)(?::([^\]]*))?\]\]")
_SCHEMA_BLOCK_RE = re.compile(r"```json\s*(.*?)\s*```", re.DOTALL)
_SET_RE = re.compile(r"\[\[set:([\w.]+)=([^\]]*)\]\]")
_MALFORMED_BODY = b'{"id": "x", "choices": ['
_STREAM_CHUNK = 64 * 1024
_SSE_PIECE_CHARS = 16  # the text a server-sent event carries: a few tokens, as a model streams them
_LINE_ENDINGS = {"lf": (b"\n",), "crlf": (b"\r\n",), "cr": (b"\r",), "mixed": (b"\n", b"\r\n", b"\r")}
# Codes that mean "slow down"; only these get a Retry-After header.
_RATE_LIMIT_CODES = frozenset({"1302", "1303", "1305"})
_MESSAGES = {
    "1000": "身份验证失败 / authentication failed",
    "1113": "您的账户已欠费，请充值后重试 / account in arrears",
    "1200": "服务内部错误 / internal error (simulated)",
    "1214": "请求参数非法 / invalid request body",
    "1301": "系统检测到输入或生成内容可能包含不安全或敏感内容",
    "1302": "您当前使用该API的并发数过高 / concurrency limit",
    "1305": "该模型当前访问量过大，请您稍后再试 / service overloaded",
}
# How long stop() lets in-flight handlers finish before cancelling them (hangs never finish).
_SHUTDOWN_GRACE_S = 0.2


def count_tokens(text: str) -> int:
    """Approximate token count, stable and cheap.

    Each CJK character (U+3400-U+9FFF, U+F900-U+FAFF) is one token; every other maximal
    run of word characters (``\\w+`` minus CJK) is one token; every other non-space
    character (punctuation, symbols, CJK punctuation such as "，") is one token.
    Whitespace is free.  Example: ``count_tokens("你好, world!") == 5``.
    """
    return len(_TOKEN_RE.findall(text))


def _number(text: str, default: float) -> float:
    """Marker arguments are typed by hand; a typo should not crash the handler."""
    try:
        return float(text)
    except ValueError:
        return default


def _text(content: Any) -> str:
    """Text of a message content, which may be a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """Content of the last user message ("" if none): the prompt key for stats and markers."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text(message.get("content"))
    return ""


def answer_for(model: str, messages: list[dict[str, Any]]) -> str:
    """The deterministic reply text; identical across processes and runs."""
    canonical = json.dumps(messages, ensure_ascii=False, sort_keys=True)
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:10]
    return f"[{model}] reply {digest} to: {last_user_text(messages)[:32]}"


LABELS = ("positive", "negative", "neutral")


def json_answer_for(model: str, messages: list[dict[str, Any]]) -> str:
    """The reply under response_format json_object: an object with a label and the plain reply."""
    answer = answer_for(model, messages)
    label = LABELS[int(hashlib.sha256(answer.encode()).hexdigest(), 16) % len(LABELS)]
    return json.dumps({"label": label, "reply": answer}, ensure_ascii=False)


def requested_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON Schema a request asks its answer to match: response_format json_schema's, or under json_object the
    last ```json block of a system message that holds an object (where batch writes it for Zhipu)."""
    response_format = body.get("response_format")
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_schema":
        wrapper = response_format.get("json_schema")
        schema = wrapper.get("schema") if isinstance(wrapper, dict) else None
        return schema if isinstance(schema, dict) else None
    if response_format.get("type") != "json_object":
        return None
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "system":
            for block in reversed(_SCHEMA_BLOCK_RE.findall(_text(message.get("content")))):
                try:
                    schema = json.loads(block)
                except ValueError:
                    continue
                if isinstance(schema, dict):
                    return schema
    return None


def schema_answer_for(model: str, messages: list[dict[str, Any]], schema: dict[str, Any],
                      violate: bool = False) -> str:
    """A JSON value that matches `schema`, a pure function of the request (see `conforming`); `violate`: the same
    with the first required key (else the first key) of the wrong type (a number for a string, text otherwise)."""
    seed = hashlib.sha256(answer_for(model, messages).encode()).hexdigest()
    value = conforming(schema, seed, "$")
    properties = schema.get("properties")
    if violate and isinstance(value, dict) and isinstance(properties, dict) and properties:
        required = [key for key in schema.get("required") or [] if key in properties]
        key = required[0] if required else next(iter(properties))
        value[key] = 12345 if (properties[key] or {}).get("type") == "string" else "not what the schema says"
    return json.dumps(value, ensure_ascii=False)


def conforming(schema: Any, seed: str, where: str, root: Any = None) -> Any:
    """A value matching `schema` at JSON path `where`, drawn from a hash of (seed, where).

    Kept simple: type, properties and required (an optional key is left out for about half the answers),
    items, minItems and maxItems, enum and const, minimum and maximum, anyOf and oneOf (the first branch that is
    not null; null past a depth of 6, so a recursive schema ends), a `$ref` into the schema (`root`, the schema
    itself unless given). Other constraints (patterns, lengths, formats) are not followed.
    """
    draw = int(hashlib.sha256(f"{seed}:{where}".encode()).hexdigest()[:12], 16)
    if not isinstance(schema, dict):
        return None
    root = schema if root is None else root
    if isinstance(schema.get("$ref"), str):
        return conforming(_pointed(root, schema["$ref"]), seed, where, root)
    deep = where.count(".") + where.count("[") > 6
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][draw % len(schema["enum"])]
    for key in ("anyOf", "oneOf"):
        branches = [b for b in schema.get(key) or [] if isinstance(b, dict) and b.get("type") != "null"]
        if deep and len(branches) < len(schema.get(key) or []):
            return None
        if branches:
            return conforming(branches[0], seed, where, root)
    kind = schema.get("type") or ("object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = "null" if deep and "null" in kind else next((k for k in kind if k != "null"), "null")
    if kind == "object":
        required = set(schema.get("required") or [])
        value = {}
        for name, sub in (schema.get("properties") or {}).items():
            here = f"{where}.{name}"
            keep = name in required or int(hashlib.sha256(f"{seed}:{here}?".encode()).hexdigest()[:8], 16) % 2
            if keep:
                value[name] = conforming(sub, seed, here, root)
        return value
    if kind == "array":
        low = int(schema.get("minItems", 1))
        count = max(low, min(int(schema.get("maxItems", low + 2)), low + draw % 3))
        return [conforming(schema.get("items") or {}, seed, f"{where}[{i}]", root) for i in range(count)]
    if kind in ("integer", "number"):
        low = schema.get("minimum", 0)
        high = schema.get("maximum", low + 99)
        if kind == "integer":
            return int(low) + draw % (int(high) - int(low) + 1)
        return low + (draw % 1000) / 1000 * (high - low)
    if kind == "boolean":
        return draw % 2 == 0
    if kind == "null":
        return None
    return f"{where.rsplit('.', 1)[-1]} {draw % 10000}"


def _pointed(root: Any, ref: str) -> Any:
    """What a `#/...` reference points at in `root` ({} when nothing: any value)."""
    if not ref.startswith("#"):
        return {}
    node = root
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return {}
        node = node[part]
    return node


def completion_for(model: str, messages: list[dict[str, Any]], max_tokens: int | None,
                   json_mode: bool = False, schema: dict[str, Any] | None = None, violate: bool = False,
                   fenced: bool = False) -> dict[str, Any]:
    """Content, finish_reason and usage the simulator returns for a request.

    json_mode (the request asked for response_format json_object or json_schema) answers a JSON object: one
    that matches `schema` when the request gives one (`requested_schema`), unless the prompt carries
    [[badjson]], which answers plain text as a model that ignores the format would. `violate` (the first N
    answers of [[badjson:N]]) answers JSON that does not match the schema, or plain text without one (or without
    properties to get wrong). `fenced`
    ([[fenced]]) wraps a JSON answer in a Markdown code fence.
    """
    bad_json = "[[badjson]]" in last_user_text(messages) or (violate and not (schema or {}).get("properties"))
    if not json_mode or bad_json:
        answer = answer_for(model, messages)
    else:
        answer = json_answer_for(model, messages) if schema is None else schema_answer_for(model, messages, schema,
                                                                                           violate)
        if fenced:
            answer = f"```json\n{answer}\n```"
    prompt_tokens = sum(count_tokens(_text(m.get("content"))) + 3 for m in messages)
    completion_tokens = count_tokens(answer)
    finish_reason = "stop"
    if max_tokens is not None and completion_tokens > max_tokens:
        # Cut the original string after the max_tokens-th token so the result stays a
        # readable prefix of the full answer and re-counts to exactly max_tokens.
        keep = max(max_tokens, 0)
        end = 0
        for i, match in enumerate(_TOKEN_RE.finditer(answer)):
            if i == keep:
                break
            end = match.end()
        answer, completion_tokens, finish_reason = answer[:end], keep, "length"
    return {"content": answer, "finish_reason": finish_reason,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """The parts of a chat completions request body that shape the answer."""

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None
    json_mode: bool  # response_format json_object or json_schema
    prompt: str  # the last user message: the key for stats and markers
    stream: bool = False  # answer with server-sent events
    include_usage: bool = False  # stream_options.include_usage: usage in a chunk of its own (the /v1 dialect)
    schema: dict[str, Any] | None = None  # the JSON Schema the answer is asked to match (requested_schema)
    tools: tuple[str, ...] = ()  # the names of the functions in `tools`, which [[toolcalls:N]] calls
    n: int = 1  # how many choices to answer with


def parse_chat(body: Any) -> ChatRequest:
    """A request body as the simulator reads it; raises ValueError, KeyError or TypeError when it is not one."""
    messages = body["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a non-empty list of objects")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    options = body.get("stream_options")
    response_format = body.get("response_format") or {}
    if not isinstance(response_format, dict):
        raise TypeError("response_format must be an object")
    json_mode = response_format.get("type") in ("json_object", "json_schema")
    return ChatRequest(model=str(body.get("model") or ""), messages=messages,
                       max_tokens=None if max_tokens is None else int(max_tokens), json_mode=json_mode,
                       prompt=last_user_text(messages), stream=body.get("stream") is True,
                       include_usage=isinstance(options, dict) and options.get("include_usage") is True,
                       schema=requested_schema(body) if json_mode else None, tools=tool_names(body),
                       n=max(1, int(body.get("n") or 1)))


def tool_names(body: dict[str, Any]) -> tuple[str, ...]:
    """The function names a request offers in `tools` ([{"type": "function", "function": {"name": ...}}])."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return ()
    return tuple(str(tool["function"].get("name")) for tool in tools
                 if isinstance(tool, dict) and isinstance(tool.get("function"), dict))


def tool_calls_for(chat: ChatRequest, count: int) -> list[dict[str, Any]]:
    """[[toolcalls:N]]: N calls, to the request's tools in turn ("lookup" when it offers none), with arguments drawn
    from the prompt: a pure function of the request (the ids are the prompt's hash)."""
    digest = hashlib.sha256(chat.prompt.encode("utf-8")).hexdigest()[:8]
    names = chat.tools or ("lookup",)
    return [{"id": f"call_{digest}_{i}", "type": "function",
             "function": {"name": names[i % len(names)],
                          "arguments": json.dumps({"query": chat.prompt[:40], "call": i}, ensure_ascii=False)}}
            for i in range(count)]


def reply_marker(content: str) -> str:
    """The [[reply:...]] marker of a prompt whose answer's content is `content`."""
    return f"[[reply:{base64.urlsafe_b64encode(content.encode('utf-8')).decode('ascii')}]]"


def strict_schema_problem(body: dict[str, Any]) -> str | None:
    """Why OpenAI would refuse the request's response_format (400), in its words, or None: with `strict: true`, a
    json_schema must be in the subset Structured Outputs documents (the root an object, not anyOf; every object
    with additionalProperties false and each of its properties in `required`, recursively through properties, items,
    anyOf and $defs; every value typed; no keyword beside a $ref; no oneOf, nor the keywords
    batch.schema.STRICT_REFUSED_KEYWORDS and STRICT_CHECKED_BY_BATCH list; formats from its list)."""
    response_format = body.get("response_format")
    wrapper = response_format.get("json_schema") if isinstance(response_format, dict) else None
    if not isinstance(wrapper, dict) or wrapper.get("strict") is not True:
        return None
    head = f"Invalid schema for response_format '{wrapper.get('name')}': "
    schema = wrapper.get("schema")
    if not isinstance(schema, dict) or schema.get("type") != "object" or "anyOf" in schema:
        kind = schema.get("type") if isinstance(schema, dict) else None
        return head + f"schema must be a JSON Schema of 'type: \"object\"', got 'type: \"{kind}\"'."
    problem = _strict_problem(schema, ())
    return None if problem is None else head + problem


def _strict_problem(node: Any, context: tuple[str, ...]) -> str | None:
    from batch.replies.schema import (  # only when asked: it starts light
        STRICT_CHECKED_BY_BATCH,
        STRICT_FORMATS,
        STRICT_REFUSED_KEYWORDS,
        STRICT_TYPED_BY,
    )

    if not isinstance(node, dict):
        return None
    where = f"In context={context!r}, "
    for keyword in (*STRICT_REFUSED_KEYWORDS, *STRICT_CHECKED_BY_BATCH, "oneOf"):
        if keyword in node:
            return where + f"'{keyword}' is not permitted."
    if node.get("format") is not None and node["format"] not in STRICT_FORMATS:
        return where + f"'format' {node['format']!r} is not permitted."
    if context and not any(key in node for key in STRICT_TYPED_BY):
        return where + "schema must have a 'type' key."
    if "$ref" in node and len(node) > 1:
        return where + f"'$ref' cannot have keywords {sorted(key for key in node if key != '$ref')}."
    kinds = node.get("type")
    subs: list[tuple[Any, tuple[str, ...]]] = []
    if kinds == "object" or (isinstance(kinds, list) and "object" in kinds) or "properties" in node:
        if node.get("additionalProperties") is not False:
            return where + "'additionalProperties' is required to be supplied and to be false."
        properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        required = node.get("required") if isinstance(node.get("required"), list) else []
        missing = [name for name in properties if name not in required]
        if missing:
            return where + ("'required' is required to be supplied and to be an array including every key in "
                            f"properties. Missing '{missing[0]}'.")
        subs += [(sub, (*context, "properties", name)) for name, sub in properties.items()]
    if isinstance(node.get("items"), dict):
        subs.append((node["items"], (*context, "items")))
    if isinstance(node.get("anyOf"), list):
        subs += [(sub, (*context, "anyOf", str(i))) for i, sub in enumerate(node["anyOf"])]
    for key in ("$defs", "definitions"):
        if isinstance(node.get(key), dict):
            subs += [(sub, (*context, key, name)) for name, sub in node[key].items()]
    return next((problem for sub, at in subs if (problem := _strict_problem(sub, at)) is not None), None)


def markers_of(prompt: str) -> dict[str, str]:
    """The fault markers in a prompt, by name (``[[slow:50]]`` -> ``{"slow": "50"}``)."""
    return dict(_MARKER_RE.findall(prompt)) if "[[" in prompt else {}
