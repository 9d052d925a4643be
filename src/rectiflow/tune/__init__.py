"""rectiflow.tune: fine-tuning a model against a reward on its own samples (Flow-GRPO: `grpo`), above
train, sample and eval because it uses all three: it samples, trains, and scores with eval's scorers
(`rewards`)."""
