"""The bot's signal handlers."""
