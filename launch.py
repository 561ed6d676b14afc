"""Start one instance of a role from a checkout:  python launch.py role=prefill | role=decode [overrides...]

The launcher itself is `sharedcache_integrations.launch` (installed: `sharedcache launch ...`, the same
overrides and run directories); this file runs it from the repository root without installing.
"""
from sharedcache_integrations.launch import main

if __name__ == "__main__":
    main()
