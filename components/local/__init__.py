"""Local stand-ins for the cluster: the embedded S3 + MLflow stack and model servers on loopback."""
