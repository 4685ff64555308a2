"""The index: the only code that speaks SQL (schema, migrations, one module per table family)."""
