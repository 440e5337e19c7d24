#!/bin/sh
# Runs once, when the data directory is initialised: one database per service. POSTGRES_DB
# (mlflow) is created by the image's entrypoint itself.
set -eu
for db in prefect mlflow_auth; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -c "CREATE DATABASE \"$db\""
done
