"""Pull-through cache: upstream registries, their client, and fetch coalescing."""
