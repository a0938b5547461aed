"""Paper-scale plans: a recipe's real programs compiled ahead of time for a TPU slice from a CPU host
(`effjax plan`), with per-device memory against HBM and the step time at the chip's peak."""
