"""Server-side arithmetic: partial sums, aggregation rules, server optimizers."""
