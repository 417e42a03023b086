"""Fine-grained layers, each in its own file."""
