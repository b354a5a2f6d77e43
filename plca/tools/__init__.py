"""User-facing tools, the commands' implementations: evaluate, predict, prepare, report, sweep, export, weights."""
