"""The Hydra configuration, installed as the package `sharedcache_conf` so that a wheel carries it
(`sharedcache.conf.conf_dir()` finds it there). The YAML files are the configuration; nothing here."""
