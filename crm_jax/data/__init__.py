"""Data: the procedural toy world (and, later, synthetic-data generation and readers)."""
