"""Performance history: the DuckDB store, the events writer that fills it, and the report drawn from it."""
