"""Decoding: the prompt's prefix computed once, then token steps for a batch of requests, exact to upstream."""
