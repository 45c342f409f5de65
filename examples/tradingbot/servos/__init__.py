"""Integrations with outside services (the AI API)."""
