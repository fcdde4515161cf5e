"""Tasks: each server's library of in-context examples, the built-ins, and the portable task file."""
