"""The error codes a client can get from the router, each with what it means and what to do.

Codes are stable (never renamed; tests/runtime/test_client.py checks that every code the runtime
raises is listed). An `Error` reply refuses a request on arrival; a `Finished` with finish_reason
"error" carries a failure after it started. Workers add per-request codes of their own (e.g.
kv_capacity, prompt_too_long, draining), passed through unchanged.
"""

from __future__ import annotations

REFUSALS = {
    "bad_message": "the frame is not a valid message (not msgpack, a missing field, a wrong type or a value out of "
    "bounds, several frames)",
    "unknown_message": "a message type this side does not take",
    "message_too_large": "the message exceeds protocol.MAX_MESSAGE_BYTES: send a shorter prompt",
    "version_mismatch": "the frame carries no readable protocol version: not an hmoe peer",
    "version_too_old": "the peer speaks only protocol versions older than this side reads (protocol.MIN_VERSION), or "
    "a worker and the router share no version: upgrade the side the message names",
    "invalid_sampling": "a sampling parameter is unknown (never silently ignored) or out of range",
    "invalid_prompt": "no prompt, both prompt and token_ids, an empty prompt or token ids outside the vocabulary",
    "invalid_request": "a request field is out of range (e.g. timeout_s <= 0)",
    "tokenizer_missing": "the router has no tokenizer.json: send token_ids, or set [router] model_dir",
    "prompt_too_long": "the prompt exceeds [router] max_prompt_tokens",
    "context_too_long": "prompt + max_tokens exceeds the model's context",
    "kv_capacity": "prompt + max_tokens can never fit the decode worker's KV cache: raise kv_cache_gib or ask for less",
    "duplicate_request": "a request with this id is already running: make request ids unique",
    "no_worker": "no prefill or decode worker is registered (or none came back within [router] worker_wait_s)",
    "queue_full": "[router] max_queued requests are waiting: retry later",
    "draining": "the router (or the worker) is shutting down and takes no new requests",
    "unsupported_field": "the HTTP API does not support this request field or value (tools, response_format other "
    "than text, ...): the error names it; drop it",
    "chat_template_missing": "the model has no chat template: use /v1/completions, or start hmoe-http with "
    "[http] chat_template (--chat-template FILE)",
    "chat_template_error": "the chat template refused the messages (raise_exception in the template) or failed",
    "model_not_found": "the request's `model` is not the served one ([http] served_model_name; GET /v1/models)",
    "wrong_role": "a prefill request reached a decode worker or the reverse (a router bug or a stray client)",
}
FAILURES = {
    "worker_lost": "the worker running the request died or stopped answering heartbeats: retry",
    "server_shutdown": "the router stopped before the request finished (drain grace passed, or a second signal)",
    "internal_error": "the HTTP API failed on a request (a bug: its log has the traceback)",
    "shutting_down": "the worker running the request stopped before it finished (its drain grace passed): retry",
    "handoff_lost": "the prompt's KV hand-off slot was gone when the decode worker adopted it (the prefill worker "
    "died, or the slot was reclaimed after handoff_timeout_s): retry",
    "router_restarted": "the router restarted while the request ran and the new one does not know it: retry",
    "worker_stuck": "the worker running the request was busy without progress for [router] stuck_after_s: it is "
    "being restarted; retry",
    "handoff_invalid": "an Adopt named a hand-off segment or slot that does not exist (a router bug or a stray client)",
    "rank_lost": "a rank of a prefill worker spanning several GPUs died or stopped answering mid-pass: the worker "
    "restarts whole; retry",
}
CLIENT_SIDE = {
    "router_unreachable": "no answer from the router within the client's router_timeout_s",
    "not_ready": "hmoe generate --wait: no prefill and decode worker registered in time, or hmoe serve has exited",
    "drain_timeout": "hmoe drain: the router still ran 10 s past the drain grace",
    "usage": "a command-line argument is missing or invalid: see the command's --help",
    "no_event_loop": "AsyncClient used outside a running event loop: call it from async code or use Client",
}
PROCESS = {
    "tokenizer_invalid": "tokenizer.json could not be read (router start-up)",
    "startup_failed": "hmoe-router could not start (endpoint in use, unreadable key): exit status 3",
    "not_registered": "a worker message reached a router that does not know the worker (restarted, or it declared "
    "the worker lost): the worker registers again",
    "device_unavailable": "the device named (--device, [worker] device) does not exist here: exit status 3",
    "worker_rejected": "a worker's registration was refused (another model, unknown role)",
    "graph_capture_failed": "the decode worker could not capture its CUDA graphs at start-up (the message names "
    "the micro-batch and the bucket): exit status 3",
}
ERROR_CODES = {**REFUSALS, **FAILURES, **CLIENT_SIDE, **PROCESS}
