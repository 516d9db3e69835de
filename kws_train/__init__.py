"""Training side of the keyword-spotting toolkit: data, features, models, training, evaluation."""
