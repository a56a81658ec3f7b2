"""Shared test tooling (not tests): real-service fixtures such as a throwaway PostgreSQL server."""
