"""Serving: a continuous-batching engine, accounts and billing, and an OpenAI-compatible HTTP API."""
