"""Helpers shared by tests: plain functions and constants, never tests or fixtures."""
