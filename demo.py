"""The main job on the embedded default, from a checkout:  python demo.py [overrides for both roles]

The demo itself is `sharedcache_integrations.demo` (installed: `sharedcache demo ...`).
"""
import sys

from sharedcache_integrations.demo import main

if __name__ == "__main__":
    sys.exit(main())
