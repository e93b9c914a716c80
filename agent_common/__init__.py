"""What both daemons share: settings loading, JSON logs, metrics, domain errors, HTTP serving, local launching."""
