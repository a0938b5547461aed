"""Online RLHF with efficient exploration: ENN reward model, pair selection, nudged policy updates.

Run one with `effjax rlhf run --config configs/rlhf_toy.toml` (or configs/rlhf_gsm8k_smollm2.toml).
"""
