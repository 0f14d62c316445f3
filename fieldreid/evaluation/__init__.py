"""Re-identification evaluation in numpy only: metrics (:mod:`fieldreid.evaluation.metrics`)."""
