"""Training glue: data, Trainer integration, loss reduction under sequence parallelism."""
