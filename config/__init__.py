"""Settings and shared data models. Nothing in this package performs I/O."""
