"""The FOD pipelines (Kubeflow Pipelines v2): DAGs, compile, local run, submit, and the CLI."""
