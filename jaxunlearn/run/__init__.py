"""One unlearning run: prepare, claim the workdir, train, checkpoint, evaluate, export, record."""
