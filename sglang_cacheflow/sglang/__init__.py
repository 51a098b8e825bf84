"""SGLang 0.5.23 adapter: plugin entry point, radix cache, Redis storage backend, flags."""
