"""Training layer: model preparation, TRL's SFTTrainer with ftkit's callbacks and loss, and the run's artifacts."""
