"""Reading runs back from MLflow, statistics, plots and the report."""
