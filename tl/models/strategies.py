"""The fine-tuning strategy names (`finetune.strategy`), importable without torch for config checks."""

STRATEGIES = ("linear_probe", "partial", "full", "gradual", "lp_ft")
STAGED = ("gradual", "lp_ft")  # strategies that unfreeze stage by stage (the unfreezing callback drives them)
