"""The worker process: the router link and heartbeats (worker), the prefill and decode engines, and
the KV hand-off segment between them."""
