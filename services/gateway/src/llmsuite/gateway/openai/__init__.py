"""The OpenAI-compatible HTTP API (`llmsuite-openai`): a thin adapter that
serves /v1/models, /v1/completions and /v1/chat/completions by calling the
gateway over gRPC with each caller's own API key (see docs/openai.md).

Installed with the gateway's `http` extra (`llmsuite-gateway[http]`).
"""
