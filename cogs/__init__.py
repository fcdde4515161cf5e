"""Discord adapters: each cog turns interactions into calls to ``core`` and results into replies."""
