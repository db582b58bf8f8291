"""fedcdd on Flower: the ServerApp, its strategy, and the ClientApp (every number computed by
libfedcdd through the `fedcdd` package)."""
