"""The wire format: OpenAI's completions subset (what vLLM serves), /v1/predict, and errors.

Requests are validated strictly (a string where a number belongs is an error, not a guess;
an unknown field is an error naming the close matches), and every error is one line of JSON:
{"error": {"message": ..., "type": ..., "param": ..., "code": <HTTP status>}}.
"""

from __future__ import annotations

import difflib
import json
import secrets
import time
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

MAX_PROMPTS = 64          # prompts in one request
MAX_STOPS, MAX_STOP_CHARS = 16, 256


class ApiError(Exception):
  def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
               headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers or {}

  def body(self) -> bytes:
    return error_body(self.status, self.message, self.kind, self.param)


def error_body(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> bytes:
  message = " ".join(str(message).split())      # one line, whatever the cause said
  return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}).encode()


Number = Union[StrictInt, StrictFloat]


class StreamOptions(BaseModel):
  model_config = ConfigDict(extra="forbid")
  include_usage: StrictBool = False


class CompletionRequest(BaseModel):
  """POST /v1/completions. `top_k` is vLLM's extension (0 or -1: the whole vocabulary);
  `return_token_ids` adds each choice's generated token ids (as vLLM's option of that name);
  streamed, every event then carries the ids of the tokens since the last one (one token per
  event unless the client falls behind), even when their text is still held back."""
  model_config = ConfigDict(extra="forbid")
  prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
  model: StrictStr | None = None
  max_tokens: StrictInt | None = 16
  temperature: Number = 1.0
  top_p: Number = 1.0
  top_k: StrictInt = 0
  seed: StrictInt | None = None
  stop: Union[StrictStr, list[StrictStr], None] = None
  stream: StrictBool = False
  stream_options: StreamOptions | None = None
  echo: StrictBool = False
  n: StrictInt = 1
  logprobs: None = None
  best_of: StrictInt | None = None
  presence_penalty: Number = 0.0
  frequency_penalty: Number = 0.0
  user: StrictStr | None = None
  return_token_ids: StrictBool = False


class PredictRequest(BaseModel):
  """POST /v1/predict: rows of raw features, as the experiment's data source holds them."""
  model_config = ConfigDict(extra="forbid")
  rows: list[dict] = Field(min_length=1)
  model: StrictStr | None = None


def parse(model: type[BaseModel], body: bytes):
  """Bytes of a request body -> the validated request, or a 400 naming the first problem."""
  try:
    data = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ApiError(400, f"the request body is not valid JSON: {e}") from None
  if not isinstance(data, dict):
    raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
  try:
    return model.model_validate(data)
  except ValidationError as e:
    raise ApiError(400, describe(e, model), param=_loc(e.errors()[0])) from None


UNIONS = {"prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
          "stop": "a string or a list of strings", "temperature": "a number", "top_p": "a number",
          "presence_penalty": "a number", "frequency_penalty": "a number"}


def _loc(err: dict) -> str:
  """'stop.0' from ('stop', 'list[str]', 0): the field path without pydantic's union tags."""
  tag = lambda p: isinstance(p, str) and (p in ("str", "int", "float", "bool") or "[" in p)
  return ".".join(str(p) for p in err.get("loc", ()) if not tag(p))


def describe(e: ValidationError, model: type[BaseModel]) -> str:
  """The first validation error as a sentence: the field, what was wrong, what is expected."""
  err = e.errors()[0]
  where = _loc(err) or "body"
  field = str(err["loc"][0]) if err.get("loc") else ""
  got = err.get("input")
  got = repr(got)[:40] if isinstance(got, (int, float, str)) and not isinstance(got, bool) else type(got).__name__
  if err["type"] == "extra_forbidden":
    close = difflib.get_close_matches(field, list(model.model_fields), n=1)
    return (f"unknown field '{field}'" + (f"; did you mean '{close[0]}'?" if close else "") +
            f" (accepted: {', '.join(model.model_fields)})")
  if err["type"] == "missing":
    return f"'{where}' is required"
  if field in UNIONS:
    return f"'{field}' must be {UNIONS[field]} (got {got})"
  return f"'{where}': {err['msg'].lower()} (got {got})"


def check_sampling(req: CompletionRequest) -> None:
  """What the engine does not do, refused by name rather than ignored."""
  if req.n != 1 or (req.best_of not in (None, 1)):
    raise ApiError(400, "only n=1 (and best_of=1) is supported", param="n")
  if req.presence_penalty or req.frequency_penalty:
    raise ApiError(400, "presence_penalty and frequency_penalty are not supported (use 0)", param="presence_penalty")
  if req.temperature < 0 or req.temperature > 100:
    raise ApiError(400, f"'temperature' must be in [0, 100], got {req.temperature}", param="temperature")
  if not 0 < req.top_p <= 1:
    raise ApiError(400, f"'top_p' must be in (0, 1], got {req.top_p}", param="top_p")
  if req.top_k < -1:
    raise ApiError(400, f"'top_k' must be >= 0 (0 or -1: the whole vocabulary), got {req.top_k}", param="top_k")
  if req.max_tokens is not None and req.max_tokens < 1:
    raise ApiError(400, f"'max_tokens' must be >= 1, got {req.max_tokens}", param="max_tokens")
  if req.seed is not None and not 0 <= req.seed < 2**63:
    raise ApiError(400, f"'seed' must be in [0, 2**63), got {req.seed}", param="seed")
  for s in stops(req):
    if not s or len(s) > MAX_STOP_CHARS:
      raise ApiError(400, f"each stop string must hold 1 to {MAX_STOP_CHARS} characters", param="stop")
  if len(stops(req)) > MAX_STOPS:
    raise ApiError(400, f"at most {MAX_STOPS} stop strings, got {len(stops(req))}", param="stop")


def stops(req: CompletionRequest) -> tuple[str, ...]:
  return () if req.stop is None else (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)


def prompts(req: CompletionRequest) -> list[Union[str, list[int]]]:
  """The request's prompts: each a string or a list of token ids."""
  p = req.prompt
  if isinstance(p, str):
    out = [p]
  elif p and all(isinstance(x, int) for x in p):
    out = [list(p)]
  else:
    out = list(p)
  if not out:
    raise ApiError(400, "'prompt' is empty", param="prompt")
  if len(out) > MAX_PROMPTS:
    raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(out)}", param="prompt")
  return out


def completion_id() -> str:
  return "cmpl-" + secrets.token_hex(12)


def completion(request_id: str, model: str, created: int, choices: list[dict], prompt_tokens: int,
               completion_tokens: int) -> dict:
  return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices,
          "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}}


def choice(index: int, text: str, finish_reason: str | None, token_ids: list[int] | None = None) -> dict:
  out = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
  if token_ids is not None:
    out["token_ids"] = token_ids
  return out


def sse(payload: dict | Literal["[DONE]"]) -> bytes:
  """One server-sent event, as OpenAI streams completions."""
  data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
  return f"data: {data}\n\n".encode()


def now() -> int:
  return int(time.time())
