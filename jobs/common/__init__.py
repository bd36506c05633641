"""What more than one job uses: flags, config sections, the per-category Ray runner, the model
catalogue, MLflow tracking and the pyfunc model."""
