"""The filesystem driver: a data directory as a store of keys and bytes (``driver.FsDriver``)."""
