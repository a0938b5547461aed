"""Online RLHF with efficient exploration: ENN reward model, pair selection, nudged policy updates.

See /work/shared/docs/ONLINE_RLHF.md and `effjax rlhf run --config configs/rlhf_toy_*.toml`.
"""
