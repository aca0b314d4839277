"""quantmill.io: see docs/ARCHITECTURE.md for what this layer holds and what it may import."""
