-- The MLflow database is POSTGRES_DB; the Prefect server gets its own database beside it.
CREATE DATABASE prefect;
