"""Queries to files: the query language, its SQL compilation and the caches that speed it up."""
