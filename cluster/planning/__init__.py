"""Planning: model sources, architectures, weights, adapters, the GPU catalog and the memory plan."""
