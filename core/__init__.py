"""flamingo-bot's core: what the bot knows and does, with no knowledge of Discord."""
