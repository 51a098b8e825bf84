"""Tests of the KV tiers and the Redis storage backend."""
