"""Prefect flows and deployments: they only wire DVC stages, working copies and work pools."""
