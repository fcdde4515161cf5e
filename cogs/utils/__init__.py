"""Shared pieces of the Discord side: the bot class, permission checks, error replies."""
