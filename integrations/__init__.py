"""Thin adapters that connect frameworks to the sharedcache core."""
