-- Dagster's run/event storage lives in its own database beside the application's.
CREATE DATABASE dagster OWNER heimdex;
