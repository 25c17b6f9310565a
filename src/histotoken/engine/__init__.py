"""Engine: one LightningModule for every model; fit(), evaluate() and benchmark()."""
