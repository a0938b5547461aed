"""ReBalance: confidence-steered reasoning (control function, online bookkeeping, offline extraction)."""
