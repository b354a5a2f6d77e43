"""User-facing tools: predict, prepare, report, export, weights."""
