"""The ray backend: requests on the wire to Serve replicas that run the local service."""
