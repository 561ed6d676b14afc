"""Start one instance of a role from a checkout:  python launch.py role=prefill | role=decode [overrides...]

The launcher itself is `sharedcache_integrations.launch` (installed: `sharedcache launch ...`, the same
overrides; run directories go under ./outputs here and under the state directory there, conf/config.yaml
`runs`); this file runs it from the repository root without installing.
"""
from sharedcache_integrations.launch import main

if __name__ == "__main__":
    main()
