"""Model zoo: networks only (no training loop, files, MLflow or DVC)."""
