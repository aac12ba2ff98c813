"""Jobs: the pipeline registry, the DAG orchestrator and the django-q2 broker."""
