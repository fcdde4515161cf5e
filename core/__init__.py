"""flamingo-bot: OpenFlamingo for Discord servers."""

__version__ = "0.1.0"
