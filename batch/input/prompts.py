"""From a row's values to the chat messages sent for it."""

from __future__ import annotations

import json
import string
from typing import Any

from batch.config import PromptSpec
from batch.errors import ConfigError


class RowPromptError(Exception):
    """This row cannot be sent (empty prompt, bad messages); it fails without a request."""


def template_columns(template: str) -> list[str]:
    """The column names a template's `{placeholders}` refer to (`{{` and `}}` are literal braces)."""
    columns = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"prompt.template: {exc} (write literal braces as '{{{{' and '}}}}')") from None
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if field == "" or field.isdigit() or spec or conversion or any(c in field for c in ".["):
            shown = field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ConfigError(f"prompt.template: placeholder '{{{shown}}}' must be a plain column name like {{text}}")
        columns.append(field)
    return columns


def system_text(system: str | None, note: str | None) -> str | None:
    """The system prompt sent: the job's, with `note` (what output.json_schema asks for) after it."""
    if note is None:
        return system
    return f"{system}\n\n{note}" if system else note


class PromptBuilder:
    def __init__(self, prompt: PromptSpec, system_note: str | None = None) -> None:
        self.template = prompt.template
        self.messages_column = prompt.messages_column  # with no template: each row's messages, as JSON
        self.columns = template_columns(prompt.template) if prompt.template is not None else [prompt.messages_column]
        system = system_text(prompt.system, system_note)
        self._system = [{"role": "system", "content": system}] if system else []

    def messages(self, values: dict[str, Any]) -> list[dict[str, Any]]:
        if self.template is not None:
            return self._system + [{"role": "user", "content": self._render(values)}]
        return self._system + _parse_messages(values.get(self.messages_column), self.messages_column)

    def _render(self, values: dict[str, Any]) -> str:
        rendered = {}
        for column in self.columns:
            value = values.get(column)
            if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
                raise RowPromptError(f"column '{column}' is empty")
            rendered[column] = value
        return self.template.format_map(rendered)  # type: ignore[union-attr]


ROLES = ("system", "user", "assistant", "tool")


def _parse_messages(value: Any, column: str | None) -> list[dict[str, Any]]:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RowPromptError(f"column '{column}' is empty")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowPromptError(f"column '{column}' is not valid JSON: {exc.msg}") from None
    if hasattr(value, "tolist"):  # a list read from Parquet arrives as a numpy array
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise RowPromptError(f"column '{column}' must hold a non-empty JSON list of messages")
    for number, message in enumerate(value, start=1):
        problem = _message_problem(message)
        if problem:
            raise RowPromptError(f"column '{column}': message {number} {problem}")
    return value


def _message_problem(message: Any) -> str | None:
    """What makes `message` one an OpenAI-compatible API would refuse, or None."""
    if not isinstance(message, dict):
        return f"is {type(message).__name__}, not an object with 'role' and 'content'"
    if "role" not in message:
        return "has no 'role'"
    role = message["role"]
    if role not in ROLES:
        shown = json.dumps(role, ensure_ascii=False)
        return f"has role {shown} (expected {', '.join(ROLES[:-1])} or {ROLES[-1]})"
    content = message.get("content")
    if isinstance(content, str | list):  # a list: content parts (text, image_url, ...)
        return None
    if content is None and role == "assistant" and message.get("tool_calls"):
        return None  # an assistant turn that only calls tools
    return "has no 'content'" if content is None else f"has {type(content).__name__} content (expected text or a list)"


# What a chat template adds around each message (role markers, separators) and around the request (the
# assistant's turn): a few tokens in GLM's, Llama's and OpenAI's templates; these are generous bounds.
MESSAGE_OVERHEAD_TOKENS = 8
REQUEST_OVERHEAD_TOKENS = 8


def prompt_token_bound(messages: list[dict[str, Any]]) -> int:
    """The most prompt tokens `messages` can cost: the UTF-8 bytes of each content plus a per-message overhead.

    A byte-level BPE tokenizer (GLM's, GPT's, Llama 3's) never makes a token of less than one byte, so no text
    has more tokens than bytes, however dense (numbers, ids, JSON tokenize at ~2 characters a token, far
    beyond estimate_tokens' average). The budget reserves this, not the estimate. A message with more than a
    role and a text content (content parts, tool_calls, a name) counts as the bytes of its whole JSON.
    """
    total = REQUEST_OVERHEAD_TOKENS
    for message in messages:
        text = message.get("content")
        if not (isinstance(text, str) and len(message) == 2):
            text = json.dumps(message, ensure_ascii=False)
        total += len(text.encode("utf-8")) + MESSAGE_OVERHEAD_TOKENS
    return total


def estimate_tokens(messages: list[dict[str, Any]]) -> int:
    """A cheap upper-ish estimate: one token per non-ASCII character (CJK), one per 4 ASCII ones."""
    total = 0
    for message in messages:
        text = message.get("content")
        text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
        chars = len(text)
        non_ascii = (len(text.encode("utf-8")) - chars) // 2
        total += 4 + non_ascii + (chars - non_ascii) // 4
    return total
