"""The OpenAI-compatible HTTP API: a torch-free process in front of the router (hmoe-http).

app.py (routes), schema.py (request fields), chat_template.py, reasoning.py, choices.py (upstream
requests), format.py (response shapes), metrics.py (Prometheus), server.py (the process).
"""
