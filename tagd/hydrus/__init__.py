"""Hydrus Network sync: pushing effective tags to a Hydrus tag service."""
